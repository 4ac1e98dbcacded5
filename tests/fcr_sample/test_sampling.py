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
