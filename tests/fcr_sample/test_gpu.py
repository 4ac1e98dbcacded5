"""GPU checks (marker ``gpu``, deselected by ``./run.sh test``; run them on a CUDA machine with
``uv run pytest -m gpu tests/fcr_sample/test_gpu.py``). On a machine without CUDA they fail with
that reason rather than skip: selecting them says a GPU is there."""

from __future__ import annotations

import pytest
import torch
from fcr_sample import (
    DeepCacheConfig,
    EncoderCacheConfig,
    apply_deep_cache,
    apply_encoder_cache,
    denoise,
    get_cache_stats,
    remove_deep_cache,
    remove_encoder_cache,
)

pytestmark = pytest.mark.gpu


def _cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.fail("marked gpu: needs a CUDA device; run `pytest -m gpu` on a GPU machine")
    return torch.device("cuda")


def _sample(pipe, x_T, cond, null, device, dtype=torch.float32):
    pipe.unet.to(device, dtype)
    return denoise(pipe.unet, pipe.scheduler, x_T.to(device, dtype), cond.to(device, dtype), null.to(device, dtype),
                   steps=10, guidance_scale=3.0).float().cpu()


@pytest.mark.parametrize("cache", ["fd", "deepcache"])
def test_a_cached_run_on_cuda_equals_the_cpu_run(make_pipe, denoise_inputs, cache):
    device = _cuda()
    pipe = make_pipe()
    x_T, cond, null = denoise_inputs(pipe)
    apply = (lambda u: apply_encoder_cache(u, EncoderCacheConfig(stride=3))) if cache == "fd" else \
        (lambda u: apply_deep_cache(u, DeepCacheConfig(cache_interval=3)))
    apply(pipe.unet)
    cpu = _sample(pipe, x_T, cond, null, "cpu")
    gpu = _sample(pipe, x_T, cond, null, device)
    stats = get_cache_stats(pipe.unet)
    (remove_encoder_cache if cache == "fd" else remove_deep_cache)(pipe.unet)
    assert stats.unet_calls == 20 and stats.runs == 2  # one CPU and one CUDA run of 10 steps
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-3)


def test_fd_in_half_precision_stays_close_to_float32(make_pipe, denoise_inputs):
    device = _cuda()
    pipe = make_pipe()
    x_T, cond, null = denoise_inputs(pipe)
    apply_encoder_cache(pipe.unet, EncoderCacheConfig(stride=3))
    full = _sample(pipe, x_T, cond, null, device)
    half = _sample(pipe, x_T, cond, null, device, torch.float16)
    remove_encoder_cache(pipe.unet)
    assert torch.isfinite(half).all()
    assert (half - full).abs().max() < 5e-2
