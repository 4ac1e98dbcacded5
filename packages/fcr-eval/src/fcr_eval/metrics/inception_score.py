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

__all__ = ["ISResult", "inception_score"]


@dataclass(frozen=True)
class ISResult:
    mean: float
    std: float
    splits: int
    n: int


def inception_score(logits, splits: int = 10) -> ISResult:
    """Inception Score of ``(N, C)`` logits, split into ``splits`` equal chunks (torch-fidelity's
    protocol: the last chunk takes the remainder).

    Example:
        >>> inception_score(np.eye(10) * 100, splits=1).mean   # 10 confident, distinct classes
        10.0
    """
    a = np.asarray(logits.detach().cpu().numpy() if hasattr(logits, "detach") else logits, np.float64)
    if a.ndim != 2:
        raise ValueError(f"logits must be (N, C), got shape {a.shape}")
    n = a.shape[0]
    if splits < 1 or n < splits:
        raise ValueError(f"need at least one image per split: {n} images, {splits} splits")
    logp = log_softmax(a, axis=1)
    scores = []
    bounds = np.linspace(0, n, splits + 1).astype(int)
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        lp = logp[lo:hi]
        p = np.exp(lp)
        log_py = np.log(p.mean(axis=0) + 1e-30)
        kl = (p * (lp - log_py)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    s = np.asarray(scores)
    return ISResult(float(s.mean()), float(s.std()) if splits > 1 else 0.0, splits, n)
