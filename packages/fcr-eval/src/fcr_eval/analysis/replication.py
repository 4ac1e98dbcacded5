"""Inference at the unit of replication: cluster-level intervals, variance components, precision plans.

Paired per-sample values (candidate, baseline[, target]) carry a cluster label per sample, the
seed. When every seed has its own fine-tune, the G clusters — not the samples — are the
independent replicates: an interval must come from the G cluster estimates, with small-G
critical values (Cameron & Miller 2015, "A practitioner's guide to cluster-robust inference",
J. Human Resources 50(2), §VI: with few clusters use t with G − 1 degrees of freedom). With
G = 3 a two-stage percentile bootstrap has only 10 distinct first-stage outcomes and covers a
95 % truth ~80 % of the time (:func:`simulate_coverage` measures this).

The maths, with cluster means c̄_g, b̄_g, t̄_g (g = 1..G):

* **difference** ``c − b``: d_g = c̄_g − b̄_g, estimate d̄ = mean_g d_g, interval
  d̄ ± t_{G−1} s_d / √G (``"cluster-t (G-1 df)"``).
* **ratios** R = N / D: (N, D) = (b − c, b − t) for the recovered fraction
  (``fcr_eval.stats.recovered_fraction``: (b̄ − c̄) / (b̄ − t̄)) and (c − b, sign(b̄)·b) for the
  relative difference (c̄ − b̄) / |b̄|. Estimate R̂ = N̄ / D̄ over the cluster means.
  *Delta* (``"cluster-delta (G-1 df)"``): se² = s²(N_g − R̂ D_g) / (G D̄²), R̂ ± t_{G−1} se.
  *Fieller* (1954, "Some problems in interval estimation", JRSS B 16(2), 175–185;
  ``"fieller (G-1 df)"``): {ρ : (N̄ − ρD̄)² ≤ t²_{G−1} (v_NN − 2ρ v_ND + ρ² v_DD)}, v = the
  sample covariances of (N_g, D_g) over G. It is a bounded interval iff D̄² > t² v_DD (the gap is
  significantly non-zero); otherwise it is unbounded and reported as (−inf, inf), ``unbounded``.
* **one shared fine-tune** (seeds differ in x_T and prompts only): the same formulas with the
  samples as units (n − 1 df); the method name ends in ``"sampling noise only"``.
* **variance components** of the per-sample paired statistic y (y = c − b, or for a ratio its
  linearisation y = (N − R̂D) / |D̄|): one-way random-effects ANOVA by the method of moments
  (Searle, Casella & McCulloch 1992, §3.5): σ²_w = MSW, σ²_b = max(0, (MSB − MSW) / m₀),
  m₀ = (n − Σ m_g² / n) / (G − 1). The estimate's variance is ≈ σ²_b / G + σ²_w / (G m), so the
  half-width at G clusters of m samples is ≈ t_{G−1} √(σ²_b / G + σ²_w / (G m)), with the floor
  t_{G−1} σ_b / √G that no number of samples gets below (:func:`plan_precision`).

Example:
    >>> r = replication_interval([1.0, 1.2, 2.0, 2.1, 0.4, 0.6], [0.0] * 6, clusters=[0, 0, 1, 1, 2, 2])
    >>> r.method, round(r.estimate, 3), r.n_clusters
    ('cluster-t (G-1 df)', 1.217, 3)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy import stats as _st

from fcr_eval.spec.vocabulary import (
    FIXED_WEIGHTS,
    INDEPENDENT_FINETUNES,
    SAME_WEIGHTS,
    SHARED_FINETUNE,
)

logger = logging.getLogger(__name__)

__all__ = ["STATISTICS", "RATIO_METHODS", "NOISE_FINETUNES", "NOISE_SAMPLING", "VarianceComponents",
           "ReplicationInterval", "PrecisionPlan", "CoverageConfig", "MethodCoverage", "CoverageResult",
           "RunWeights", "contrast_replication", "replication_interval", "variance_components", "plan_precision",
           "simulate_coverage"]

STATISTICS = ("mean_difference", "relative_difference", "recovered_fraction")
#: Interval methods for the ratio statistics; ``"fieller"`` is the default (see docs/benchmarks.md,
#: "Interval coverage at the cluster counts used": both cover 0.94–0.96 at G = 3, 6, 10; Fieller
#: alone says "unbounded" when the gap itself is not significant, where delta gives a finite width).
RATIO_METHODS = ("fieller", "delta")
NOISE_FINETUNES = "fine-tunes + sampling"
NOISE_SAMPLING = "sampling noise only"
_CLUSTER_NAMES = {"t": "cluster-t", "delta": "cluster-delta", "fieller": "fieller", "ratio-t": "cluster-t of ratios"}
_SAMPLE_NAMES = {"t": "paired-t", "delta": "delta", "fieller": "fieller"}


def method_name(kind: str, per_cluster: bool) -> str:
    """The stored name of an interval method, e.g. ``"fieller (G-1 df)"`` or
    ``"paired-t (n-1 df); sampling noise only"``."""
    if per_cluster:
        return f"{_CLUSTER_NAMES[kind]} (G-1 df)"
    return f"{_SAMPLE_NAMES[kind]} (n-1 df); {NOISE_SAMPLING}"


# --- step 1: interval maths, vectorised: units (clusters or samples) on the last axis -----------

def _tq(confidence: float, df) -> np.ndarray:
    return _st.t.ppf(0.5 + confidence / 2, df)


def _t_interval(x: np.ndarray, confidence: float):
    k = x.shape[-1]
    est = x.mean(-1)
    half = _tq(confidence, k - 1) * x.std(-1, ddof=1) / math.sqrt(k)
    return est, est - half, est + half, np.zeros(est.shape, bool)


def _ratio_interval(num: np.ndarray, den: np.ndarray, confidence: float, fieller: bool):
    """Delta or Fieller interval of N̄/D̄ from unit values (N_k, D_k) (module docstring)."""
    k = num.shape[-1]
    q = _tq(confidence, k - 1) ** 2 / k
    n_bar, d_bar = num.mean(-1), den.mean(-1)
    dn, dd = num - n_bar[..., None], den - d_bar[..., None]
    v_nn, v_dd, v_nd = ((x * y).sum(-1) / (k - 1) for x, y in ((dn, dn), (dd, dd), (dn, dd)))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = n_bar / d_bar
        if not fieller:  # s²(N − R̂D) = v_NN − 2R̂ v_ND + R̂² v_DD
            half = np.sqrt(q * np.maximum(v_nn - 2 * r * v_nd + r * r * v_dd, 0.0)) / np.abs(d_bar)
            return r, r - half, r + half, ~np.isfinite(half)
        a, b, c = d_bar**2 - q * v_dd, n_bar * d_bar - q * v_nd, n_bar**2 - q * v_nn
        bounded = a > 0  # then R̂ lies in the set, so the discriminant is >= 0
        root = np.sqrt(np.maximum(b * b - a * c, 0.0))
        low, high = (b - root) / a, (b + root) / a
    return r, np.where(bounded, low, -np.inf), np.where(bounded, high, np.inf), ~bounded


def _num_den(statistic: str, c: np.ndarray, b: np.ndarray, t: np.ndarray | None):
    if statistic == "relative_difference":
        return c - b, np.sign(b.mean(-1, keepdims=True)) * b
    return b - c, b - t


def _per_unit(statistic: str, c, b, t) -> np.ndarray:
    """The statistic of each unit (a cluster's means, or one sample)."""
    if statistic == "mean_difference":
        return c - b
    num, den = (c - b, np.abs(b)) if statistic == "relative_difference" else (b - c, b - t)
    with np.errstate(divide="ignore", invalid="ignore"):
        return num / den


def _interval(statistic: str, kind: str, c, b, t, confidence: float):
    """(estimate, low, high, unbounded) from unit values of shape (..., k)."""
    if statistic == "mean_difference":
        return _t_interval(c - b, confidence)
    if kind == "ratio-t":
        return _t_interval(_per_unit(statistic, c, b, t), confidence)
    return _ratio_interval(*_num_den(statistic, c, b, t), confidence, fieller=kind == "fieller")


# --- step 2: variance components --------------------------------------------------------------

@dataclass(frozen=True)
class VarianceComponents:
    """Between- and within-cluster variance of the per-sample paired statistic (method of moments).

    ``between`` is NaN when it cannot be estimated (one shared fine-tune); ``within`` is NaN with
    one sample per cluster. ``n_per_cluster`` is m₀, the ANOVA's effective cluster size.
    """

    between: float
    within: float
    n_clusters: int
    n_per_cluster: float
    statistic: str

    def half_width(self, n_clusters: int, n_per_cluster: float, confidence: float = 0.95) -> float:
        """Predicted half-width t_{G−1} √(σ²_b/G + σ²_w/(G m)) at G clusters of m samples."""
        var = np.nan_to_num(self.between) / n_clusters + np.nan_to_num(self.within) / (n_clusters * n_per_cluster)
        return float(_tq(confidence, n_clusters - 1) * math.sqrt(var))


def _anova(y: np.ndarray, codes: np.ndarray, n_clusters: int, statistic: str) -> VarianceComponents:
    n = y.size
    m_g = np.bincount(codes, minlength=n_clusters).astype(float)
    means = np.bincount(codes, weights=y, minlength=n_clusters) / m_g
    msb = float((m_g * (means - y.mean()) ** 2).sum() / (n_clusters - 1))
    msw = float(((y - means[codes]) ** 2).sum() / (n - n_clusters)) if n > n_clusters else math.nan
    m0 = float((n - (m_g**2).sum() / n) / (n_clusters - 1))
    between = msb if math.isnan(msw) else max(0.0, (msb - msw) / m0)
    return VarianceComponents(between, msw, n_clusters, m0, statistic)


def _paired_statistic(statistic: str, c, b, t, codes, n_clusters) -> np.ndarray:
    """Per-sample y whose cluster means carry the estimate's variance (the ratio's linearisation)."""
    if statistic == "mean_difference":
        return c - b
    num, den = _num_den(statistic, c, b, t)
    m_g = np.bincount(codes, minlength=n_clusters)
    n_bar = (np.bincount(codes, weights=num, minlength=n_clusters) / m_g).mean()
    d_bar = (np.bincount(codes, weights=den, minlength=n_clusters) / m_g).mean()
    return (num - n_bar / d_bar * den) / abs(d_bar)


# --- step 3: validation and the public interval ---------------------------------------------------

def _prepare(candidate, baseline, target, clusters, statistic: str):
    if statistic not in STATISTICS:
        raise ValueError(f"statistic {statistic!r} not supported; use one of {list(STATISTICS)}")
    if (target is None) == (statistic == "recovered_fraction"):
        raise ValueError("give target exactly when statistic is 'recovered_fraction' (the small-stride arm)")
    named = {"candidate": candidate, "baseline": baseline} | ({} if target is None else {"target": target})
    arrays = {k: np.asarray(v, dtype=np.float64).ravel() for k, v in named.items()}
    for name, a in arrays.items():
        if a.size == 0 or not np.all(np.isfinite(a)):
            raise ValueError(f"{name} is empty or holds NaN/inf; give finite per-sample values")
    if len({a.size for a in arrays.values()}) > 1:
        raise ValueError(f"paired samples differ in length: { {k: a.size for k, a in arrays.items()} }; "
                         "pair the rows first (same seed and sample)")
    labels = np.asarray(clusters).ravel()
    if labels.size != arrays["candidate"].size:
        raise ValueError(f"clusters has {labels.size} labels for {arrays['candidate'].size} samples; "
                         "give one label (the seed) per sample")
    uniq, codes = np.unique(labels, return_inverse=True)
    return arrays["candidate"], arrays["baseline"], arrays.get("target"), uniq, codes.astype(np.int64)


@dataclass(frozen=True)
class ReplicationInterval:
    """A paired statistic with its interval at the unit of replication.

    ``method`` is the stored name (e.g. ``"fieller (G-1 df)"``); ``noise`` says what the interval
    holds (:data:`NOISE_FINETUNES` or :data:`NOISE_SAMPLING`). ``unbounded`` marks a Fieller set
    that is not a finite interval (``low``/``high`` are then −inf/inf). ``cluster_estimates`` are
    the statistic per cluster (one dot per fine-tune), in the order of ``cluster_labels``.
    """

    statistic: str
    estimate: float
    low: float
    high: float
    method: str
    noise: str
    confidence: float
    n_clusters: int
    n_per_cluster: tuple[int, ...]
    cluster_labels: tuple[str, ...]
    cluster_estimates: tuple[float, ...]
    components: VarianceComponents
    unbounded: bool = False

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @property
    def sampling_noise_only(self) -> bool:
        return self.noise == NOISE_SAMPLING

    def plan(self, target_half_width: float) -> PrecisionPlan:
        """:func:`plan_precision` from this interval's components, cluster count and size."""
        if self.sampling_noise_only:  # one fine-tune: all samples are one cluster
            return plan_precision(self.components, target_half_width, confidence=self.confidence,
                                  n_clusters=1, n_per_cluster=sum(self.n_per_cluster))
        return plan_precision(self.components, target_half_width, confidence=self.confidence,
                              n_clusters=self.n_clusters, n_per_cluster=round(float(np.mean(self.n_per_cluster))))

    def as_text(self, digits: int = 3) -> str:
        return (f"{self.estimate:.{digits}g} [{self.low:.{digits}g}, {self.high:.{digits}g}] "
                f"({self.confidence:.0%}, {self.method}; {self.n_clusters} cluster(s); {self.noise})")


class RunWeights(NamedTuple):
    """Which weights one run (variation × seed) sampled: ``weights`` names them (a fine-tune's key,
    or ``base:<model>``) and ``finetuned`` says whether they came from a fine-tune."""

    variation: str
    seed: int
    weights: str
    finetuned: bool


def contrast_replication(runs: Iterable[RunWeights], variations: Sequence[str]) -> str:
    """How the sides of a contrast over ``variations`` were replicated, from the weights each run
    sampled (one of :data:`fcr_eval.spec.vocabulary.REPLICATIONS`). The plan asks it of its planned
    runs, the report of the stored ones: the same rule either way.

    * the same weights on every side in every seed → ``SAME_WEIGHTS``;
    * different weights, none fine-tuned (e.g. two base models) → ``FIXED_WEIGHTS``;
    * different weights, every fine-tuned side with its own fine-tune in each seed (and ≥ 2
      seeds) → ``INDEPENDENT_FINETUNES``: the seeds are independent replicates of the method;
    * otherwise (a fine-tune serves several seeds) → ``SHARED_FINETUNE``.

    A variation and seed found with two different weights (stored runs of two settings under one
    experiment id) is ambiguous: the answer is then ``SHARED_FINETUNE``, which claims no more than
    sampling noise, and a warning names it.

    Example:
        >>> contrast_replication([RunWeights("fcr", 0, "ft-a", True), RunWeights("fcr", 1, "ft-b", True),
        ...                       RunWeights("base", 0, "base:m", False), RunWeights("base", 1, "base:m", False)],
        ...                      ("fcr", "base"))
        'independent fine-tunes'
    """
    weights: dict[str, dict[int, str]] = {}
    tuned: set[str] = set()
    mixed: set[tuple[str, int]] = set()
    for r in runs:
        if r.variation not in variations:
            continue
        seen = weights.setdefault(r.variation, {}).setdefault(r.seed, r.weights)
        if seen != r.weights:
            mixed.add((r.variation, r.seed))
        if r.finetuned:
            tuned.add(r.variation)
    if mixed:
        logger.warning("runs of %s sampled different weights under one variation and seed (runs of two settings "
                       "in one store?); their contrasts hold sampling noise only", sorted(mixed))
        return SHARED_FINETUNE
    seeds = sorted({s for per in weights.values() for s in per})
    if all(len({weights[v].get(s) for v in variations if v in weights}) == 1 for s in seeds):
        return SAME_WEIGHTS
    if not tuned:
        return FIXED_WEIGHTS
    own = all(len({weights[v][s] for s in seeds if s in weights[v]}) == len(weights[v]) for v in tuned)
    return INDEPENDENT_FINETUNES if own and len(seeds) >= 2 else SHARED_FINETUNE


def replication_interval(candidate: Sequence[float] | np.ndarray, baseline: Sequence[float] | np.ndarray,
                         target: Sequence[float] | np.ndarray | None = None, *, clusters: Sequence | np.ndarray,
                         statistic: str = "mean_difference", independent_finetunes: bool = True,
                         ratio_method: str = "fieller", confidence: float = 0.95) -> ReplicationInterval:
    """Interval of a paired statistic with the fine-tune as the unit of replication.

    Args:
        candidate, baseline, target: per-sample values paired by row (target only for
            ``"recovered_fraction"``).
        clusters: one label per row (the seed).
        statistic: one of :data:`STATISTICS`.
        independent_finetunes: True when each cluster has its own fine-tune (the interval is
            over the G cluster estimates, G ≥ 2); False when all clusters share one fine-tune
            (samples are the units and the result says "sampling noise only").
        ratio_method: :data:`RATIO_METHODS` member for the ratio statistics.
        confidence: interval level in (0, 1).

    Example:
        >>> r = replication_interval([0.2, 0.3, 0.5, 0.4], [1.0] * 4, [0.0] * 4, clusters=[0, 0, 1, 1],
        ...                          statistic="recovered_fraction", independent_finetunes=False)
        >>> r.method, r.sampling_noise_only
        ('fieller (n-1 df); sampling noise only', True)
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if ratio_method not in RATIO_METHODS:
        raise ValueError(f"ratio_method {ratio_method!r} not supported; use one of {list(RATIO_METHODS)}")
    c, b, t, labels, codes = _prepare(candidate, baseline, target, clusters, statistic)
    g = labels.size
    m_g = np.bincount(codes, minlength=g)
    means = [None if x is None else np.bincount(codes, weights=x, minlength=g) / m_g for x in (c, b, t)]
    kind = "t" if statistic == "mean_difference" else ratio_method
    y = _paired_statistic(statistic, c, b, t, codes, g)
    if independent_finetunes:
        if g < 2:
            raise ValueError(f"a cluster-level interval needs >= 2 independent fine-tunes (clusters), got {g}; "
                             "pass independent_finetunes=False if the seeds share one fine-tune")
        est, low, high, unb = _interval(statistic, kind, *means, confidence)
        components = _anova(y, codes, g, statistic)
    else:
        if c.size < 2:
            raise ValueError("a sampling-noise interval needs at least 2 paired samples")
        est, low, high, unb = _interval(statistic, kind, c, b, t, confidence)
        # One fine-tune is one cluster: its between-fine-tune variance cannot be estimated.
        components = VarianceComponents(math.nan, float(y.var(ddof=1)), 1, float(c.size), statistic)
    per = _per_unit(statistic, *means)
    return ReplicationInterval(statistic, float(est), float(low), float(high), method_name(kind, independent_finetunes),
                               NOISE_FINETUNES if independent_finetunes else NOISE_SAMPLING, confidence, g,
                               tuple(int(v) for v in m_g), tuple(str(v) for v in labels),
                               tuple(float(v) for v in per), components, bool(unb))


def variance_components(candidate, baseline, target=None, *, clusters, statistic: str = "mean_difference"
                        ) -> VarianceComponents:
    """Between/within-cluster variance of the paired statistic (one-way random-effects ANOVA).

    Example:
        >>> vc = variance_components([1.0, 1.1, 3.0, 3.1], [0.0] * 4, clusters=[0, 0, 1, 1])
        >>> round(vc.between, 3), round(vc.within, 4)
        (1.997, 0.005)
    """
    c, b, t, labels, codes = _prepare(candidate, baseline, target, clusters, statistic)
    if labels.size < 2:
        raise ValueError("variance components need >= 2 clusters; one fine-tune has no between-fine-tune variance")
    return _anova(_paired_statistic(statistic, c, b, t, codes, labels.size), codes, labels.size, statistic)


# --- step 4: precision planned in fine-tunes ------------------------------------------------------

@dataclass(frozen=True)
class PrecisionPlan:
    """How many clusters (fine-tunes) × samples reach ``target_half_width``.

    ``clusters_needed`` at ``n_per_cluster`` samples each (None: not estimable, one fine-tune);
    ``samples_needed`` per cluster at the current ``n_clusters`` (None: more samples cannot help,
    the floor t σ_b/√G is at or above the target); ``floor`` = that floor at the current G.
    """

    target_half_width: float
    confidence: float
    n_clusters: int
    n_per_cluster: int
    current_half_width: float
    clusters_needed: int | None
    samples_needed: int | None
    floor: float

    def describe(self) -> str:
        h, g0, m = _g(self.target_half_width), self.n_clusters, self.n_per_cluster
        if self.clusters_needed is None:  # one shared fine-tune
            head = (f"≈ {self.samples_needed} samples reach ±{h} ({NOISE_SAMPLING}: "
                    "how many fine-tunes a claim about the method needs cannot be estimated from one)")
            return head if self.samples_needed is not None else f"±{h} not reachable by samples alone"
        if self.current_half_width <= self.target_half_width:
            return f"{g0} fine-tunes × {m} samples already reach ±{h} (predicted ±{_g(self.current_half_width)})"
        head = f"≈ {self.clusters_needed} fine-tunes × {m} samples reach ±{h}"
        if self.samples_needed is None:
            return f"{head}; more samples at {g0} fine-tunes cannot (floor ±{_g(self.floor)})"
        return f"{head}; or {g0} fine-tunes × {self.samples_needed} samples"


def _g(x: float) -> str:
    return f"{x:.2g}"


def plan_precision(components: VarianceComponents, target_half_width: float, *, confidence: float = 0.95,
                   n_clusters: int | None = None, n_per_cluster: int | None = None,
                   max_clusters: int = 100_000) -> PrecisionPlan:
    """Clusters G and samples per cluster m that bring t_{G−1} √(σ²_b/G + σ²_w/(G m)) to the target.

    Args:
        components: from :func:`variance_components` (or a :class:`ReplicationInterval`).
        target_half_width: the wanted half-width (> 0), in the statistic's units.
        confidence: interval level; n_clusters, n_per_cluster: the current design (default: the
            components' own).
        max_clusters: search limit for G.

    Example:
        >>> vc = VarianceComponents(between=0.04, within=0.8, n_clusters=3, n_per_cluster=100,
        ...                         statistic="recovered_fraction")
        >>> plan_precision(vc, 0.15).describe()
        '≈ 11 fine-tunes × 100 samples reach ±0.15; more samples at 3 fine-tunes cannot (floor ±0.5)'
    """
    if not target_half_width > 0:
        raise ValueError(f"target_half_width must be > 0, got {target_half_width}")
    g0 = int(n_clusters or components.n_clusters)
    m = max(1, int(round(n_per_cluster or components.n_per_cluster)))
    s_b, s_w = components.between, np.nan_to_num(components.within)
    h = target_half_width
    if math.isnan(s_b):  # one shared fine-tune: only samples are units; find the n with t_{n-1} σ/√n <= h
        n0 = max(2, math.ceil((_st.norm.ppf(0.5 + confidence / 2) * math.sqrt(s_w) / h) ** 2))
        ns = np.arange(n0, n0 + 10_000)
        ok = _tq(confidence, ns - 1) * np.sqrt(s_w / ns) <= h
        cur = float(_tq(confidence, m - 1) * math.sqrt(s_w / m)) if m > 1 else math.inf
        return PrecisionPlan(h, confidence, g0, m, cur, None, int(ns[ok.argmax()]) if ok.any() else None, 0.0)
    gs = np.arange(2, max_clusters + 1)
    hw = _tq(confidence, gs - 1) * np.sqrt(s_b / gs + s_w / (gs * m))
    needed = int(gs[(hw <= h).argmax()]) if (hw <= h).any() else None
    tq0 = float(_tq(confidence, g0 - 1))
    floor = tq0 * math.sqrt(s_b / g0)
    room = (h / tq0) ** 2 - s_b / g0  # what σ²_w/(G0 m) may still use
    samples = None if room <= 0 or math.isnan(components.within) else max(1, math.ceil(s_w / (g0 * room)))
    return PrecisionPlan(h, confidence, g0, m, components.half_width(g0, m, confidence), needed, samples, floor)


# --- step 5: coverage with a known truth ----------------------------------------------------------

_GAP, _R0, _TAU = 0.5, 0.1, 0.2  # gap b − t; true recovered fraction; its SD across fine-tunes
# _TAU ≈ the seeds profile's spread (per-fine-tune recovered fraction 0.37 / 0.00 / −0.03).


@dataclass(frozen=True)
class CoverageConfig:
    """One cell of the coverage simulation.

    Data (per replication: G clusters × m samples). ``normal``: b − t = GAP(1 + γu_g) + 0.3e,
    b − c = GAP(R0 + τu'_g) + 0.4e', b = 1 + 0.3z. ``lognormal`` (skewed positive, like cache
    MSE): b = L_g·exp(0.6z − 0.18), t = b·F_t, c = b·F_c with log-normal factors (SD 0.3 in logs,
    E F_t = 0.49 as FD-5/FD-10 here), per-cluster shifts of log F_c and log F_t and a cluster
    scale L_g (SD 0.1 in logs). ``cluster_effect`` switches the per-cluster terms on: τ = 0.2 on
    the recovered-fraction scale (the seeds profile's spread), γ = ``gap_spread`` relative on the
    gap (0.05 as seen; 0.5 stresses the ratio methods). Truths: R0 = 0.1, difference = E c − E b.
    """

    n_clusters: int = 3
    n_per_cluster: int = 100
    statistic: str = "recovered_fraction"
    distribution: str = "normal"
    cluster_effect: bool = True
    gap_spread: float = 0.05
    reps: int = 2000
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self):
        if self.n_clusters < 2 or self.n_per_cluster < 2 or self.reps < 10:
            raise ValueError(f"need n_clusters >= 2, n_per_cluster >= 2, reps >= 10; got {self.n_clusters}, "
                             f"{self.n_per_cluster}, {self.reps}")
        if self.statistic not in STATISTICS:
            raise ValueError(f"statistic {self.statistic!r} not supported; use one of {list(STATISTICS)}")
        if self.distribution not in ("normal", "lognormal"):
            raise ValueError(f"distribution {self.distribution!r} not supported; use 'normal' or 'lognormal'")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if not 0 <= self.gap_spread < 1:
            raise ValueError(f"gap_spread must be in [0, 1) (relative SD of the gap across clusters), got {self.gap_spread}")


@dataclass(frozen=True)
class MethodCoverage:
    """Coverage of one interval method; ``mean_width`` over the bounded intervals."""

    method: str
    coverage: float
    mean_width: float
    n_reps: int
    n_unbounded: int

    @property
    def mc_se(self) -> float:
        """Binomial Monte Carlo standard error of ``coverage``."""
        return math.sqrt(max(self.coverage * (1 - self.coverage), 1e-12) / self.n_reps)


@dataclass(frozen=True)
class CoverageResult:
    """One cell's truth and the coverage of every method (:meth:`get` by stored name)."""

    config: CoverageConfig
    truth: float
    methods: tuple[MethodCoverage, ...]

    def get(self, method: str) -> MethodCoverage:
        for m in self.methods:
            if m.method == method:
                return m
        raise KeyError(f"no method {method!r}; have {[m.method for m in self.methods]}")


def _draw(cfg: CoverageConfig, rng: np.random.Generator):
    """(c, b, t) of shape (reps, G, m) and the truth of ``cfg.statistic``."""
    shape, cl = (cfg.reps, cfg.n_clusters, cfg.n_per_cluster), (cfg.reps, cfg.n_clusters, 1)
    on = 1.0 if cfg.cluster_effect else 0.0
    z = rng.standard_normal
    gap = on * cfg.gap_spread
    if cfg.distribution == "normal":
        b = 1.0 + 0.3 * z(shape)
        t = b - _GAP * (1 + gap * z(cl)) - 0.3 * z(shape)
        c = b - _GAP * (_R0 + _TAU * on * z(cl)) - 0.4 * z(shape)
        mean_c = 1.0 - _GAP * _R0
    else:
        f_t, s = 0.49, 0.3
        mean_c = 1.0 - _R0 * (1.0 - f_t)  # E F_c, so that (1 − E F_c)/(1 − E F_t) = R0
        tau = on * _TAU * (1.0 - f_t) / mean_c  # log-shift SD giving SD ≈ τ of the per-cluster R
        tau_t = gap * (1.0 - f_t) / f_t  # log-shift SD giving relative SD ≈ γ of the per-cluster gap
        b = np.exp(0.6 * z(shape) - 0.18 + on * (0.1 * z(cl) - 0.005))
        t = b * np.exp(math.log(f_t) - (s * s + tau_t * tau_t) / 2 + s * z(shape) + tau_t * z(cl))
        c = b * np.exp(math.log(mean_c) - (s * s + tau * tau) / 2 + s * z(shape) + tau * z(cl))
    truth = {"mean_difference": mean_c - 1.0, "relative_difference": mean_c - 1.0, "recovered_fraction": _R0}
    return c, b, t, truth[cfg.statistic]


def _score(name: str, truth: float, low: np.ndarray, high: np.ndarray, unbounded: np.ndarray) -> MethodCoverage:
    covered = (low <= truth) & (truth <= high)
    finite = np.isfinite(high - low)
    width = float((high - low)[finite].mean()) if finite.any() else math.inf
    return MethodCoverage(name, float(covered.mean()), width, int(low.size), int(np.asarray(unbounded).sum()))


def simulate_coverage(config: CoverageConfig, *, extra_intervals: Mapping[str, Callable] | None = None,
                      extra_reps: int = 500) -> CoverageResult:
    """Coverage and mean width of every interval method on data with a known truth (vectorised).

    Methods: the cluster-level ones (``cluster-t`` for the difference; ``fieller``, ``cluster-delta``
    and ``cluster-t of ratios`` for a ratio) and the sampling-noise-only one that ignores the
    clusters. ``extra_intervals`` maps a name to ``fn(candidate, baseline, target, clusters) ->
    (low, high)`` over one replication's flat arrays, run on the first ``extra_reps`` replications
    (e.g. ``fcr_eval.stats``'s two-stage bootstrap, which is not vectorised).

    Example:
        >>> res = simulate_coverage(CoverageConfig(n_clusters=3, reps=200, statistic="mean_difference"))
        >>> 0.85 < res.get("cluster-t (G-1 df)").coverage < 1.0
        True
    """
    c, b, t, truth = _draw(config, np.random.default_rng(config.seed))
    cm, bm, tm = c.mean(-1), b.mean(-1), t.mean(-1)
    flat = [x.reshape(config.reps, -1) for x in (c, b, t)]
    kinds = ("t",) if config.statistic == "mean_difference" else ("fieller", "delta", "ratio-t")
    out = [_score(method_name(k, True), truth, *_interval(config.statistic, k, cm, bm, tm, config.confidence)[1:])
           for k in kinds]
    out.append(_score(method_name(kinds[0], False), truth,
                      *_interval(config.statistic, kinds[0], *flat, config.confidence)[1:]))
    labels = np.repeat(np.arange(config.n_clusters), config.n_per_cluster)
    for name, fn in (extra_intervals or {}).items():
        k = min(extra_reps, config.reps)
        bounds = np.array([fn(flat[0][r], flat[1][r], flat[2][r], labels) for r in range(k)], float)
        out.append(_score(name, truth, bounds[:, 0], bounds[:, 1], ~np.isfinite(bounds).all(1)))
    return CoverageResult(config, float(truth), tuple(out))
