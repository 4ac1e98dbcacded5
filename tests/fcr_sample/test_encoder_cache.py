"""Encoder propagation inside an unmodified StableDiffusionPipeline call."""

import dataclasses

import pytest
import torch
from fcr_sample import (
    EncoderCacheConfig,
    apply_encoder_cache,
    decoder_groups,
    get_cache_stats,
    key_steps,
    remove_encoder_cache,
    reset_cache_stats,
    start_sampling_run,
)
from fcr_sample.testing import (
    SCHEDULER_NAMES as SCHEDULERS,  # DDIM, DPM++, Euler(-a), PNDM, UniPC, LCM
)
from fcr_sample.testing import sample_latents as sample
from fcr_sample.testing import tiny_sd_pipeline


def _with_cache(pipe, config, **kw):
    apply_encoder_cache(pipe, config)
    try:
        out = sample(pipe, **kw)
        stats = get_cache_stats(pipe)
    finally:
        remove_encoder_cache(pipe)
    return out, stats


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("guidance", [7.5, 1.0])  # CFG on / off
def test_stride_1_gives_the_same_images_as_no_cache(make_pipe, scheduler, guidance):
    pipe = make_pipe(scheduler)
    ref = sample(pipe, guidance=guidance)
    out, stats = _with_cache(pipe, EncoderCacheConfig(stride=1), guidance=guidance)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert stats.encoder_forwards == stats.unet_calls


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("guidance, batch", [(7.5, 1), (1.0, 1), (7.5, 3), (1.0, 3)])
def test_parallel_decoding_equals_sequential_encoder_propagation(
    make_pipe, scheduler, guidance, batch
):
    pipe = make_pipe(scheduler)
    ref = sample(pipe, guidance=guidance, batch=batch)
    seq, _ = _with_cache(
        pipe, EncoderCacheConfig(stride=4, parallel_decoding=False), guidance=guidance, batch=batch
    )
    par, _ = _with_cache(
        pipe, EncoderCacheConfig(stride=4, parallel_decoding=True), guidance=guidance, batch=batch
    )
    # batching reorders float sums; CFG (x7.5) amplifies that to ~1e-5
    torch.testing.assert_close(par, seq, rtol=1e-4, atol=1e-4)
    # and caching really changed the computation (otherwise the comparison proves nothing)
    assert (seq - ref).abs().max() > 1e-4


def test_parallel_batches_are_capped_and_still_exact(make_pipe):
    pipe = make_pipe()
    seq, _ = _with_cache(pipe, EncoderCacheConfig(stride=10, parallel_decoding=False), steps=12)
    capped, stats = _with_cache(pipe, EncoderCacheConfig(stride=10, max_parallel_steps=3), steps=12)
    torch.testing.assert_close(capped, seq, rtol=1e-4, atol=1e-4)
    assert stats.decoder_batches == len(decoder_groups([0, 10], 12, 3)) == 5


def test_remove_restores_bit_identical_behaviour(make_pipe):
    pipe = make_pipe()
    unet_forward = type(pipe.unet).forward
    ref = sample(pipe)
    hook = apply_encoder_cache(pipe, EncoderCacheConfig(stride=3, prior_noise_alpha=0.003))
    cached = sample(pipe, callback_on_step_end=hook.prior_noise_step_end)
    remove_encoder_cache(pipe)
    after = sample(pipe)
    assert not torch.equal(cached, ref)
    assert torch.equal(after, ref)
    assert "forward" not in pipe.unet.__dict__ and pipe.unet.forward.__func__ is unet_forward
    assert not hasattr(pipe.unet, "_diffusers_hook")
    assert "step" not in pipe.scheduler.__dict__


