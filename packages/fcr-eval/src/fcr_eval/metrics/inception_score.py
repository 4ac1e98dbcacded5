"""Inception Score from classifier logits: exp(E_x KL(p(y|x) ‖ p(y))), mean ± std over splits.

The score depends on the classifier: with clean-fid's Inception logits it is the usual IS; with
EfficientNet-Lite0 (ImageNet-1k) logits it is stored as ``is_efficientnet_lite0``.

Salimans et al. 2016, https://arxiv.org/abs/1606.03498.

Example:
    >>> inception_score(logits, splits=10)
    ISResult(mean=..., std=..., splits=10, n=...)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import log_softmax

from fcr_eval.metrics.streaming import CHUNK_ROWS

__all__ = ["ISResult", "inception_score"]


@dataclass(frozen=True)
class ISResult:
    mean: float
    std: float
    splits: int
    n: int


def inception_score(logits, splits: int = 10) -> ISResult:
    """Inception Score of ``(N, C)`` logits, split into ``splits`` equal chunks (torch-fidelity's
    protocol: the last chunk takes the remainder). ``logits`` may be memory-mapped: each split is
    read chunk by chunk.

    Example:
        >>> inception_score(np.eye(10) * 100, splits=1).mean   # 10 confident, distinct classes
        10.0
    """
    a = logits.detach().cpu().numpy() if hasattr(logits, "detach") else logits  # may be memory-mapped
    if len(a.shape) != 2:
        raise ValueError(f"logits must be (N, C), got shape {tuple(a.shape)}")
    n = a.shape[0]
    if splits < 1 or n < splits:
        raise ValueError(f"need at least one image per split: {n} images, {splits} splits")
    scores = []
    bounds = np.linspace(0, n, splits + 1).astype(int)
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        # two passes over the split, chunk by chunk: p(y), then the mean KL(p(y|x) ‖ p(y))
        p_sum = sum(np.exp(lp).sum(axis=0) for lp in _log_probs(a, lo, hi))
        log_py = np.log(p_sum / (hi - lo) + 1e-30)
        kl = sum((np.exp(lp) * (lp - log_py)).sum(axis=1).sum() for lp in _log_probs(a, lo, hi)) / (hi - lo)
        scores.append(np.exp(kl))
    s = np.asarray(scores)
    return ISResult(float(s.mean()), float(s.std()) if splits > 1 else 0.0, splits, n)


def _log_probs(a, lo: int, hi: int):
    chunk = CHUNK_ROWS
    for i in range(lo, hi, chunk):
        yield log_softmax(np.asarray(a[i: min(i + chunk, hi)], np.float64), axis=1)
