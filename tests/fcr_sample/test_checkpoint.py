"""A real Stable Diffusion checkpoint (marker ``checkpoint``, deselected by ``./run.sh test``):
``FCR_SD_CHECKPOINT=/path/to/sd-v1-5 uv run pytest -m checkpoint tests/fcr_sample/test_checkpoint.py``
with a local diffusers folder (``hf download stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir
DIR``). Without the variable the test fails saying so: selecting it says a checkpoint is there."""

from __future__ import annotations

import os

import pytest
import torch
from fcr_sample import (
    EncoderCacheConfig,
    apply_encoder_cache,
    get_cache_stats,
    load_pipeline,
    remove_encoder_cache,
)

pytestmark = pytest.mark.checkpoint


def test_fd10_on_a_real_checkpoint_skips_the_encoder_and_stays_near_the_uncached_image():
    path = os.environ.get("FCR_SD_CHECKPOINT")
    if not path:
        pytest.fail("marked checkpoint: set FCR_SD_CHECKPOINT to a local diffusers Stable Diffusion folder")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = load_pipeline(path, torch_dtype=dtype, device=device, local_files_only=True)
    kw = dict(prompt=["a photo of a red bicycle"], num_inference_steps=20, guidance_scale=7.5, output_type="np")
    plain = pipe(generator=torch.Generator(device).manual_seed(0), **kw).images
    apply_encoder_cache(pipe, EncoderCacheConfig(stride=10))
    cached = pipe(generator=torch.Generator(device).manual_seed(0), **kw).images
    stats = get_cache_stats(pipe)
    remove_encoder_cache(pipe)
    assert stats.encoder_forwards == 2 and stats.unet_calls == 20
    mse = float(((cached - plain) ** 2).mean())
    assert 0 < mse < 0.05, mse  # a cache changes the image, but not into another image