@pytest.mark.parametrize(
    "config, steps, batch, guidance",
    [
        (EncoderCacheConfig(stride=5), 20, 1, 7.5),
        (EncoderCacheConfig(stride=3, parallel_decoding=False), 10, 3, 7.5),
        (EncoderCacheConfig(stride=4, max_parallel_steps=2), 11, 2, 1.0),
        (EncoderCacheConfig(schedule="faster-diffusion"), 20, 1, 7.5),
        (EncoderCacheConfig(stride=10, always_key_first=3), 20, 1, 7.5),
        (EncoderCacheConfig(key_steps=(0, 4, 7)), 10, 1, 1.0),
    ],
)
def test_forward_counters_match_the_schedule_exactly(make_pipe, config, steps, batch, guidance):
    pipe = make_pipe()
    _, stats = _with_cache(pipe, config, steps=steps, batch=batch, guidance=guidance)
    keys = config.key_steps_for(steps)
    rows_per_step = batch * (2 if guidance > 1 else 1)
    assert stats.unet_calls == steps
    assert stats.full_forwards == stats.encoder_forwards == len(keys)
    assert stats.decoder_forwards == steps
    assert stats.decoder_rows == steps * rows_per_step
    if config.parallel_decoding:
        assert stats.decoder_batches == len(decoder_groups(keys, steps, config.max_parallel_steps))
    else:
        assert stats.decoder_batches == steps
    assert stats.runs == 1


def test_consecutive_calls_with_different_step_counts_reset_state(make_pipe):
    config = EncoderCacheConfig(stride=4)
    fresh_10, _ = _with_cache(make_pipe(), config, steps=10)
    fresh_7, _ = _with_cache(make_pipe(), config, steps=7, seed=3)

    pipe = make_pipe()
    apply_encoder_cache(pipe, config)
    first = sample(pipe, steps=10)
    second = sample(pipe, steps=7, seed=3)
    third = sample(pipe, steps=10)
    stats = get_cache_stats(pipe)
    torch.testing.assert_close(first, fresh_10, rtol=0, atol=0)
    torch.testing.assert_close(second, fresh_7, rtol=0, atol=0)
    torch.testing.assert_close(third, fresh_10, rtol=0, atol=0)
    assert stats.runs == 3
    assert stats.encoder_forwards == len(key_steps(10, stride=4)) * 2 + len(key_steps(7, stride=4))
    reset_cache_stats(pipe)
    assert get_cache_stats(pipe).unet_calls == 0


def test_a_scheduler_swapped_after_apply_is_followed(make_pipe):
    from diffusers import DPMSolverMultistepScheduler

    config = EncoderCacheConfig(stride=3, prior_noise_alpha=0.01, prior_noise_tau=0.9)
    ref_pipe = make_pipe("dpm++")
    hook = apply_encoder_cache(ref_pipe, config)
    ref = sample(ref_pipe, callback_on_step_end=hook.prior_noise_step_end)
    pipe = make_pipe("ddim")
    hook = apply_encoder_cache(pipe, config)
    sample(pipe, callback_on_step_end=hook.prior_noise_step_end)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(ref_pipe.scheduler.config)
    out = sample(pipe, callback_on_step_end=hook.prior_noise_step_end)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_heun_is_refused_with_a_clear_error(make_pipe):
    from diffusers import HeunDiscreteScheduler

    pipe = make_pipe()
    pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    apply_encoder_cache(pipe, EncoderCacheConfig(stride=2))
    with pytest.raises(NotImplementedError, match="order-2 scheduler"):
        sample(pipe, steps=4)


def _manual_loop(pipe, latents, steps, guidance, *, calls_per_step=1, prior_alpha=0.0):
    """A hand-written DDIM loop with CFG; optionally FD's prior noise injection."""
    sched, unet = pipe.scheduler, pipe.unet
    sched.set_timesteps(steps)
    pos, neg = pipe.encode_prompt("a photo of a shirt", "cpu", 1, True, None)
    text = torch.cat([neg, pos])
    start_sampling_run(unet, sched.timesteps)
    init = latents.clone()
    x = latents.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            if prior_alpha and t / 1000 < 0.5:
                x = x + prior_alpha * init
            if calls_per_step == 1:
                eps = unet(torch.cat([x, x]), t, encoder_hidden_states=text).sample
            else:  # separate unconditional and conditional passes
                eps = torch.cat(
                    [unet(x, t, encoder_hidden_states=t_).sample for t_ in text.chunk(2)]
                )
            u, c = eps.chunk(2)
            x = sched.step(u + guidance * (c - u), t, x).prev_sample
    return x


