"""Improved precision and recall (k-NN manifolds, k = 3).

Each set's manifold is the union of balls around its points with radius the distance to the
point's k-th nearest neighbour (itself excluded). Precision: the fraction of generated samples
inside the real manifold; recall: the fraction of real samples inside the generated manifold.

The k-NN is computed block by block — a chunk of query rows against a chunk of support rows at
a time, keeping each query's k + 1 smallest distances — so no ``n × n`` matrix is built and the
sets may be memory-mapped spills (:mod:`fcr_eval.metrics.streaming`). Every distance is computed
pair by pair (no ``‖a‖² + ‖b‖² − 2ab`` shortcut), so the chunking does not change a value.

Kynkäänniemi et al. 2019, https://arxiv.org/abs/1904.06991.

Example:
    >>> pr = precision_recall(real_feats, fake_feats, k=3); pr.precision, pr.recall
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fcr_eval.metrics.streaming import check_rows, iter_chunks

__all__ = ["PrecisionRecall", "precision_recall", "knn_radii", "coverage"]


@dataclass(frozen=True)
class PrecisionRecall:
    precision: float
    recall: float
    k: int
    n_real: int
    n_fake: int


def _cdist(a: np.ndarray, b: np.ndarray) -> torch.Tensor:
    return torch.cdist(torch.from_numpy(a), torch.from_numpy(b), compute_mode="donot_use_mm_for_euclid_dist")


def knn_radii(features, k: int = 3, batch_size: int = 1024) -> torch.Tensor:
    """Distance of every row of ``features`` (an ``(N, D)`` array-like) to its k-th nearest other
    row, from ``batch_size × batch_size`` distance blocks.

    Example:
        >>> knn_radii(np.array([[0.0], [1.0], [3.0]]), k=1)
        tensor([1., 1., 2.], dtype=torch.float64)
    """
    n = features.shape[0]
    if n <= k:
        raise ValueError(f"k-NN radii need more than k={k} samples, got {n}")
    out = torch.empty(n, dtype=torch.float64)
    for i, q in iter_chunks(features, batch_size):
        best = None
        for _, s in iter_chunks(features, batch_size):
            d = _cdist(q, s)
            both = d if best is None else torch.cat([best, d], dim=1)
            best = both.topk(min(k + 1, both.shape[1]), dim=1, largest=False, sorted=True).values
        out[i: i + len(q)] = best[:, k]  # k + 1 smallest: the zero distance to itself is the first
    return out


def coverage(queries, support, radii: torch.Tensor, batch_size: int = 1024) -> float:
    """Fraction of ``queries`` rows inside the union of balls around ``support`` rows."""
    inside = 0
    for _, q in iter_chunks(queries, batch_size):
        hit = torch.zeros(len(q), dtype=torch.bool)
        for j, s in iter_chunks(support, batch_size):
            hit |= (_cdist(q, s) <= radii[None, j: j + len(s)]).any(dim=1)
        inside += int(hit.sum())
    # a float32 mean, as every stored value was computed (it differs from inside / n in the 8th digit)
    return float(np.float32(inside) / np.float32(queries.shape[0]))


def precision_recall(real_features, fake_features, k: int = 3, batch_size: int = 1024) -> PrecisionRecall:
    """Improved precision/recall of ``fake_features`` against ``real_features`` (``(N, D)`` arrays,
    tensors or memory-mapped spills).

    Example:
        >>> precision_recall(np.random.rand(100, 8), np.random.rand(100, 8)).precision
    """
    r, f = _rows(real_features), _rows(fake_features)
    check_rows(r, "real_features")
    check_rows(f, "fake_features")
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"feature dimensions differ: {r.shape[1]} vs {f.shape[1]}")
    precision = coverage(f, r, knn_radii(r, k, batch_size), batch_size)
    recall = coverage(r, f, knn_radii(f, k, batch_size), batch_size)
    return PrecisionRecall(precision, recall, k, int(r.shape[0]), int(f.shape[0]))


def _rows(x):
    return x.detach().cpu().numpy() if hasattr(x, "detach") else x
