"""The adaptive cache: refresh decided per step from conv_in's accumulated relative change."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from fcr_sample import (
    AdaptiveCacheConfig,
    apply_adaptive_cache,
    apply_deep_cache,
    denoise,
    get_cache_stats,
    remove_adaptive_cache,
)
from fcr_sample.adaptive import RefreshSignal
from fcr_sample.testing import sample_latents, tiny_controlnet_pipeline

STEPS = 10
CACHES = ["deepcache", "fd"]


def _adaptive(pipe, config, **kw):
    hook = apply_adaptive_cache(pipe, config)
    try:
        return sample_latents(pipe, steps=STEPS, batch=2, **kw), get_cache_stats(pipe), list(hook.signal.refresh_steps)
    finally:
        remove_adaptive_cache(pipe)


@pytest.mark.parametrize("cache", CACHES)
def test_threshold_0_is_the_uncached_sampler_exactly(make_pipe, cache):
    pipe = make_pipe()
    ref = sample_latents(pipe, steps=STEPS, batch=2)  # CFG on (guidance 7.5)
    out, stats, refreshed = _adaptive(pipe, AdaptiveCacheConfig(threshold=0, cache=cache))
    assert torch.equal(out, ref)
    assert refreshed == list(range(STEPS)) and stats.full_forwards == STEPS


@pytest.mark.parametrize("cache", CACHES)
def test_counters_match_the_refreshed_steps(make_pipe, cache):
    pipe = make_pipe()
    ref = sample_latents(pipe, steps=STEPS, batch=2)
    out, stats, refreshed = _adaptive(pipe, AdaptiveCacheConfig(threshold=0.3, cache=cache))
    assert refreshed[0] == 0 and 1 < len(refreshed) < STEPS  # some steps served, not all
    assert stats.unet_calls == STEPS and stats.runs == 1
    assert stats.full_forwards == stats.encoder_forwards == len(refreshed)
    if cache == "deepcache":
        assert stats.partial_forwards == STEPS - len(refreshed)
    else:  # sequential decoding at every step: adaptive FD has no parallel decoding
        assert stats.decoder_forwards == stats.decoder_batches == STEPS and stats.partial_forwards == 0
    assert (out - ref).abs().max() > 1e-5


@pytest.mark.parametrize("cache", CACHES)
def test_state_resets_between_calls(make_pipe, cache):
    pipe = make_pipe()
    hook = apply_adaptive_cache(pipe, AdaptiveCacheConfig(threshold=0.3, cache=cache))
    try:
        first = sample_latents(pipe, steps=STEPS, batch=2)
        steps_first = list(hook.signal.refresh_steps)
        other = sample_latents(pipe, steps=6, batch=1, seed=5)  # another length and batch in between
        assert hook.signal.refresh_steps[0] == 0 and max(hook.signal.refresh_steps) < 6
        again = sample_latents(pipe, steps=STEPS, batch=2)
        assert torch.equal(first, again) and hook.signal.refresh_steps == steps_first
        assert other.shape[0] == 1 and get_cache_stats(pipe).runs == 3
    finally:
        remove_adaptive_cache(pipe)


def test_a_batch_refreshes_when_any_sample_reaches_the_threshold():
    unet = SimpleNamespace(config=SimpleNamespace(center_input_sample=False), conv_in=torch.nn.Identity())
    signal = RefreshSignal(AdaptiveCacheConfig(threshold=0.25))
    decisions = []
    for s in range(8):
        x = torch.ones(2, 1, 2, 2)
        x[1] *= 1.1**s  # sample 1 changes by 10 % a step, sample 0 never
        decisions.append(signal.decide(unet, x, s))
    assert signal.refresh_steps == [0, 3, 6]  # 0.1 + 0.1 + 0.1 >= 0.25 at the third step after a refresh
    assert decisions == [s in (0, 3, 6) for s in range(8)]


def test_max_cached_steps_caps_a_flat_signal(make_pipe):
    pipe = make_pipe()
    _, stats, refreshed = _adaptive(pipe, AdaptiveCacheConfig(threshold=1e9, max_cached_steps=2))
    assert refreshed == [0, 3, 6, 9] and stats.full_forwards == 4


def test_removal_restores_the_exact_unet(make_pipe):
    pipe = make_pipe()
    ref = sample_latents(pipe, steps=STEPS)
    forward = pipe.unet.forward
    for cache in CACHES:
        _adaptive(pipe, AdaptiveCacheConfig(threshold=0.5, cache=cache))
        assert not hasattr(pipe.unet, "_diffusers_hook")
        assert all(not hasattr(m, "_diffusers_hook") for m in pipe.unet.modules())
    assert torch.equal(sample_latents(pipe, steps=STEPS), ref) and pipe.unet.forward == forward


def test_bare_unet_in_denoise(make_pipe, denoise_inputs):
    pipe = make_pipe()
    x_T, cond, null = denoise_inputs(pipe)
    ref = denoise(pipe.unet, pipe.scheduler, x_T, cond, null, steps=STEPS, guidance_scale=5.0)
    hook = apply_adaptive_cache(pipe.unet, AdaptiveCacheConfig(threshold=0))
    try:
        out = denoise(pipe.unet, pipe.scheduler, x_T, cond, null, steps=STEPS, guidance_scale=5.0)
    finally:
        remove_adaptive_cache(pipe.unet)
    assert torch.equal(out, ref) and hook.signal.refresh_steps == list(range(STEPS))


# -- the pipelines people deploy ----------------------------------------------------------------


def _pipeline(kind: str):
    from diffusers import StableDiffusionImg2ImgPipeline
    from fcr_sample.testing import tiny_sd_pipeline, tiny_sdxl_pipeline

    if kind == "sdxl":
        return tiny_sdxl_pipeline(), {}, STEPS
    if kind == "img2img":
        pipe = tiny_sd_pipeline(pipeline_class=StableDiffusionImg2ImgPipeline)
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(3))
        return pipe, {"image": image, "strength": 0.5}, 5
    pipe = tiny_controlnet_pipeline()
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return pipe, {"image": torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(7))}, STEPS


@pytest.mark.parametrize("kind", ["sdxl", "img2img", "controlnet"])
@pytest.mark.parametrize("cache", CACHES)
def test_sdxl_img2img_and_controlnet_pipelines(kind, cache):
    pipe, kw, calls = _pipeline(kind)
    ref = sample_latents(pipe, steps=STEPS, batch=2, **kw)
    exact, stats0, _ = _adaptive(pipe, AdaptiveCacheConfig(threshold=0, cache=cache), **kw)
    assert torch.equal(exact, ref) and stats0.full_forwards == stats0.unet_calls == calls
    out, stats, refreshed = _adaptive(pipe, AdaptiveCacheConfig(threshold=0.3, cache=cache), **kw)
    assert stats.unet_calls == calls and stats.full_forwards == len(refreshed) < calls
    assert torch.isfinite(out).all() and (out - ref).abs().max() > 1e-5


def test_bad_arguments_are_clear_errors(make_pipe):
    with pytest.raises(ValueError, match="threshold must be a number >= 0"):
        AdaptiveCacheConfig(threshold=-0.1)
    with pytest.raises(ValueError, match="threshold must be a number >= 0"):
        AdaptiveCacheConfig(threshold=float("nan"))
    with pytest.raises(ValueError, match="unknown adaptive cache 'tgate'"):
        AdaptiveCacheConfig(cache="tgate")
    with pytest.raises(ValueError, match="max_cached_steps must be an integer >= 1"):
        AdaptiveCacheConfig(max_cached_steps=0)
    pipe = make_pipe()
    with pytest.raises(ValueError, match="cache_branch_id=30 names block 10"):
        apply_adaptive_cache(pipe, AdaptiveCacheConfig(cache_branch_id=30))
    apply_deep_cache(pipe)
    with pytest.raises(ValueError, match="already applied"):
        apply_adaptive_cache(pipe)


def test_labels():
    assert AdaptiveCacheConfig(threshold=0.2).label == "Adaptive-DeepCache-b0-t0.2"
    assert AdaptiveCacheConfig(threshold=0.05, cache="fd", max_cached_steps=4).label == "Adaptive-FD-t0.05-m4"
