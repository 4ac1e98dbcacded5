"""Statistics for experiment results: seed intervals, paired tests, bootstrap, correlation.

The paired, clustered bootstrap (:func:`paired_bootstrap_ci`, :func:`recovered_fraction_ci`) is
the one the contrasts and the CI-based criteria use: every variation of one weights and seed
starts from the same x_T and prompt, so per-sample values pair across variations, and samples
of one seed share that seed's model / fine-tune, so they are resampled as clusters.

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
    "seed_summary",
    "MeanCI",
    "PairedTTest",
    "BootstrapCI",
    "PairedBootstrapCI",
    "PAIRED_STATISTICS",
    "Correlation",
    "mean_ci",
    "paired_t_test",
    "bootstrap_paired_ci",
    "paired_bootstrap_ci",
    "recovered_fraction",
    "recovered_fraction_ci",
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


# --------------------------------------------------------------------------------------------
# Paired, clustered bootstrap (contrasts and CI-based criteria)
# --------------------------------------------------------------------------------------------

def _mean_difference(c: np.ndarray, b: np.ndarray) -> np.ndarray:
    return c - b


def _relative_difference(c: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (c - b) / np.abs(b)


def _ratio(c: np.ndarray, b: np.ndarray) -> np.ndarray:
    return c / b


def _inverse_ratio(c: np.ndarray, b: np.ndarray) -> np.ndarray:
    return b / c


def _recovered(c: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    return (b - c) / (b - t)


#: Statistics of :func:`paired_bootstrap_ci`, each a function of the two (weighted) means
#: ``c̄`` (candidate) and ``b̄`` (baseline) of one resample:
#:
#: * ``mean_difference``: c̄ − b̄ (= the mean of the paired differences);
#: * ``relative_difference``: (c̄ − b̄) / |b̄| (e.g. ΔFID-like "+5 %" criteria, extra memory);
#: * ``ratio``: c̄ / b̄;
#: * ``inverse_ratio``: b̄ / c̄ (the speed-up when the values are seconds per image).
PAIRED_STATISTICS = {
    "mean_difference": _mean_difference,
    "relative_difference": _relative_difference,
    "ratio": _ratio,
    "inverse_ratio": _inverse_ratio,
}


@dataclass(frozen=True)
class PairedBootstrapCI:
    """A paired statistic with its percentile bootstrap interval.

    Attributes:
        estimate: the statistic on the data as observed (not the bootstrap mean).
        ci_low, ci_high: the ``confidence`` percentile interval.
        n: number of paired samples; n_clusters: number of clusters (1 when unclustered).
        statistic: its name (a key of :data:`PAIRED_STATISTICS` or ``"recovered_fraction"``).
        method: how the interval was made, in words (stored with the number).
        n_undefined: resamples whose statistic was not finite (a zero denominator) and were
            dropped before taking the percentiles; > 0 means the statistic is unstable.
    """

    estimate: float
    ci_low: float
    ci_high: float
    n: int
    n_clusters: int
    statistic: str
    confidence: float
    n_resamples: int
    method: str
    n_undefined: int = 0

    @property
    def half_width(self) -> float:
        return (self.ci_high - self.ci_low) / 2

    def as_text(self, digits: int = 3) -> str:
        return (f"{self.estimate:.{digits}f} [{self.ci_low:.{digits}f}, {self.ci_high:.{digits}f}] "
                f"({self.confidence:.0%} CI, n={self.n}, {self.n_clusters} cluster(s))")


def _cluster_index(clusters, n: int) -> tuple[np.ndarray, int]:
    """Integer cluster code per sample (0..K−1) and K; one cluster when ``clusters`` is None."""
    if clusters is None:
        return np.zeros(n, dtype=np.int64), 1
    c = np.asarray(clusters).ravel()
    if c.size != n:
        raise ValueError(f"clusters has {c.size} labels for {n} paired samples; give one label (e.g. the seed) per sample")
    _, codes = np.unique(c, return_inverse=True)
    return codes.astype(np.int64), int(codes.max()) + 1


def _resample_weights(codes: np.ndarray, n_clusters: int, m: int, rng: np.random.Generator) -> np.ndarray:
    """``(m, n)`` counts: how often each sample enters each of ``m`` two-stage resamples.

    Stage 1 draws ``K`` clusters with replacement (counts ``M_k``); stage 2 draws, for every
    drawn copy of cluster ``k``, its ``n_k`` samples with replacement. The ``M_k`` copies together
    are ``M_k · n_k`` uniform draws from the cluster, i.e. one multinomial — which is what is drawn.
    With one cluster this is the ordinary bootstrap of samples.
    """
    w = np.zeros((m, codes.size))
    counts = (rng.multinomial(n_clusters, np.full(n_clusters, 1 / n_clusters), size=m)
              if n_clusters > 1 else np.ones((m, 1), dtype=np.int64))
    for k in range(n_clusters):
        idx = np.flatnonzero(codes == k)
        w[:, idx] = rng.multinomial(counts[:, k] * idx.size, np.full(idx.size, 1 / idx.size))
    return w


def _bootstrap(arrays: Sequence[np.ndarray], stat, clusters, *, n_resamples: int, confidence: float, seed: int,
               name: str) -> PairedBootstrapCI:
    """Percentile CI of ``stat(*means)``, the means taken jointly over one resample of paired rows."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 100:
        raise ValueError(f"n_resamples = {n_resamples} is too few for a percentile interval; use >= 1000")
    n = arrays[0].size
    codes, k = _cluster_index(clusters, n)
    x = np.stack(arrays, axis=1)  # (n, n_arrays)
    with np.errstate(divide="ignore", invalid="ignore"):
        estimate = float(stat(*x.mean(0)))
    rng = np.random.default_rng(seed)
    out = np.empty(n_resamples)
    chunk = max(1, 4_000_000 // max(1, n))  # bound the (chunk, n) weight matrix to ~32 MB
    for i in range(0, n_resamples, chunk):
        m = min(chunk, n_resamples - i)
        w = _resample_weights(codes, k, m, rng)
        means = (w @ x) / w.sum(1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            out[i : i + m] = stat(*means.T)
    finite = np.isfinite(out)
    n_undefined = int((~finite).sum())
    if n_undefined:
        logger.warning("%s: %d of %d bootstrap resamples are undefined (zero denominator) and were dropped; "
                       "the interval is unstable", name, n_undefined, n_resamples)
    if n_undefined == n_resamples:
        raise ValueError(f"{name}: the statistic is undefined in every resample (its denominator is always 0)")
    alpha = (1 - confidence) / 2
    low, high = np.quantile(out[finite], [alpha, 1 - alpha])
    how = (f"two-stage percentile bootstrap: {k} clusters, then samples within each cluster, "
           f"with replacement; {n_resamples} resamples, seed {seed}") if k > 1 else (
           f"percentile bootstrap of paired samples with replacement; {n_resamples} resamples, seed {seed}")
    return PairedBootstrapCI(estimate, float(low), float(high), int(n), k, name, confidence, n_resamples, how,
                             n_undefined)


def _paired(named: dict[str, Sequence[float] | np.ndarray]) -> list[np.ndarray]:
    arrays = [_arr(v, k) for k, v in named.items()]
    sizes = {k: a.size for k, a in zip(named, arrays, strict=True)}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"paired samples differ in length: {sizes}; pair the rows first (same seed and sample)")
    return arrays


def paired_bootstrap_ci(candidate: Sequence[float] | np.ndarray, baseline: Sequence[float] | np.ndarray, *,
                        clusters: Sequence | np.ndarray | None = None, statistic: str = "mean_difference",
                        n_resamples: int = 10_000, confidence: float = 0.95, seed: int = 0) -> PairedBootstrapCI:
    """Paired percentile bootstrap CI of a comparison of ``candidate`` with ``baseline``.

    Row ``i`` of both arrays is the same sample (same seed, x_T and prompt) under the two
    variations. Every resample keeps the pairs together and computes ``statistic`` from the two
    resampled means (:data:`PAIRED_STATISTICS`). With ``clusters`` (one label per row, e.g. the
    seed) the resampling is two-stage: clusters with replacement, then rows within each drawn
    cluster with replacement (Davison & Hinkley 1997, §3.8), so a seed-level effect (each seed has
    its own fine-tune) widens the interval as it should; the statistic is computed over the pooled
    rows of a resample (each row weighs the same). Without ``clusters`` it is the ordinary paired
    bootstrap, the same method as ``scipy.stats.bootstrap(..., paired=True, method="percentile")``.

    Args:
        candidate, baseline: paired per-sample values, same length.
        clusters: a cluster label per row (e.g. seeds) or ``None``.
        statistic: a key of :data:`PAIRED_STATISTICS`.
        n_resamples, confidence, seed: bootstrap size, interval level, RNG seed.

    Returns:
        :class:`PairedBootstrapCI`.

    Example:
        >>> r = paired_bootstrap_ci([1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 2.0, 3.5], n_resamples=2000)
        >>> r.estimate, r.ci_low <= r.estimate <= r.ci_high
        (0.875, True)
    """
    fn = PAIRED_STATISTICS.get(statistic)
    if fn is None:
        raise ValueError(f"statistic {statistic!r} not supported; use one of {sorted(PAIRED_STATISTICS)}")
    c, b = _paired({"candidate": candidate, "baseline": baseline})
    return _bootstrap([c, b], fn, clusters, n_resamples=n_resamples, confidence=confidence, seed=seed,
                      name=statistic)


def recovered_fraction(candidate: float, baseline: float, target: float) -> float:
    """The fraction of a gap that ``candidate`` closes: ``(baseline − candidate) / (baseline − target)``.

    For the stride gap of FCR: ``baseline`` = the λ = 0 control at the large stride (FD-10 on the
    control weights: same fine-tune compute, no FCR), ``candidate`` = the FCR fine-tune at that
    stride, ``target`` = the small stride that marks a closed gap (FD-5). Values are means of one
    per-sample metric (e.g. cache error). 1 = as good as the small stride, 0 = no better than the
    control, < 0 = worse. The sign convention makes it the same for lower- and higher-is-better
    metrics. Undefined (inf / NaN) when there is no gap.

    Example:
        >>> recovered_fraction(candidate=0.3, baseline=0.5, target=0.1)
        0.5
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(_recovered(np.float64(candidate), np.float64(baseline), np.float64(target)))


def recovered_fraction_ci(candidate: Sequence[float] | np.ndarray, baseline: Sequence[float] | np.ndarray,
                          target: Sequence[float] | np.ndarray, *, clusters: Sequence | np.ndarray | None = None,
                          n_resamples: int = 10_000, confidence: float = 0.95, seed: int = 0) -> PairedBootstrapCI:
    """Bootstrap CI of :func:`recovered_fraction` from per-sample values paired across three variations.

    Row ``i`` of the three arrays is one sample (seed, x_T, prompt). The estimate is the ratio of
    mean differences ``(ē_base − ē_cand) / (ē_base − ē_target)``; every resample draws rows (two-stage
    with ``clusters``, as in :func:`paired_bootstrap_ci`) and applies the same draw to all three
    arrays, so numerator and denominator are resampled jointly and their correlation is kept.
    When the gap's own interval includes 0 the ratio is unstable: resamples with a zero gap are
    dropped (counted in ``n_undefined``) and the interval is very wide — report the gap too.

    Example:
        >>> r = recovered_fraction_ci([0.03, 0.04, 0.02], [0.05, 0.06, 0.04], [0.01, 0.02, 0.0],
        ...                           n_resamples=1000)
        >>> round(r.estimate, 3)
        0.5
    """
    c, b, t = _paired({"candidate": candidate, "baseline": baseline, "target": target})
    return _bootstrap([c, b, t], _recovered, clusters, n_resamples=n_resamples,
                      confidence=confidence, seed=seed, name="recovered_fraction")


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


def clustered_mean_ci(values: Sequence[float] | np.ndarray, clusters: Sequence | np.ndarray, *,
                      n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Mean of per-sample values and its CI, bootstrapped over samples clustered by ``clusters``
    (seeds): the interval of one variation's per-sample metric in the paired table. Non-finite
    values are dropped; a constant or single value gives a zero-width interval.

    Returns:
        ``(mean, low, high)``; NaNs when no finite value is left.

    Example:
        >>> clustered_mean_ci([0.1, 0.2, 0.15, 0.3], [0, 0, 1, 1])
    """
    values, clusters = np.asarray(values, dtype=float), np.asarray(clusters)
    finite = np.isfinite(values)
    values, clusters = values[finite], clusters[finite]
    if len(values) == 0:
        return float("nan"), float("nan"), float("nan")
    if len(values) < 2 or np.all(values == values[0]):
        return float(values.mean()), float(values.mean()), float(values.mean())
    r = paired_bootstrap_ci(values, np.zeros_like(values), clusters=clusters, n_resamples=n_resamples,
                            confidence=confidence, seed=seed)
    return r.estimate, r.ci_low, r.ci_high


def seed_summary(metrics, confidence: float = 0.95):
    """Mean and t-interval over seeds of one metric, per variation, from a frame of stored metric
    rows (:meth:`fcr_eval.store.ResultsStore.metrics` of one metric).

    Columns: ``variation_id, n_seeds, mean, std, ci_low, ci_high, feature_extractor,
    preprocessing``.

    Example:
        >>> seed_summary(store.metrics(experiment_id="mini-exp-1", metric="fd_efficientnet_lite0"))
    """
    import polars as pl

    rows = []
    if metrics.height:
        for (variation,), g in metrics.group_by(["variation_id"], maintain_order=True):
            ci = mean_ci(g["value"].to_list(), confidence=confidence)
            rows.append({
                "variation_id": variation, "n_seeds": ci.n, "mean": ci.mean, "std": ci.std,
                "ci_low": ci.low, "ci_high": ci.high,
                "feature_extractor": ",".join(sorted(set(g["feature_extractor"].to_list()))),
                "preprocessing": ",".join(sorted(set(g["preprocessing"].to_list()))),
            })
    schema = {"variation_id": pl.String, "n_seeds": pl.Int64, "mean": pl.Float64, "std": pl.Float64,
              "ci_low": pl.Float64, "ci_high": pl.Float64, "feature_extractor": pl.String,
              "preprocessing": pl.String}
    return pl.DataFrame(rows, schema=schema)
