"""Paired per-sample metrics: cache error against the same weights' uncached sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from fcr_eval.metrics.paired import (
    cache_error,
    feature_l2,
    pixel_mse,
    psnr,
)
from fcr_eval.spec.vocabulary import CACHE_FEATURE_L2, CACHE_MSE, CACHE_PSNR, SAMPLE_METRICS
from fcr_sample import EncoderCacheConfig, apply_encoder_cache, denoise, remove_encoder_cache
from fcr_sample.testing import tiny_unet


def test_identical_inputs_give_exactly_zero():
    rng = np.random.default_rng(0)
    x = rng.random((4, 1, 8, 8))
    f = rng.normal(size=(4, 16))
    e = cache_error(x, x.copy(), cached_features=f, reference_features=f.copy())
    assert e[CACHE_MSE].tolist() == [0.0] * 4 and e[CACHE_FEATURE_L2].tolist() == [0.0] * 4
    assert np.isinf(e[CACHE_PSNR]).all() and (e[CACHE_PSNR] > 0).all()


def test_known_values_on_hand_made_arrays():
    ref = np.zeros((2, 1, 2, 2))
    cached = ref.copy()
    cached[0, 0, 0, 0] = 1.0        # one of 4 pixels off by 1: MSE 0.25
    cached[1] = 0.1                 # every pixel off by 0.1: MSE 0.01, PSNR 20 dB
    assert pixel_mse(cached, ref) == pytest.approx([0.25, 0.01])
    assert psnr(cached, ref) == pytest.approx([10 * np.log10(4), 20.0])
    assert psnr(cached * 255, ref, data_range=255) == pytest.approx([10 * np.log10(4), 20.0])
    assert feature_l2(np.array([[1.0, 2.0], [0.0, 0.0]]), np.array([[4.0, 6.0], [0.0, 1.0]])) == pytest.approx([5.0, 1.0])
    # Torch tensors work the same; the mean is per sample, not over the batch.
    assert pixel_mse(torch.from_numpy(cached).float(), torch.from_numpy(ref).float()) == pytest.approx([0.25, 0.01])


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="differ; pass the same samples"):
        pixel_mse(np.zeros((2, 1, 4, 4)), np.zeros((3, 1, 4, 4)))
    with pytest.raises(ValueError, match="NaN or inf"):
        pixel_mse(np.full((1, 2), np.nan), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="both cached_features and reference_features"):
        cache_error(np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 2, 2)), cached_features=np.zeros((1, 3)))
    with pytest.raises(ValueError, match="2 feature rows for 1 images"):
        cache_error(np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 2, 2)), cached_features=np.zeros((2, 3)),
                    reference_features=np.zeros((2, 3)))
    assert {CACHE_MSE, CACHE_PSNR, CACHE_FEATURE_L2, "class_correct", "class_logprob"} <= set(SAMPLE_METRICS)
    assert SAMPLE_METRICS[CACHE_MSE].needs_reference and not SAMPLE_METRICS[CACHE_MSE].higher_is_better


@torch.no_grad()
def test_cache_error_of_samplers_zero_uncached_tiny_at_stride_1_and_grows_with_stride():
    unet = tiny_unet(0)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(3, 4, 16, 16, generator=g)
    cond = torch.randn(3, 5, 8, generator=g)

    def sample(stride=None):
        if stride is not None:
            apply_encoder_cache(unet, EncoderCacheConfig(stride=stride))
        try:
            return denoise(unet, DDIMScheduler(), x_T, cond, steps=10)
        finally:
            if stride is not None:
                remove_encoder_cache(unet)

    ref = sample()
    assert cache_error(sample(), ref)[CACHE_MSE].tolist() == [0.0] * 3  # the uncached sampler is exact
    assert cache_error(sample(1), ref)[CACHE_MSE].max() <= 1e-6        # every step a key step
    e5 = cache_error(sample(5), ref)[CACHE_MSE]
    assert (e5 > 1e-6).all()
