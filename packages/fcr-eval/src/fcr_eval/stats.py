"""Statistics for experiment results: seed intervals, paired tests, bootstrap, correlation.

All functions take plain sequences / numpy arrays and return small frozen dataclasses, so the
numbers can be stored with their sample sizes.

Example:
    >>> mean_ci([21.1, 21.9, 21.4]).as_text()
    '21.47 ± 1.00 (95% CI, n=3)'
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as _st

__all__ = [
    "MeanCI",
    "PairedTTest",
    "BootstrapCI",
    "Correlation",
    "mean_ci",
    "paired_t_test",
    "bootstrap_paired_ci",
    "pearson_r2",
    "align_paired",
]

logger = logging.getLogger(__name__)


def _arr(x: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError(f"{name} is empty; need at least one value")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or inf: {a[~np.isfinite(a)][:5]}")
    return a


@dataclass(frozen=True)
class MeanCI:
    """Mean with a two-sided t-interval. ``low``/``high`` are NaN when n < 2."""

    mean: float
    std: float
    low: float
    high: float
    n: int
    confidence: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def as_text(self, digits: int = 2) -> str:
        if self.n < 2:
            return f"{self.mean:.{digits}f} (n={self.n}, no CI)"
        return (f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f} "
                f"({self.confidence:.0%} CI, n={self.n})")


def mean_ci(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> MeanCI:
    """Mean and ``confidence`` t-interval over seeds (Student t with n−1 dof, sample std).

    Example:
        >>> ci = mean_ci([1.0, 2.0, 3.0]); round(ci.low, 3), round(ci.high, 3)
        (-0.484, 4.484)
    """
    a = _arr(values, "values")
    n = a.size
    mean = float(a.mean())
    if n < 2:
        logger.warning("mean_ci over a single value: no confidence interval")
        return MeanCI(mean, float("nan"), float("nan"), float("nan"), n, confidence)
    std = float(a.std(ddof=1))
    half = float(_st.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return MeanCI(mean, std, mean - half, mean + half, n, confidence)


@dataclass(frozen=True)
class PairedTTest:
    """Paired t-test of ``a − b``: mean difference, its t-interval, t statistic and p-value."""

    mean_diff: float
    low: float
    high: float
    t: float
    p_value: float
    n: int
    confidence: float


def align_paired(a: dict[str, float], b: dict[str, float]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Pair per-prompt scores by prompt id (the keys both share, sorted).

    Example:
        >>> align_paired({"p1": 1.0, "p2": 2.0}, {"p2": 3.0, "p3": 0.0})
        (array([2.]), array([3.]), ['p2'])
    """
    keys = sorted(set(a) & set(b))
    if not keys:
        raise ValueError("the two score sets share no prompt id; were they scored on the same prompts?")
    dropped = len(set(a) ^ set(b))
    if dropped:
        logger.warning("align_paired: %d prompt ids are in only one of the two sets; dropped", dropped)
    return np.array([a[k] for k in keys], float), np.array([b[k] for k in keys], float), keys


def paired_t_test(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray,
                  confidence: float = 0.95) -> PairedTTest:
    """Two-sided paired t-test of ``a`` against ``b`` (same prompts / seeds, same order).

    Example:
        >>> paired_t_test([1.0, 2.0, 3.5], [0.5, 1.5, 2.0]).mean_diff
        0.8333333333333334
    """
    x, y = _arr(a, "a"), _arr(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"paired samples differ in length: {x.size} vs {y.size}; pair them with align_paired")
    if x.size < 2:
        raise ValueError("a paired t-test needs at least 2 pairs")
    d = x - y
    res = _st.ttest_rel(x, y)
    ci = mean_ci(d, confidence)
    return PairedTTest(float(d.mean()), ci.low, ci.high, float(res.statistic), float(res.pvalue),
                       int(d.size), confidence)


@dataclass(frozen=True)
class BootstrapCI:
    """Bootstrap percentile interval of a statistic of paired differences."""

    estimate: float
    low: float
    high: float
    n: int
    n_resamples: int
    confidence: float


def bootstrap_paired_ci(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, *,
                        statistic: str = "mean", n_resamples: int = 10_000, confidence: float = 0.95,
                        seed: int = 0) -> BootstrapCI:
    """Percentile bootstrap CI of ``statistic`` (``"mean"`` or ``"median"``) of ``a − b``,
    resampling prompts with replacement (Efron & Tibshirani 1993).

    Example:
        >>> r = bootstrap_paired_ci([1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 2.0, 3.5]); r.estimate
        0.875
    """
    x, y = _arr(a, "a"), _arr(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"paired samples differ in length: {x.size} vs {y.size}; pair them with align_paired")
    fn = {"mean": np.mean, "median": np.median}.get(statistic)
    if fn is None:
        raise ValueError(f"statistic {statistic!r} not supported; use 'mean' or 'median'")
    d = x - y
    rng = np.random.default_rng(seed)
    stats_ = np.empty(n_resamples)
    chunk = max(1, 2_000_000 // max(1, d.size))  # bound memory for large prompt sets
    for i in range(0, n_resamples, chunk):
        m = min(chunk, n_resamples - i)
        idx = rng.integers(0, d.size, size=(m, d.size))
        stats_[i : i + m] = fn(d[idx], axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(stats_, [alpha, 1 - alpha])
    return BootstrapCI(float(fn(d)), float(low), float(high), int(d.size), n_resamples, confidence)


@dataclass(frozen=True)
class Correlation:
    """Pearson correlation: ``r``, ``r2 = r²``, two-sided p-value, n."""

    r: float
    r2: float
    p_value: float
    n: int


def pearson_r2(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> Correlation:
    """Pearson R and R² (e.g. σ²_Δ against the FID difference across scenarios).

    Example:
        >>> round(pearson_r2([1, 2, 3, 4], [2, 4, 6, 8.5]).r2, 3)
        0.997
    """
    a, b = _arr(x, "x"), _arr(y, "y")
    if a.shape != b.shape:
        raise ValueError(f"x and y differ in length: {a.size} vs {b.size}")
    if a.size < 3:
        raise ValueError(f"Pearson R needs at least 3 points, got {a.size}")
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        raise ValueError("Pearson R is undefined when x or y is constant")
    res = _st.pearsonr(a, b)
    r = float(res.statistic)
    return Correlation(r, r * r, float(res.pvalue), int(a.size))