def test_bare_unet_loop_matches_pipeline_and_prior_noise_follows_fd():
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    cfg = dict(stride=4)
    pipe = tiny_sd_pipeline(seed=0)
    hook = apply_encoder_cache(pipe, EncoderCacheConfig(**cfg, prior_noise_alpha=0.003))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        via_pipe = pipe(
            "a photo of a shirt",
            num_inference_steps=12,
            guidance_scale=7.5,
            latents=latents.clone(),
            generator=g,
            output_type="latent",
            callback_on_step_end=hook.prior_noise_step_end,
        ).images
    manual = tiny_sd_pipeline(seed=0)
    apply_encoder_cache(manual.unet, EncoderCacheConfig(**cfg))
    by_hand = _manual_loop(manual, latents, 12, 7.5, prior_alpha=0.003)
    torch.testing.assert_close(via_pipe, by_hand, rtol=1e-4, atol=1e-4)
    no_prior = _manual_loop(manual, latents, 12, 7.5)
    assert (no_prior - by_hand).abs().max() > 1e-4  # the injection did something


def test_bare_unet_needs_a_run_and_refuses_two_calls_per_step():
    pipe = tiny_sd_pipeline(seed=0)
    apply_encoder_cache(pipe.unet, EncoderCacheConfig(stride=2))
    x = torch.randn(1, 4, 16, 16)
    with pytest.raises(RuntimeError, match="start_sampling_run"):
        pipe.unet(x, 10, encoder_hidden_states=torch.randn(1, 16, 8))
    with pytest.raises(RuntimeError, match="expects timestep"):
        _manual_loop(pipe, x, 6, 7.5, calls_per_step=2)
    remove_encoder_cache(pipe.unet)
    # a hand-written loop that does not run the injection is told so instead of ignoring alpha
    apply_encoder_cache(pipe.unet, EncoderCacheConfig(stride=2, prior_noise_alpha=0.003))
    with pytest.raises(RuntimeError, match="none ran after step 0: sample with fcr_sample.denoise"):
        _manual_loop(pipe, x, 6, 7.5)


