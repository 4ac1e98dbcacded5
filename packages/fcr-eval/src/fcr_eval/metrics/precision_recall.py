"""Improved precision and recall (k-NN manifolds, k = 3).

Each set's manifold is the union of balls around its points with radius the distance to the
point's k-th nearest neighbour (itself excluded). Precision: the fraction of generated samples
inside the real manifold; recall: the fraction of real samples inside the generated manifold.

Kynkäänniemi et al. 2019, https://arxiv.org/abs/1904.06991.

Example:
    >>> pr = precision_recall(real_feats, fake_feats, k=3); pr.precision, pr.recall
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fcr_eval.metrics.frechet import feature_matrix

__all__ = ["PrecisionRecall", "precision_recall", "knn_radii"]


@dataclass(frozen=True)
class PrecisionRecall:
    precision: float
    recall: float
    k: int
    n_real: int
    n_fake: int


def _cdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def knn_radii(features: torch.Tensor, k: int = 3, batch_size: int = 1024) -> torch.Tensor:
    """Distance of every row to its k-th nearest other row."""
    n = features.shape[0]
    if n <= k:
        raise ValueError(f"k-NN radii need more than k={k} samples, got {n}")
    out = []
    for i in range(0, n, batch_size):
        d = _cdist(features[i : i + batch_size], features)
        out.append(d.kthvalue(k + 1, dim=1).values)  # +1: the zero distance to itself
    return torch.cat(out)


def _coverage(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, batch_size: int) -> float:
    inside = []
    for i in range(0, queries.shape[0], batch_size):
        d = _cdist(queries[i : i + batch_size], support)
        inside.append((d <= radii[None, :]).any(dim=1))
    return float(torch.cat(inside).float().mean())


def precision_recall(real_features, fake_features, k: int = 3, batch_size: int = 1024) -> PrecisionRecall:
    """Improved precision/recall of ``fake_features`` against ``real_features`` (``(N, D)`` each).

    Example:
        >>> precision_recall(np.random.rand(100, 8), np.random.rand(100, 8)).precision
    """
    r = torch.from_numpy(feature_matrix(real_features, "real_features"))
    f = torch.from_numpy(feature_matrix(fake_features, "fake_features"))
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"feature dimensions differ: {r.shape[1]} vs {f.shape[1]}")
    precision = _coverage(f, r, knn_radii(r, k, batch_size), batch_size)
    recall = _coverage(r, f, knn_radii(f, k, batch_size), batch_size)
    return PrecisionRecall(precision, recall, k, r.shape[0], f.shape[0])
