"""Cache configs are checked against the sampling run when it starts, as ``fcr-eval plan`` checks
them in an experiment: a stride (DeepCache interval) larger than the run's steps is a clear
ValueError naming both, raised before the UNet runs; a stride equal to the steps (one key step)
samples as before, and a refused run leaves the cache usable for the next one."""

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
    start_sampling_run,
)
from fcr_sample.testing import sample_latents as sample


def _cached(pipe, apply, remove, config, **kw):
    apply(pipe, config)
    try:
        return sample(pipe, **kw), get_cache_stats(pipe)
    finally:
        remove(pipe)


@pytest.mark.parametrize("apply, remove, config, phrase", [
    (apply_encoder_cache, remove_encoder_cache, EncoderCacheConfig(stride=50),
     "EncoderCacheConfig.stride = 50 is larger than this sampling run's 5 steps"),
    (apply_deep_cache, remove_deep_cache, DeepCacheConfig(cache_interval=50),
     "DeepCacheConfig.cache_interval = 50 is larger than this sampling run's 5 steps"),
    (apply_deep_cache, remove_deep_cache, DeepCacheConfig(cache_interval=6, skip_mode="non-uniform"),
     "DeepCacheConfig.cache_interval = 6 is larger than this sampling run's 5 steps"),
], ids=["fd-stride", "deepcache-interval", "deepcache-nonuniform-interval"])
def test_a_config_longer_than_the_run_is_refused_at_its_first_unet_call(make_pipe, apply, remove, config, phrase):
    pipe = make_pipe()
    hook = apply(pipe, config)
    try:
        with pytest.raises(ValueError, match=phrase):
            sample(pipe, steps=5)
        assert hook.stats.unet_calls == 0 and hook.stats.runs == 0  # refused before the UNet ran
    finally:
        remove(pipe)


def test_a_stride_equal_to_the_steps_is_one_key_step(make_pipe):
    pipe = make_pipe()
    one_key, stats = _cached(pipe, apply_encoder_cache, remove_encoder_cache, EncoderCacheConfig(stride=5), steps=5)
    explicit, _ = _cached(pipe, apply_encoder_cache, remove_encoder_cache, EncoderCacheConfig(key_steps=(0,)), steps=5)
    assert stats.unet_calls == 5 and stats.encoder_forwards == 1
    torch.testing.assert_close(one_key, explicit, rtol=0, atol=0)
    _, dc = _cached(pipe, apply_deep_cache, remove_deep_cache, DeepCacheConfig(cache_interval=5), steps=5)
    assert dc.unet_calls == 5 and dc.full_forwards == 1


def test_a_refused_run_leaves_the_cache_ready_for_the_next(make_pipe):
    config = EncoderCacheConfig(stride=4)
    fresh, _ = _cached(make_pipe(), apply_encoder_cache, remove_encoder_cache, config, steps=8)
    pipe = make_pipe()
    apply_encoder_cache(pipe, config)
    with pytest.raises(ValueError, match="stride = 4 is larger than this sampling run's 3 steps"):
        sample(pipe, steps=3)
    again = sample(pipe, steps=8)
    stats = get_cache_stats(pipe)
    remove_encoder_cache(pipe)
    torch.testing.assert_close(again, fresh, rtol=0, atol=0)
    assert stats.runs == 1 and stats.unet_calls == 8 and stats.encoder_forwards == 2


def test_bare_unet_runs_are_checked_before_the_loop(make_pipe, denoise_inputs):
    pipe = make_pipe()
    pipe.scheduler.set_timesteps(5)
    hook = apply_encoder_cache(pipe.unet, EncoderCacheConfig(stride=6))
    try:
        with pytest.raises(ValueError, match="stride = 6 is larger than this sampling run's 5 steps"):
            start_sampling_run(pipe.unet, pipe.scheduler.timesteps)
        x_T, cond, null = denoise_inputs(pipe, batch=1)
        with pytest.raises(ValueError, match="stride = 6 is larger than this sampling run's 5 steps"):
            denoise(pipe.unet, pipe.scheduler, x_T, cond, null, steps=5, guidance_scale=2.0)
        assert hook.stats.unet_calls == 0
    finally:
        remove_encoder_cache(pipe.unet)


def test_explicit_key_steps_past_the_run_are_refused_at_its_start(make_pipe):
    pipe = make_pipe()
    apply_encoder_cache(pipe, EncoderCacheConfig(key_steps=(0, 7)))
    try:
        with pytest.raises(ValueError, match="key step 7 is out of range for 5 steps"):
            sample(pipe, steps=5)
        assert get_cache_stats(pipe).unet_calls == 0
    finally:
        remove_encoder_cache(pipe)
