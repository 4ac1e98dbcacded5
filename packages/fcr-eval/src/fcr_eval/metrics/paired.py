"""Paired per-sample metrics: what one cached sample lost against its own uncached twin.

Every variation of one weights and seed starts from the same x_T and prompt, so a cached sample
has an exact reference: the *same weights'* uncached sample from that x_T and prompt. The
distance between the two — the **cache error** — isolates what the cache did, with far less
variance than a set-level metric (design.md §5, "Sample sizes"). It is exactly 0 for the
uncached sampler itself and for any cache that reproduces the uncached computation.

Per-sample metrics (their names: :data:`fcr_eval.spec.vocabulary.SAMPLE_METRICS`; one value per generated sample, stored in ``sample_metrics`` and paired
across variations by (seed, sample) in :mod:`fcr_eval.analysis.contrasts`):

| name | definition | better |
|---|---|---|
| ``cache_mse`` | mean over pixels/channels of (cached − reference)², images in [0, 1] | lower |
| ``cache_psnr`` | 10·log10(range² / cache_mse) dB; +inf when identical | higher |
| ``cache_feature_l2`` | ‖φ(cached) − φ(reference)‖₂ in a feature extractor's space (the quality extractor's; record which) | lower |
| ``class_correct`` | 1 when the classifier assigns the prompted class (embedded default), else 0 | higher |
| ``class_logprob`` | log p(prompted class \\| image) under that classifier | higher |
| ``clip_score`` | per-prompt CLIPScore (SD) | higher |
| ``clip_drift`` | CLIP-embedding distance to the same weights' uncached sample (SD) | lower |

Example:
    >>> errs = cache_error(cached_images, uncached_images,
    ...                    cached_features=feats_cached, reference_features=feats_uncached)
    >>> sorted(errs)
    ['cache_feature_l2', 'cache_mse', 'cache_psnr']
"""

from __future__ import annotations

import logging

import numpy as np

from fcr_eval.spec.vocabulary import CACHE_FEATURE_L2, CACHE_MSE, CACHE_PSNR

__all__ = [
    "pixel_mse",
    "psnr",
    "feature_l2",
    "cache_error",
]

logger = logging.getLogger(__name__)

def _pair(cached, reference, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Both as float64 ``(N, -1)`` arrays (torch tensors and numpy arrays accepted)."""
    a = np.asarray(cached.detach().cpu() if hasattr(cached, "detach") else cached, dtype=np.float64)
    b = np.asarray(reference.detach().cpu() if hasattr(reference, "detach") else reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"{what}: cached {a.shape} and reference {b.shape} differ; pass the same samples in the "
                         "same order (same seed, x_T and prompt)")
    if a.ndim < 2 or a.shape[0] == 0:
        raise ValueError(f"{what}: need a batch (N, ...) with N >= 1, got shape {a.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError(f"{what}: inputs contain NaN or inf")
    return a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)


def pixel_mse(cached, reference) -> np.ndarray:
    """Per-sample mean squared error ``(N,)`` between two image batches ``(N, C, H, W)``.

    Example:
        >>> pixel_mse(np.zeros((2, 1, 2, 2)), np.full((2, 1, 2, 2), 0.5))
        array([0.25, 0.25])
    """
    a, b = _pair(cached, reference, "pixel_mse")
    return ((a - b) ** 2).mean(axis=1)


def psnr(cached, reference, data_range: float = 1.0) -> np.ndarray:
    """Per-sample PSNR in dB, ``10·log10(data_range² / MSE)``; +inf for identical samples.

    Args:
        data_range: the images' value range (1.0 for [0, 1]).

    Example:
        >>> psnr(np.zeros((1, 1, 2, 2)), np.full((1, 1, 2, 2), 0.1)).round(6)
        array([20.])
    """
    if data_range <= 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    mse = pixel_mse(cached, reference)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(data_range**2 / mse)


def feature_l2(cached_features, reference_features) -> np.ndarray:
    """Per-sample Euclidean distance ``(N,)`` between two feature batches ``(N, D)``.

    Example:
        >>> feature_l2(np.array([[0.0, 0.0]]), np.array([[3.0, 4.0]]))
        array([5.])
    """
    a, b = _pair(cached_features, reference_features, "feature_l2")
    return np.sqrt(((a - b) ** 2).sum(axis=1))


def cache_error(cached_images, reference_images, *, cached_features=None, reference_features=None,
                data_range: float = 1.0) -> dict[str, np.ndarray]:
    """The cache-error metrics of a batch of cached samples against their uncached twins.

    Args:
        cached_images, reference_images: ``(N, C, H, W)``; row i of both comes from the same
            weights, x_T and prompt (the reference sampled without any cache).
        cached_features, reference_features: optional ``(N, D)`` features of the same images
            from the quality extractor; adds ``cache_feature_l2``.
        data_range: the images' value range (for PSNR).

    Returns:
        ``{name: (N,) float64}`` keyed by :data:`SAMPLE_METRICS` names.

    Example:
        >>> e = cache_error(np.ones((2, 1, 4, 4)), np.ones((2, 1, 4, 4)))
        >>> e["cache_mse"], e["cache_psnr"]
        (array([0., 0.]), array([inf, inf]))
    """
    out = {CACHE_MSE: pixel_mse(cached_images, reference_images),
           CACHE_PSNR: psnr(cached_images, reference_images, data_range)}
    if (cached_features is None) != (reference_features is None):
        raise ValueError("cache_error: pass both cached_features and reference_features, or neither")
    if cached_features is not None:
        if len(cached_features) != len(out[CACHE_MSE]):
            raise ValueError(f"cache_error: {len(cached_features)} feature rows for {len(out[CACHE_MSE])} images")
        out[CACHE_FEATURE_L2] = feature_l2(cached_features, reference_features)
    return out