def test_applying_twice_is_refused(make_pipe):
    pipe = make_pipe()
    apply_encoder_cache(pipe, EncoderCacheConfig(stride=2))
    with pytest.raises(ValueError, match="already applied"):
        apply_encoder_cache(pipe, EncoderCacheConfig(stride=3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(make_pipe, dtype):
    pipe = make_pipe()
    pipe.unet.to(dtype)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    text = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(1)).to(dtype)

    def loop(config):
        if config:
            apply_encoder_cache(pipe.unet, config)
        pipe.scheduler.set_timesteps(8)
        if config:
            start_sampling_run(pipe.unet, pipe.scheduler.timesteps)
        x = latents
        with torch.no_grad():
            for t in pipe.scheduler.timesteps:
                x = pipe.scheduler.step(
                    pipe.unet(x, t, encoder_hidden_states=text).sample, t, x
                ).prev_sample
        if config:
            remove_encoder_cache(pipe.unet)
        return x

    ref = loop(None)
    assert torch.equal(loop(EncoderCacheConfig(stride=1)), ref)
    seq = loop(EncoderCacheConfig(stride=4, parallel_decoding=False))
    par = loop(EncoderCacheConfig(stride=4))
    assert seq.dtype == dtype and torch.isfinite(par).all()
    torch.testing.assert_close(par.float(), seq.float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("scheduler", ["lcm", "unipc", "euler-a", "dpm++"])
@pytest.mark.parametrize(
    "steps, config",
    [
        (4, EncoderCacheConfig(stride=2)),
        (6, EncoderCacheConfig(key_steps=(0, 1, 3))),
        (8, EncoderCacheConfig(stride=3, always_key_first=2)),
    ],
)
def test_few_step_schedules(make_pipe, scheduler, steps, config):
    """The 4–8 step schedules the README recommends, on the few-step schedulers."""
    pipe = make_pipe(scheduler)
    ref = sample(pipe, steps=steps)
    seq, _ = _with_cache(pipe, dataclasses.replace(config, parallel_decoding=False), steps=steps)
    par, stats = _with_cache(pipe, config, steps=steps)
    torch.testing.assert_close(par, seq, rtol=1e-4, atol=1e-4)
    assert (par - ref).abs().max() > 1e-5
    keys = config.key_steps_for(steps)
    assert stats.unet_calls == steps and stats.encoder_forwards == len(keys)


def test_decoder_batches_are_sized_by_bytes_and_stay_exact(make_pipe):
    """A size cap splits a group's decoders into smaller batches; the images do not change."""
    from fcr_sample.encoder_cache import decoder_activation_bytes, parallel_steps_cap
    from fcr_sample.unet_parts import prepare_conditioning, run_encoder

    pipe = make_pipe()
    x, text = torch.randn(6, 4, 16, 16), torch.randn(6, 16, 8)  # batch 3 with CFG: 6 rows a step
    enc = run_encoder(pipe.unet, x, prepare_conditioning(pipe.unet, x, 500, text))
    per_step = decoder_activation_bytes(enc)
    assert per_step == 2 * 6 * 8 * 16 * 16 * 4  # conv_in's output, doubled, for 6 float32 rows
    assert parallel_steps_cap(EncoderCacheConfig(max_parallel_bytes=3 * per_step + 1), enc) == 3
    assert parallel_steps_cap(EncoderCacheConfig(max_parallel_bytes=1), enc) == 1
    assert parallel_steps_cap(EncoderCacheConfig(max_parallel_bytes=None, max_parallel_steps=None), enc) is None
    # "auto" on CPU: a large batch decodes step by step, a small one batches whole groups
    from fcr_sample.encoder_cache import PARALLEL_BYTES_AUTO

    assert parallel_steps_cap(EncoderCacheConfig(), enc) == min(10, PARALLEL_BYTES_AUTO["cpu"] // per_step)

    seq, _ = _with_cache(pipe, EncoderCacheConfig(stride=10, parallel_decoding=False), steps=12, batch=3)
    capped, stats = _with_cache(pipe, EncoderCacheConfig(stride=10, max_parallel_bytes=3 * per_step), steps=12,
                                batch=3)
    torch.testing.assert_close(capped, seq, rtol=1e-4, atol=1e-4)
    assert stats.decoder_batches == len(decoder_groups([0, 10], 12, 3)) == 5


def test_auto_size_cap_decodes_a_batch_over_the_device_budget_step_by_step(make_pipe, monkeypatch):
    from fcr_sample import encoder_cache

    per_step = 2 * 2 * 8 * 16 * 16 * 4  # batch 1 with CFG: 2 rows of conv_in's 8 × 16² floats
    monkeypatch.setitem(encoder_cache.PARALLEL_BYTES_AUTO, "cpu", per_step - 1)  # below one step
    _, stats = _with_cache(make_pipe(), EncoderCacheConfig(stride=5), steps=10)
    assert stats.encoder_forwards == 2 and stats.decoder_batches == 10  # sequential, by size
    monkeypatch.setitem(encoder_cache.PARALLEL_BYTES_AUTO, "cpu", 2 * per_step)
    _, stats = _with_cache(make_pipe(), EncoderCacheConfig(stride=5), steps=10)
    assert stats.decoder_batches == len(decoder_groups([0, 5], 10, 2)) == 6


def test_bad_max_parallel_bytes_is_refused():
    with pytest.raises(ValueError, match="max_parallel_bytes must be 'auto', None or a number of bytes"):
        EncoderCacheConfig(max_parallel_bytes="big")
