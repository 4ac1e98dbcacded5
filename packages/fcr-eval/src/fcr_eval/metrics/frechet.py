"""Fréchet distance between Gaussians fitted to image features (FID's maths; clean-fid's sqrtm path on request).

The maths is a pure function of two means and covariances; which network produced the features
and how images were preprocessed is recorded next to every number (see
:mod:`fcr_eval.metrics.extractors`). Only features from the clean-fid Inception protocol make an "FID";
EfficientNet-Lite0 features give ``fd_efficientnet_lite0``.

Heusel et al. 2017, https://arxiv.org/abs/1706.08500; Parmar et al. 2022 (clean-fid),
https://arxiv.org/abs/2104.11222.

Example:
    >>> mu, sigma = feature_statistics(real_feats)
    >>> frechet_distance(mu, sigma, *feature_statistics(fake_feats))
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import linalg

__all__ = ["feature_matrix", "feature_statistics", "streamed_statistics", "frechet_distance",
           "frechet_distance_from_features", "frechet_distance_to_reference", "fd_estimable"]

logger = logging.getLogger(__name__)


def feature_matrix(x, name: str) -> np.ndarray:
    """``x`` (a tensor or array) as a float64 ``(N, D)`` feature matrix, checked: two rows at least, finite."""
    a = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a (N, D) feature matrix, got shape {a.shape}")
    if a.shape[0] < 2:
        raise ValueError(f"{name} has {a.shape[0]} rows; a covariance needs at least 2 samples")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or inf; check the images fed to the extractor")
    return a


def fd_estimable(n_samples: int, feature_dim: int) -> bool:
    """Whether a Fréchet distance from ``n_samples`` per set in ``feature_dim`` dimensions is an
    estimate at all: with ``n_samples <= feature_dim`` the sample covariance is singular and the
    distance is dominated by that rank deficiency (biased upwards, not comparable across sample
    sizes). The one place this rule is decided; the FD record stores the answer
    (``details["estimable"]``) and reports and verdicts read it.

    Example:
        >>> fd_estimable(100, 1280), fd_estimable(10_000, 1280)
        (False, True)
    """
    return int(n_samples) > int(feature_dim)


def _warn_if_singular(n: int, d: int) -> None:
    if n <= d:
        logger.warning(
            "covariance of %d samples in %d dimensions is singular; the Fréchet distance is "
            "biased upwards and noisy — use more samples than feature dimensions", n, d)


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` of a ``(N, D)`` feature matrix (float64).

    Example:
        >>> mu, sigma = feature_statistics(np.random.rand(100, 8)); sigma.shape
        (8, 8)
    """
    a = feature_matrix(features, "features")
    _warn_if_singular(*a.shape)
    return a.mean(axis=0), np.cov(a, rowvar=False)


