"""Calibrated schedules: measured from an uncached run, saved with the model's identity, refused elsewhere."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from fcr_sample import (
    CalibratedSchedule,
    DeepCacheConfig,
    EncoderCacheConfig,
    ScheduleMismatchError,
    apply_deep_cache,
    calibrate_schedule,
    get_cache_stats,
    remove_deep_cache,
    remove_encoder_cache,
)
from fcr_sample.calibration import best_full_steps
from fcr_sample.testing import sample_latents, tiny_sd_pipeline, tiny_sdxl_pipeline

STEPS = 10
PROMPTS = ["a photo of a shirt", "a photo of a shoe"]
REMOVE = {"deepcache": remove_deep_cache, "fd": remove_encoder_cache}


def _calibrate(pipe, cache, budget, **kw):
    return calibrate_schedule(pipe, cache, budget, prompts=PROMPTS, num_inference_steps=STEPS, **kw)


def _served(pipe, sched, **kw):
    sched.apply(pipe)
    try:
        return sample_latents(pipe, steps=STEPS, batch=2, **kw), get_cache_stats(pipe)
    finally:
        REMOVE[sched.cache](pipe)


@pytest.mark.parametrize("cache", ["deepcache", "fd"])
def test_every_step_a_key_step_is_the_uncached_sampler(make_pipe, cache):
    pipe = make_pipe()
    ref = sample_latents(pipe, steps=STEPS, batch=2)
    sched = _calibrate(pipe, cache, STEPS)
    assert sched.steps == tuple(range(STEPS)) and sched.served_change == 0
    out, stats = _served(pipe, sched)
    assert torch.equal(out, ref) and stats.full_forwards == STEPS


@pytest.mark.parametrize("cache", ["deepcache", "fd"])
def test_a_calibrated_budget_runs_that_many_full_steps(make_pipe, cache):
    pipe = make_pipe()
    sched = _calibrate(pipe, cache, 4)
    assert len(sched.steps) == 4 and sched.steps[0] == 0 and sched.num_steps == STEPS
    assert sched.uniform_change is not None and sched.served_change <= sched.uniform_change + 1e-12
    out, stats = _served(pipe, sched)
    assert stats.full_forwards == stats.encoder_forwards == 4
    assert isinstance(sched.config(), DeepCacheConfig if cache == "deepcache" else EncoderCacheConfig)
    assert sched.config().key_steps_for(STEPS) == list(sched.steps)


def test_the_programme_finds_the_best_schedule():
    g = torch.Generator().manual_seed(0)
    n = 7
    change = torch.rand(n, n, generator=g).triu(1)
    for budget in range(1, n + 1):
        steps, cost = best_full_steps(change, budget)
        brute = min(
            (sum(float(change[max(k for k in (0, *rest) if k <= j), j]) for j in range(n)), (0, *rest))
            for rest in itertools.combinations(range(1, n), budget - 1)
        )
        assert cost == pytest.approx(brute[0]) and steps == brute[1]


def test_save_load_and_refusals(tmp_path, make_pipe):
    pipe = make_pipe()
    sched = _calibrate(pipe, "deepcache", 4)
    path = sched.save(tmp_path / "s.json")
    assert CalibratedSchedule.load(path, pipe, num_steps=STEPS) == sched
    with pytest.raises(ScheduleMismatchError, match="is for 10 steps, not 20"):
        CalibratedSchedule.load(path, pipe, num_steps=20)
    other_weights = tiny_sd_pipeline(seed=1)
    with pytest.raises(ScheduleMismatchError, match="measured on another UNet"):
        CalibratedSchedule.load(path, other_weights)
    with pytest.raises(ScheduleMismatchError, match="measured on another UNet"):
        sched.apply(other_weights)  # refused before any hook is attached
    assert not hasattr(other_weights.unet, "_diffusers_hook")
    euler = tiny_sd_pipeline(seed=0, scheduler="euler")
    with pytest.raises(ScheduleMismatchError, match="measured with DDIMScheduler, not EulerDiscreteScheduler"):
        CalibratedSchedule.load(path, euler)
    data = json.loads(path.read_text())
    (tmp_path / "bad.json").write_text(json.dumps({**data, "format": "something else"}))
    with pytest.raises(ValueError, match="is not a calibrated schedule"):
        CalibratedSchedule.load(tmp_path / "bad.json")
    (tmp_path / "steps.json").write_text(json.dumps({**data, "steps": [1, 3]}))
    with pytest.raises(ValueError, match="inconsistent calibrated schedule"):
        CalibratedSchedule.load(tmp_path / "steps.json")


def test_bad_arguments_are_clear_errors(make_pipe):
    pipe = make_pipe()
    with pytest.raises(ValueError, match="budget = 11 full steps is more than the 10 steps"):
        _calibrate(pipe, "fd", 11)
    with pytest.raises(ValueError, match="budget must be a number of full steps >= 1"):
        _calibrate(pipe, "fd", 0)
    with pytest.raises(ValueError, match="unknown cache 'tgate'"):
        _calibrate(pipe, "tgate", 3)
    with pytest.raises(ValueError, match="needs prompts="):
        calibrate_schedule(pipe, "fd", 3)
    with pytest.raises(ValueError, match="needs run="):
        calibrate_schedule(pipe.unet, "fd", 3)
    apply_deep_cache(pipe)
    with pytest.raises(ValueError, match="remove the cache"):
        _calibrate(pipe, "fd", 3)
    remove_deep_cache(pipe)
    with pytest.raises(ValueError, match="full_steps must include step 0"):
        DeepCacheConfig(full_steps=(2, 5))
    with pytest.raises(ValueError, match="key step 12 is out of range for 10 steps"):
        DeepCacheConfig(full_steps=(0, 12)).full_steps_for_run(STEPS)


@pytest.mark.parametrize("cache", ["deepcache", "fd"])
def test_sdxl(cache):
    pipe = tiny_sdxl_pipeline()
    ref = sample_latents(pipe, steps=STEPS, batch=2)
    sched = _calibrate(pipe, cache, 3)
    out, stats = _served(pipe, sched)
    assert stats.full_forwards == 3 and (out - ref).abs().max() > 1e-5


@pytest.mark.parametrize("cache", ["deepcache", "fd"])
def test_calibration_by_the_propagated_error(make_pipe, denoise_inputs, cache):
    from fcr_sample import calibrate_schedule_from_error
    from fcr_sample.attribution import propagated_error_matrix

    pipe = make_pipe()
    x_T, cond, null = denoise_inputs(pipe)
    config = DeepCacheConfig() if cache == "deepcache" else EncoderCacheConfig()
    kw = dict(steps=6, guidance_scale=5.0)
    exact = propagated_error_matrix(pipe.unet, pipe.scheduler, x_T, cond, null, cache=config, exact=True, **kw)
    linear = propagated_error_matrix(pipe.unet, pipe.scheduler, x_T, cond, null, cache=config, **kw)
    steps = range(1, 6)
    # serving step j from j - 1 is replayed in both; the other pairs are replayed only when exact
    assert torch.allclose(exact.diagonal(1), linear.diagonal(1)) and (exact.diagonal(1) > 0).all()
    assert torch.equal(exact.tril(), torch.zeros(6, 6, dtype=exact.dtype))
    assert all(exact[0, j] > 0 and linear[0, j] > 0 for j in steps)
    scheds = calibrate_schedule_from_error(pipe.unet, pipe.scheduler, x_T, cond, null, cache=cache,
                                           budget=[2, 6], **kw)
    assert [len(s.steps) for s in scheds] == [2, 6] and scheds[1].steps == tuple(range(6))
    assert scheds[0].objective == "propagated_error"
    assert scheds[0].served_change > 0 and scheds[1].served_change == 0
    with pytest.raises(ValueError, match="budget = 7 full steps does not fit a run of 6 steps"):
        calibrate_schedule_from_error(pipe.unet, pipe.scheduler, x_T, cond, null, cache=cache, budget=7, **kw)
