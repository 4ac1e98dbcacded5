"""The encoder cache inside the pipelines people deploy: ControlNet (single and multi), SDXL,
img2img and inpainting, each a real diffusers pipeline built from tiny configs."""

from __future__ import annotations

import pytest
import torch
from fcr_sample import (
    EncoderCacheConfig,
    apply_encoder_cache,
    decoder_groups,
    get_cache_stats,
    remove_encoder_cache,
)
from fcr_sample.controlnet import detach_controlnet_skip
from fcr_sample.testing import sample_latents, tiny_controlnet_pipeline

STEPS = 10


def _control_images(pipe, n: int):
    g = torch.Generator().manual_seed(7)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    imgs = [torch.rand(1, 3, size, size, generator=g) for _ in range(n)]
    return imgs[0] if n == 1 else imgs


def _count_forwards(modules) -> list[int]:
    """Forwards that really ran, counted on each module's first layer (a hook that skips the
    module as a whole would still trigger a forward hook on the module itself)."""
    counts = [0] * len(modules)
    for k, m in enumerate(modules):
        m.conv_in.register_forward_hook(lambda *_, k=k: counts.__setitem__(k, counts[k] + 1))
    return counts


def _controlnets(pipe):
    net = pipe.controlnet
    return list(getattr(net, "nets", [net]))


def _run(pipe, config=None, **kw):
    kw.setdefault("image", _control_images(pipe, len(_controlnets(pipe))))
    if config is None:
        return sample_latents(pipe, steps=STEPS, **kw), None
    apply_encoder_cache(pipe, config)
    try:
        return sample_latents(pipe, steps=STEPS, **kw), get_cache_stats(pipe)
    finally:
        remove_encoder_cache(pipe)


@pytest.mark.parametrize("num_controlnets", [1, 2])
def test_controlnet_stride_1_equals_no_cache(num_controlnets):
    pipe = tiny_controlnet_pipeline(num_controlnets=num_controlnets)
    ref, _ = _run(pipe)
    without_control, _ = _run(pipe, image=_control_images(pipe, num_controlnets),
                              controlnet_conditioning_scale=0.0 if num_controlnets == 1 else [0.0, 0.0])
    assert (ref - without_control).abs().max() > 1e-3  # the ControlNet matters in this pipeline
    out, stats = _run(pipe, EncoderCacheConfig(stride=1))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert stats.controlnet_forwards == STEPS and stats.controlnet_skips == 0


@pytest.mark.parametrize("num_controlnets", [1, 2])
@pytest.mark.parametrize("parallel", [True, False])
def test_controlnet_runs_only_at_key_steps(num_controlnets, parallel):
    pipe = tiny_controlnet_pipeline(num_controlnets=num_controlnets)
    counts = _count_forwards(_controlnets(pipe))
    config = EncoderCacheConfig(stride=5, parallel_decoding=parallel)
    out, stats = _run(pipe, config)
    assert counts == [2] * num_controlnets  # key steps 0 and 5 of 10
    assert stats.controlnet_forwards == 2 and stats.controlnet_skips == STEPS - 2
    assert stats.encoder_forwards == 2 and stats.decoder_forwards == STEPS
    batches = len(decoder_groups([0, 5], STEPS, config.max_parallel_steps)) if parallel else STEPS
    assert stats.decoder_batches == batches
    # the same images as the cache with the ControlNet running at every step (its residuals are
    # read only at key steps): skipping it changed the cost and nothing else
    pipe_all = tiny_controlnet_pipeline(num_controlnets=num_controlnets)
    full_counts = _count_forwards(_controlnets(pipe_all))
    apply_encoder_cache(pipe_all, config)
    assert detach_controlnet_skip(pipe_all)
    try:
        ref = sample_latents(pipe_all, steps=STEPS, image=_control_images(pipe_all, num_controlnets))
    finally:
        remove_encoder_cache(pipe_all)
    assert full_counts == [STEPS] * num_controlnets
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    # and caching did change the computation
    assert (out - _run(pipe)[0]).abs().max() > 1e-4


def test_remove_restores_the_controlnet():
    pipe = tiny_controlnet_pipeline()
    apply_encoder_cache(pipe, EncoderCacheConfig(stride=5))
    remove_encoder_cache(pipe)
    assert not hasattr(pipe.controlnet, "_diffusers_hook") and "forward" not in vars(pipe.controlnet)


# -- SDXL, img2img, inpainting: FD and DeepCache in an unmodified call -------------------------