def streamed_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """:func:`feature_statistics` of an ``(N, D)`` array-like read chunk by chunk (a run's
    memory-mapped feature spill): running float64 moments, equal to the whole-array ones to
    rounding (:class:`~fcr_eval.metrics.streaming.RunningMoments`).

    Example:
        >>> mu, sigma = streamed_statistics(np.load("features.npy", mmap_mode="r"))
    """
    from fcr_eval.metrics.streaming import RunningMoments, check_rows

    check_rows(features, "features")
    _warn_if_singular(*features.shape)
    return RunningMoments.of(features).statistics()


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((Σ1Σ2)^½) for symmetric PSD Σ1, Σ2: the eigenvalues of Σ1Σ2 are those of the symmetric
    PSD matrix Σ1^½ Σ2 Σ1^½, so two symmetric eigendecompositions replace a general matrix square
    root (5× faster at 2048 dimensions on one CPU thread, docs/benchmarks.md; real by construction
    on singular covariances)."""
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root @ sigma2 @ root
    lam = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(lam, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, method: str = "eigh") -> float:
    """Fréchet distance ‖μ1−μ2‖² + Tr(Σ1 + Σ2 − 2(Σ1Σ2)^½) between two Gaussians.

    ``method="eigh"`` (default) computes Tr((Σ1Σ2)^½) from symmetric eigendecompositions; it equals
    clean-fid's value to ~1e-8 relative on well-conditioned covariances (tested) and stays exact on
    singular ones. ``method="sqrtm"`` is clean-fid / pytorch-fid's code path: ``scipy.linalg.sqrtm``
    of Σ1Σ2; if that is not finite, ``eps`` is added to both diagonals; a negligible imaginary part
    from numerical error is dropped, a large one raises.

    Example:
        >>> frechet_distance(np.zeros(2), np.eye(2), np.ones(2), np.eye(2))
        2.0
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"means differ in shape: {mu1.shape} vs {mu2.shape} (features from different extractors?)")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"covariances {sigma1.shape}, {sigma2.shape} do not match means of size {mu1.size}")
    diff = mu1 - mu2
    if method == "eigh":
        return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * _trace_sqrt_product(sigma1, sigma2))
    if method != "sqrtm":
        raise ValueError(f"method must be 'eigh' or 'sqrtm', got {method!r}")
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        logger.warning("Fréchet distance: sqrtm(Σ1Σ2) is singular; adding %g to the diagonals", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            m = np.max(np.abs(covmean.imag))
            raise ValueError(f"Fréchet distance: sqrtm has an imaginary component {m:.3g}; too few samples?")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance_from_features(features1, features2, eps: float = 1e-6, method: str = "eigh") -> float:
    """Fréchet distance between the Gaussians fitted to two ``(N, D)`` feature matrices.

    Example:
        >>> frechet_distance_from_features(real_feats, fake_feats)
    """
    f1, f2 = feature_matrix(features1, "features1"), feature_matrix(features2, "features2")
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature dimensions differ: {f1.shape[1]} vs {f2.shape[1]}")
    return frechet_distance(*feature_statistics(f1), *feature_statistics(f2), eps=eps, method=method)


def frechet_distance_to_reference(reference, mu, sigma) -> float:
    """Fréchet distance between the Gaussian fitted to the ``(N, D)`` reference features and ``(mu, sigma)``:
    ``frechet_distance(*feature_statistics(reference), mu, sigma)``, the same number to rounding.

    With ``N <= D`` (a reference smaller than the feature dimension: a quick profile or a smoke test
    against Inception's 2048 dimensions; a design-size reference is larger) the reference covariance is
    ``AᵀA/(N−1)`` of rank below ``N`` (``A`` the centred features), and the nonzero eigenvalues of
    ``Σ_ref Σ`` are those of the ``N × N`` matrix ``AΣAᵀ/(N−1)``: one ``N × N`` eigendecomposition
    replaces two ``D × D`` ones, ``O(N·D²)`` instead of ``O(D³)`` (26× at 500 × 2048,
    docs/benchmarks.md). Larger references take :func:`frechet_distance`'s path.

    Example:
        >>> frechet_distance_to_reference(ref_feats, *streamed_statistics(fake_feats))
    """
    a = feature_matrix(reference, "reference")
    n, d = a.shape
    mu, sigma = np.atleast_1d(np.asarray(mu, np.float64)), np.atleast_2d(np.asarray(sigma, np.float64))
    if n > d:
        return frechet_distance(*feature_statistics(a), mu, sigma)
    if mu.shape != (d,):
        raise ValueError(f"means differ in shape: {(d,)} vs {mu.shape} (features from different extractors?)")
    if sigma.shape != (d, d):
        raise ValueError(f"covariance {sigma.shape} does not match a mean of size {d}")
    _warn_if_singular(n, d)
    mu_ref = a.mean(axis=0)
    centred = (a - mu_ref) / np.sqrt(n - 1)  # Σ_ref = centredᵀ centred
    small = centred @ ((sigma + sigma.T) / 2) @ centred.T
    lam = np.linalg.eigvalsh((small + small.T) / 2)
    trace_sqrt = float(np.sqrt(np.clip(lam, 0, None)).sum())
    diff = mu_ref - mu
    return float(diff.dot(diff) + (centred * centred).sum() + np.trace(sigma) - 2 * trace_sqrt)
