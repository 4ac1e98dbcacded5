"""Kernel Inception Distance: unbiased MMD² with the cubic polynomial kernel, over random subsets.

k(x, y) = (xᵀy / d + 1)³. Subsetting follows clean-fid's ``kernel_distance``: ``num_subsets``
draws of ``m = min(n1, n2, max_subset_size)`` rows from each set without replacement; the
reported value is the mean over subsets (clean-fid reports only that; we also return the std).
Like the Fréchet distance it is named by its extractor: ``kid_efficientnet_lite0`` vs
``kid_inception``.

Bińkowski et al. 2018, https://arxiv.org/abs/1801.01401.

Example:
    >>> kernel_distance(real_feats, fake_feats, num_subsets=100, max_subset_size=1000, seed=0)
    KIDResult(value=..., std=..., num_subsets=100, subset_size=...)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fcr_eval.metrics.streaming import check_rows

__all__ = ["KIDResult", "polynomial_mmd2_unbiased", "kernel_distance"]


@dataclass(frozen=True)
class KIDResult:
    """KID mean over subsets, its std across subsets, and the subsetting used."""

    value: float
    std: float
    num_subsets: int
    subset_size: int


def polynomial_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² between two equal-size samples under k(a, b) = (aᵀb/d + 1)³.

    Example:
        >>> polynomial_mmd2_unbiased(np.eye(3), np.eye(3))
        0.0
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m, d = x.shape
    if y.shape != (m, d):
        raise ValueError(f"unbiased MMD here needs equal-size samples, got {x.shape} and {y.shape}")
    if m < 2:
        raise ValueError("unbiased MMD needs at least 2 samples per set")
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2 * kxy.sum() / (m * m))


def kernel_distance(features1, features2, num_subsets: int = 100, max_subset_size: int = 1000,
                    seed: int | None = 0) -> KIDResult:
    """KID between two ``(N, D)`` feature sets (clean-fid's subsetting; seeded for repeatability).
    Either set may be memory-mapped (a run's feature spill): only each subset's rows are read.

    Example:
        >>> kernel_distance(np.random.rand(200, 16), np.random.rand(150, 16), num_subsets=10).subset_size
        150
    """
    f1, f2 = _rows(features1), _rows(features2)
    check_rows(f1, "features1")
    check_rows(f2, "features2")
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature dimensions differ: {f1.shape[1]} vs {f2.shape[1]}")
    if num_subsets < 1:
        raise ValueError("num_subsets must be >= 1")
    m = min(f1.shape[0], f2.shape[0], max_subset_size)
    rng = np.random.default_rng(seed)
    vals = np.empty(num_subsets)
    for i in range(num_subsets):
        x = np.asarray(f2[rng.choice(f2.shape[0], m, replace=False)], np.float64)
        y = np.asarray(f1[rng.choice(f1.shape[0], m, replace=False)], np.float64)
        vals[i] = polynomial_mmd2_unbiased(x, y)
    return KIDResult(float(vals.mean()), float(vals.std(ddof=1)) if num_subsets > 1 else float("nan"),
                     num_subsets, m)


def _rows(x):
    return x.detach().cpu().numpy() if hasattr(x, "detach") else x