def _image(pipe, seed=3, channels=3):
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return torch.rand(1, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _build(kind: str, scheduler: str = "ddim"):
    """``(pipe, call kwargs, UNet calls per run of STEPS)`` for each pipeline kind."""
    from diffusers import (
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionXLImg2ImgPipeline,
    )
    from fcr_sample.testing import tiny_sd_pipeline, tiny_sdxl_pipeline

    if kind == "sdxl":
        return tiny_sdxl_pipeline(scheduler=scheduler), {}, STEPS
    if kind == "sdxl-img2img":
        pipe = tiny_sdxl_pipeline(scheduler=scheduler, pipeline_class=StableDiffusionXLImg2ImgPipeline)
        return pipe, {"image": _image(pipe), "strength": 0.6}, 6
    if kind == "img2img":
        pipe = tiny_sd_pipeline(scheduler=scheduler, pipeline_class=StableDiffusionImg2ImgPipeline)
        return pipe, {"image": _image(pipe), "strength": 0.5}, 5
    if kind == "inpaint":
        pipe = tiny_sd_pipeline(scheduler=scheduler, pipeline_class=StableDiffusionInpaintPipeline)
        mask = (_image(pipe, seed=4, channels=1) > 0.5).float()
        return pipe, {"image": _image(pipe), "mask_image": mask, "strength": 0.7}, 7
    raise ValueError(kind)


KINDS = ["sdxl", "sdxl-img2img", "img2img", "inpaint"]


def _cached(pipe, config, apply, remove, **kw):
    apply(pipe, config)
    try:
        return sample_latents(pipe, steps=STEPS, **kw), get_cache_stats(pipe)
    finally:
        remove(pipe)


def _fd(pipe, config, **kw):
    return _cached(pipe, config, apply_encoder_cache, remove_encoder_cache, **kw)


# schedulers with set_begin_index (Euler, DPM-Solver++) are told where img2img starts; DDIM is not
@pytest.mark.parametrize("kind, scheduler", [(k, "ddim") for k in KINDS] + [("img2img", "euler"),
                                                                          ("inpaint", "dpm++")])
def test_fd_in_sdxl_img2img_and_inpainting(kind, scheduler):
    pipe, kw, calls = _build(kind, scheduler)
    ref = sample_latents(pipe, steps=STEPS, **kw)
    one, stats = _fd(pipe, EncoderCacheConfig(stride=1), **kw)
    torch.testing.assert_close(one, ref, rtol=0, atol=1e-6)
    assert stats.unet_calls == stats.encoder_forwards == calls  # only the steps actually run
    seq, seq_stats = _fd(pipe, EncoderCacheConfig(stride=3, parallel_decoding=False), **kw)
    par, par_stats = _fd(pipe, EncoderCacheConfig(stride=3), **kw)
    torch.testing.assert_close(par, seq, rtol=1e-4, atol=1e-4)
    assert (seq - ref).abs().max() > 1e-4
    keys = EncoderCacheConfig(stride=3).key_steps_for(calls)
    for s in (seq_stats, par_stats):
        assert s.unet_calls == s.decoder_forwards == calls and s.encoder_forwards == len(keys)
    assert par_stats.decoder_batches == len(decoder_groups(keys, calls, 10))
    assert seq_stats.decoder_batches == calls


@pytest.mark.parametrize("kind", KINDS)
def test_deep_cache_in_sdxl_img2img_and_inpainting(kind):
    from fcr_sample import DeepCacheConfig, apply_deep_cache, remove_deep_cache

    pipe, kw, calls = _build(kind)
    ref = sample_latents(pipe, steps=STEPS, **kw)
    one, _ = _cached(pipe, DeepCacheConfig(cache_interval=1), apply_deep_cache, remove_deep_cache, **kw)
    torch.testing.assert_close(one, ref, rtol=0, atol=1e-6)
    out, stats = _cached(pipe, DeepCacheConfig(cache_interval=3), apply_deep_cache, remove_deep_cache, **kw)
    full = len(range(0, calls, 3))
    assert stats.unet_calls == calls
    assert stats.full_forwards == full and stats.partial_forwards == calls - full
    assert (out - ref).abs().max() > 1e-4


def test_t2i_adapter_residuals_enter_the_cached_encoder():
    """The adapter runs once per call (diffusers runs it before the loop); its residuals enter the
    encoder at key steps, so stride 1 is exact and parallel equals sequential decoding."""
    from fcr_sample.testing import tiny_t2i_adapter_pipeline

    pipe = tiny_t2i_adapter_pipeline()
    kw = {"image": _image(pipe), "height": 32, "width": 32}
    ref = sample_latents(pipe, steps=STEPS, **kw)
    assert (ref - sample_latents(pipe, steps=STEPS, adapter_conditioning_scale=0.0, **kw)).abs().max() > 1e-3
    one, _ = _fd(pipe, EncoderCacheConfig(stride=1), **kw)
    torch.testing.assert_close(one, ref, rtol=0, atol=1e-6)
    seq, _ = _fd(pipe, EncoderCacheConfig(stride=5, parallel_decoding=False), **kw)
    par, stats = _fd(pipe, EncoderCacheConfig(stride=5), **kw)
    torch.testing.assert_close(par, seq, rtol=1e-4, atol=1e-4)
    assert (seq - ref).abs().max() > 1e-4 and stats.encoder_forwards == 2
