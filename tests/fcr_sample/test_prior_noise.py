"""Prior noise injection through step callbacks: denoise, bare-UNet caches and pipelines.

Nothing on the scheduler is patched: every test checks, from inside the sampling loop, that the
scheduler's ``step`` is still its class's method.
"""

from __future__ import annotations

import pytest
import torch
from fcr_sample import (
    EncoderCacheConfig,
    apply_encoder_cache,
    denoise,
    prior_noise_callback,
    remove_encoder_cache,
    start_sampling_run,
)

ALPHA, TAU = 0.01, 0.6  # larger than FD's 0.003 so that the effect is far above float noise



def _assert_unpatched(scheduler):
    assert "step" not in vars(scheduler)
    assert type(scheduler).step is scheduler.step.__func__


def _reference_loop(pipe, x_T, cond, null, steps, guidance, alpha):
    """FD's injection written out: z_t += α·z_T before the UNet call at t when t/T < τ."""
    sched, unet = pipe.scheduler, pipe.unet
    sched.set_timesteps(steps)
    z_T = x_T * sched.init_noise_sigma
    x = z_T
    T = sched.config.num_train_timesteps
    for t in sched.timesteps:
        if alpha and float(t) / T < TAU:
            x = x + alpha * z_T
        inp = sched.scale_model_input(x, t)
        u, c = unet(torch.cat([inp, inp]), t, torch.cat([null, cond])).sample.chunk(2)
        x = sched.step(u + guidance * (c - u), t, x).prev_sample
    return x


def _denoise(pipe, x_T, cond, null, steps=8, **kw):
    with torch.no_grad():
        return denoise(pipe.unet, pipe.scheduler, x_T, cond, null, steps=steps, guidance_scale=5.0, **kw)


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])  # euler: init_noise_sigma != 1
def test_prior_noise_callback_equals_the_hand_written_injection(make_pipe, denoise_inputs, scheduler):
    pipe = make_pipe(scheduler)
    x_T, cond, null = denoise_inputs(pipe)
    with torch.no_grad():
        ref = _reference_loop(pipe, x_T, cond, null, 8, 5.0, ALPHA)
        plain = _reference_loop(pipe, x_T, cond, null, 8, 5.0, 0.0)
    ours = _denoise(pipe, x_T, cond, null, callback=prior_noise_callback(ALPHA, TAU))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    assert (ours - plain).abs().max() > 1e-3


def test_cache_config_alpha_runs_on_a_bare_unet_in_denoise(make_pipe, denoise_inputs):
    """The fcr-eval runner's loop: apply_encoder_cache(unet, config) then denoise(unet, ...)."""
    pipe = make_pipe()
    x_T, cond, null = denoise_inputs(pipe)
    seen = []

    def observe(info):
        _assert_unpatched(pipe.scheduler)
        seen.append(info["i"])

    outs = {}
    for alpha in (0.0, ALPHA):
        apply_encoder_cache(pipe.unet, EncoderCacheConfig(stride=3, prior_noise_alpha=alpha, prior_noise_tau=TAU))
        try:
            outs[alpha] = _denoise(pipe, x_T, cond, null, callback=observe)
        finally:
            remove_encoder_cache(pipe.unet)
    assert seen == list(range(8)) * 2
    # the reference: the same cache without alpha, the injection written out in the loop
    apply_encoder_cache(pipe.unet, EncoderCacheConfig(stride=3))
    try:
        with torch.no_grad():
            pipe.scheduler.set_timesteps(8)
            start_sampling_run(pipe.unet, pipe.scheduler.timesteps)
            ref = _reference_loop(pipe, x_T, cond, null, 8, 5.0, ALPHA)
    finally:
        remove_encoder_cache(pipe.unet)
    torch.testing.assert_close(outs[ALPHA], ref, rtol=0, atol=1e-5)
    assert (outs[ALPHA] - outs[0.0]).abs().max() > 1e-3


def test_alpha_zero_and_a_no_op_callback_change_nothing(make_pipe, denoise_inputs):
    pipe = make_pipe("dpm++")
    x_T, cond, null = denoise_inputs(pipe)
    apply_encoder_cache(pipe.unet, EncoderCacheConfig(stride=3))
    try:
        before = _denoise(pipe, x_T, cond, null)
        with_cb = _denoise(pipe, x_T, cond, null, callback=lambda info: None)
        zero = _denoise(pipe, x_T, cond, null, callback=prior_noise_callback(0.0, TAU))
    finally:
        remove_encoder_cache(pipe.unet)
    assert torch.equal(before, with_cb) and torch.equal(before, zero)


def test_callback_sees_the_step_and_its_return_value_replaces_the_state(make_pipe, denoise_inputs):
    pipe = make_pipe()
    x_T, cond, null = denoise_inputs(pipe)
    infos = []

    def zero_last(info):
        infos.append({k: info[k] for k in ("i", "t", "t_next")})
        assert torch.equal(info["x_T"], x_T) and info["denoised"] is not None
        return torch.zeros_like(info["x"]) if info["t_next"] is None else None

    out = _denoise(pipe, x_T, cond, null, steps=4, callback=zero_last)
    ts = pipe.scheduler.timesteps
    assert [d["i"] for d in infos] == [0, 1, 2, 3]
    assert [int(d["t"]) for d in infos] == ts.tolist()
    assert [None if d["t_next"] is None else int(d["t_next"]) for d in infos] == ts.tolist()[1:] + [None]
    assert torch.equal(out, torch.zeros_like(out))
    with pytest.raises(ValueError, match="must return None or a tensor of the state's shape"):
        _denoise(pipe, x_T, cond, null, steps=2, callback=lambda info: info["x"][:1])


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_pipeline_injection_through_callback_on_step_end_matches_denoise(make_pipe, denoise_inputs, scheduler):
    pipe = make_pipe(scheduler)
    x_T, cond, null = denoise_inputs(pipe)
    config = EncoderCacheConfig(stride=3, prior_noise_alpha=ALPHA, prior_noise_tau=TAU)
    hook = apply_encoder_cache(pipe, config)

    def step_end(p, i, t, kwargs):
        _assert_unpatched(p.scheduler)
        return hook.prior_noise_step_end(p, i, t, kwargs)

    try:
        with torch.no_grad():
            via_pipe = pipe(prompt_embeds=cond, negative_prompt_embeds=null, latents=x_T.clone(),
                            num_inference_steps=8, guidance_scale=5.0, output_type="latent",
                            callback_on_step_end=step_end).images
            with pytest.raises(RuntimeError, match="callback_on_step_end=hook.prior_noise_step_end"):
                pipe(prompt_embeds=cond, negative_prompt_embeds=null, num_inference_steps=8,
                     output_type="latent")
        via_denoise = _denoise(pipe, x_T, cond, null)  # the same hook, now through denoise
    finally:
        remove_encoder_cache(pipe)
    # The pipeline and denoise batch the CFG rows differently, so float32 sums differ in order:
    # latents of magnitude ~50 then differ by ~1e-5 absolute (2e-7 relative) on some machines.
    torch.testing.assert_close(via_pipe, via_denoise, rtol=1e-6, atol=1e-5)
    _assert_unpatched(pipe.scheduler)
