"""fcr_sample.denoise, the bare-UNet loop the project's samplers share."""

from __future__ import annotations

import pytest
import torch
from fcr_sample import (
    EncoderCacheConfig,
    apply_encoder_cache,
    denoise,
    get_cache_stats,
    remove_encoder_cache,
)
from fcr_sample.testing import SCHEDULER_NAMES

#: The schedulers the package README names ("DDIM, DPM-Solver++ (multistep), Euler,
#: Euler-ancestral, PNDM, UniPC and LCM"), by their tiny_scheduler names.
README_SCHEDULERS = ("ddim", "dpm++", "euler", "euler-a", "pndm", "unipc", "lcm")


def test_every_readme_scheduler_is_tested():
    assert set(README_SCHEDULERS) == set(SCHEDULER_NAMES)


@pytest.mark.parametrize("scheduler", README_SCHEDULERS)
def test_denoise_equals_the_pipeline_with_every_readme_scheduler(make_pipe, denoise_inputs, scheduler):
    """denoise runs each scheduler the README lists (PNDM's and UniPC's step take no generator) and
    gives the pipeline's latents, with a generator for the stochastic ones, without a cache and
    with FD-2 (keys at every other UNet call: PNDM's 4 steps are 5 calls)."""
    pipe = make_pipe(scheduler)
    x_T, cond, null = denoise_inputs(pipe)

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            ours = denoise(pipe.unet, pipe.scheduler, x_T, cond, null, steps=4, guidance_scale=5.0,
                           generator=torch.Generator().manual_seed(7))
            ref = pipe(prompt_embeds=cond, negative_prompt_embeds=null, latents=x_T.clone(), num_inference_steps=4,
                       guidance_scale=5.0, output_type="latent", generator=torch.Generator().manual_seed(7)).images
        return ours, ref

    ours, ref = both()
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    apply_encoder_cache(pipe.unet, EncoderCacheConfig(stride=2))
    try:
        cached, cached_ref = both()
        forwards = get_cache_stats(pipe.unet).encoder_forwards
    finally:
        remove_encoder_cache(pipe.unet)
    torch.testing.assert_close(cached, cached_ref, atol=1e-5, rtol=0)
    calls = len(pipe.scheduler.timesteps)
    assert forwards == 2 * len(range(0, calls, 2))  # denoise's run and the pipeline's
    assert not torch.equal(cached, ours)  # the cache did change the run


def test_denoise_equals_the_pipeline(make_pipe, denoise_inputs):
    pipe = make_pipe("dpm++")
    x_T, cond, null = denoise_inputs(pipe)
    with torch.no_grad():
        ours = denoise(pipe.unet, pipe.scheduler, x_T, cond, null, steps=6, guidance_scale=5.0)
        ref = pipe(prompt_embeds=cond, negative_prompt_embeds=null, latents=x_T.clone(), num_inference_steps=6,
                   guidance_scale=5.0, output_type="latent").images
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_denoise_announces_the_run_to_a_cache_on_a_bare_unet(make_pipe, denoise_inputs):
    pipe = make_pipe()
    x_T, cond, null = denoise_inputs(pipe)
    apply_encoder_cache(pipe.unet, EncoderCacheConfig(stride=3))
    try:
        with torch.no_grad():
            for steps in (6, 9):  # consecutive runs with different lengths: each one announced
                denoise(pipe.unet, pipe.scheduler, x_T, cond, null, steps=steps, guidance_scale=5.0)
        assert get_cache_stats(pipe.unet).encoder_forwards == 2 + 3
    finally:
        remove_encoder_cache(pipe.unet)


def test_guidance_needs_the_unconditional_states(make_pipe, denoise_inputs):
    pipe = make_pipe()
    x_T, cond, _ = denoise_inputs(pipe)
    with pytest.raises(ValueError, match="unconditional"):
        denoise(pipe.unet, pipe.scheduler, x_T, cond, steps=2, guidance_scale=3.0)
