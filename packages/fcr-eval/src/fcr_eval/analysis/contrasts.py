"""Contrasts: the paired comparisons that carry an experiment's claims, with intervals at the unit
of replication.

An experiment file names them in ``[[contrasts]]``; each compares per-sample values of one
metric (:data:`fcr_eval.spec.vocabulary.SAMPLE_METRICS`) between variations, pairing the rows that share
a seed and a sample (every variation of one seed starts from the same x_T and prompt)::

    [[contrasts]]
    id = "stride-gap"                 # FD-10 vs FD-5 on the base weights
    kind = "difference"
    metric = "cache_mse"
    candidate = "fd-10"
    baseline = "fd-5"

    [[contrasts]]
    id = "fcr-recovers-gap"           # the fraction of the FD-5 → FD-10 gap FCR closes
    kind = "recovered_fraction"
    metric = "cache_mse"
    candidate = "fcr-0.10-fd-10"      # FCR fine-tune at the large stride
    baseline = "ctrl-fd-10"           # the λ = 0 control at the large stride (same compute)
    target = "fd-5"                   # the small stride: a fully closed gap
    threshold = 0.3                   # optional: a criterion with a PASS / FAIL / INCONCLUSIVE verdict
    direction = "at_least"

Kinds (:data:`CONTRAST_KINDS`), with c̄, b̄, t̄ the means of candidate, baseline, target over
the paired rows:

* ``difference``: c̄ − b̄;
* ``relative_difference``: (c̄ − b̄) / |b̄| (e.g. FCR's cost to uncached quality);
* ``recovered_fraction``: (b̄ − c̄) / (b̄ − t̄), see :func:`fcr_eval.analysis.stats.recovered_fraction`.

The interval is taken at the unit of replication the plan decided for the contrast
(:func:`compute_contrast`): over the seeds when each seed has its own fine-tune, over the pairs
when no fine-tune varies between seeds; a contrast between a shared fine-tune and anything else
holds sampling noise only and gets no PASS / FAIL. A contrast with ``threshold`` and
``direction`` also gets a verdict (:func:`fcr_eval.analysis.verdicts.verdict`).

Example:
    >>> spec = ContrastSpec("stride-gap", "difference", "cache_mse", candidate="fd-10", baseline="fd-5")
    >>> r = compute_contrast(spec, per_sample, replication="same weights")  # variation_id, seed, sample_index, metric, value
    >>> r.as_text()
    'stride-gap: cache_mse fd-10 − fd-5 = 0.012 [0.009, 0.015] (95% CI, 300 pairs, 2 seeds; sampling noise only)'
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from fcr_eval.analysis.replication import replication_interval
from fcr_eval.analysis.stats import paired_bootstrap_ci
from fcr_eval.analysis.verdicts import verdict
from fcr_eval.spec.contrasts import CONTRAST_KINDS, ContrastSpec, ContrastSpecError, check_contrast  # noqa: F401
from fcr_eval.spec.vocabulary import INDEPENDENT_FINETUNES, REPLICATIONS, SHARED_FINETUNE

__all__ = [
    "CONTRAST_KINDS",
    "ContrastSpec",
    "ContrastSpecError",
    "ContrastResult",
    "check_contrast",
    "compute_contrast",
    "compute_contrasts",
    "pair_samples",
]

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class ContrastResult:
    """A computed contrast: the estimate, its CI, sample sizes, method and (optional) verdict.

    The fields match the store's ``contrasts`` table; ``details`` holds each side's mean, the
    pairing keys, rows dropped as unpaired and, for ``recovered_fraction``, the gap itself.
    """

    contrast_id: str
    kind: str
    metric: str
    candidate: str
    baseline: str
    target: str | None
    estimate: float
    ci_low: float
    ci_high: float
    confidence: float
    n_samples: int
    n_clusters: int
    method: str
    threshold: float | None = None
    direction: str | None = None
    verdict: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def as_text(self, digits: int = 3) -> str:
        op = {"difference": "−", "relative_difference": "rel. −", "recovered_fraction": "recovers gap to"}[self.kind]
        rhs = f"{self.baseline} → {self.target}" if self.kind == "recovered_fraction" else self.baseline
        text = (f"{self.contrast_id}: {self.metric} {self.candidate} {op} {rhs} = {self.estimate:.{digits}f} "
                f"[{self.ci_low:.{digits}f}, {self.ci_high:.{digits}f}] ({self.confidence:.0%} CI, "
                f"{self.n_samples} pairs, {self.n_clusters} seeds; {self.noise})")
        return text + (f" {self.direction} {self.threshold:g}: {self.verdict}" if self.verdict else "")

    @property
    def noise(self) -> str:
        """What the interval holds: fine-tune and sampling noise, or sampling noise only."""
        return str(self.details.get("noise", ""))


def _auto_pair_on(per_sample: pl.DataFrame) -> tuple[str, ...]:
    for key in ("sample_index", "prompt_id"):
        if key in per_sample.columns:
            return ("seed", key)
    raise ValueError("per-sample rows need a seed and a sample_index (or prompt_id) column to be paired; "
                     f"got columns {per_sample.columns}")


def pair_samples(per_sample: pl.DataFrame, metric: str, variations: Sequence[str],
                 pair_on: Sequence[str] | None = None) -> pl.DataFrame:
    """One row per (seed, sample) with one value column per variation, inner-joined.

    Args:
        per_sample: long rows ``variation_id, seed, sample_index (or prompt_id), metric, value``.
        metric: the metric to pair.
        variations: the variation ids (the output's value columns, in this order).
        pair_on: the pairing key (default ``("seed", "sample_index")``, else ``("seed", "prompt_id")``).

    Raises:
        ValueError: a variation has no rows for ``metric``, a key is duplicated within a
            variation, or no row pairs across all of them.

    Example:
        >>> pair_samples(df, "cache_mse", ["fd-10", "fd-5"]).columns
        ['seed', 'sample_index', 'fd-10', 'fd-5']
    """
    keys = list(pair_on or _auto_pair_on(per_sample))
    missing = [c for c in ["variation_id", "metric", "value", *keys] if c not in per_sample.columns]
    if missing:
        raise ValueError(f"per-sample rows lack columns {missing}; need variation_id, metric, value and {keys}")
    rows = per_sample.filter(pl.col("metric") == metric)
    joined: pl.DataFrame | None = None
    for v in dict.fromkeys(variations):
        side = rows.filter(pl.col("variation_id") == v).select([*keys, pl.col("value").cast(pl.Float64).alias(v)])
        if side.height == 0:
            have = sorted(set(rows["variation_id"].to_list()))
            raise ValueError(f"no {metric!r} per-sample values for variation {v!r}; variations with {metric!r}: {have}")
        dup = side.group_by(keys).len().filter(pl.col("len") > 1)
        if dup.height:
            raise ValueError(f"variation {v!r} has {dup.height} duplicated {keys} keys for {metric!r} "
                             f"(e.g. {dup.row(0)[:-1]}); one value per sample is needed to pair")
        joined = side if joined is None else joined.join(side, on=keys, how="inner")
    assert joined is not None
    n_max = max(rows.filter(pl.col("variation_id") == v).height for v in variations)
    if joined.height == 0:
        raise ValueError(f"no (seed, sample) of {metric!r} is shared by all of {list(variations)}; were they sampled "
                         "from the same seeds and prompts?")
    if joined.height < n_max:
        logger.warning("pairing %s over %s: %d of up to %d samples pair; the unpaired ones are dropped", metric,
                       list(variations), joined.height, n_max)
    return joined.sort(keys)


def compute_contrast(spec: ContrastSpec, per_sample: pl.DataFrame, *, replication: str,
                     pair_on: Sequence[str] | None = None, seed: int = 0) -> ContrastResult:
    """Compute ``spec`` from per-sample rows: paired estimate, an interval at the unit of
    replication, a precision plan and (optional) verdict.

    The interval follows ``replication`` (decided by the plan, :data:`fcr_eval.spec.vocabulary.REPLICATIONS`):

    * ``"independent fine-tunes"`` — every seed has its own fine-tune, so the seeds are the
      replicates: a t-interval over the per-seed estimates with G − 1 df (Fieller's for a ratio),
      :func:`fcr_eval.analysis.replication.replication_interval`; its coverage at 3, 6 and 10
      clusters is checked by simulation (tests, docs/benchmarks.md).
    * ``"same weights"`` / ``"fixed weights"`` — no fine-tune varies between the seeds: the pairs
      are the units (paired t / Fieller with n − 1 df), and the interval holds sampling noise,
      which is all there is.
    * ``"shared fine-tune"`` — one fine-tune per side serves every seed: the same sampling-noise
      interval, and no PASS / FAIL: a claim about a training method from one fine-tune is
      INCONCLUSIVE, with the reason in ``details["verdict_reason"]``.

    Args:
        spec: a :class:`ContrastSpec`.
        per_sample: long rows ``variation_id, seed, sample_index (or prompt_id), metric, value``
            (e.g. the store's ``sample_metrics`` joined with ``runs`` for ``variation_id``).
        replication: how the sides were replicated (one of ``REPLICATIONS``).
        pair_on: the pairing key (see :func:`pair_samples`); the first key is the cluster (seed).
        seed: the RNG seed of the set-level gap's bootstrap (recovered fractions only).

    Example:
        >>> spec = ContrastSpec("gap", "difference", "cache_mse", "fd-10", "fd-5")
        >>> compute_contrast(spec, df, replication="same weights").method
        'paired-t (n-1 df); sampling noise only'
    """
    if replication not in REPLICATIONS:
        raise ValueError(f"replication {replication!r} is not one of {list(REPLICATIONS)}")
    keys = list(pair_on or _auto_pair_on(per_sample))
    paired = pair_samples(per_sample, spec.metric, spec.variations, keys)
    values = {v: paired[v].to_numpy() for v in spec.variations}
    bad = [v for v, a in values.items() if not np.isfinite(a).all()]
    if bad:
        raise ValueError(f"contrast {spec.id!r}: {spec.metric!r} has non-finite values for {bad} (PSNR is +inf for "
                         "identical samples); contrast a finite metric such as cache_mse")
    clusters = paired[keys[0]].to_numpy()
    statistic = CONTRAST_KINDS[spec.kind]
    independent = replication == INDEPENDENT_FINETUNES
    if independent and len(np.unique(clusters)) < 2:
        independent = False  # one seed: no replicate to compare it with
    r = replication_interval(values[spec.candidate], values[spec.baseline],
                             values[spec.target] if spec.target else None, clusters=clusters,
                             statistic=statistic, independent_finetunes=independent, confidence=spec.confidence)
    details: dict[str, Any] = {
        "pair_on": keys, "statistic": statistic, "replication": replication, "noise": r.noise,
        **{f"{role}_mean": float(values[v].mean()) for role, v in
           zip(("candidate", "baseline", "target"), spec.variations, strict=False)},
        "clusters": {"labels": list(r.cluster_labels), "estimates": list(r.cluster_estimates),
                     "n_per_cluster": list(r.n_per_cluster)},
        "variance_components": {"between": r.components.between, "within": r.components.within},
        "unbounded": r.unbounded,
    }
    if spec.kind == "recovered_fraction":
        gap = paired_bootstrap_ci(values[spec.baseline], values[spec.target], clusters=clusters,
                                  n_resamples=spec.n_resamples, confidence=spec.confidence, seed=seed)
        details["gap"] = {"estimate": gap.estimate, "ci_low": gap.ci_low, "ci_high": gap.ci_high}
        if gap.ci_low <= 0 <= gap.ci_high:
            logger.warning("contrast %s: the gap %s − %s has a CI that includes 0 [%.4g, %.4g]; the recovered "
                           "fraction is not meaningful", spec.id, spec.baseline, spec.target, gap.ci_low, gap.ci_high)
    target = spec.precision_target
    if target is None and np.isfinite(r.half_width) and r.half_width > 0:
        target = r.half_width / 2
    if target is not None and np.isfinite(r.half_width):
        plan = r.plan(target)
        details["precision"] = {"target_half_width": target, "clusters_needed": plan.clusters_needed,
                                "samples_needed": plan.samples_needed, "floor": plan.floor,
                                "text": plan.describe()}
    v = None
    if spec.threshold is not None:
        if replication == SHARED_FINETUNE:
            v = "INCONCLUSIVE"
            details["verdict_reason"] = (
                "one fine-tune per side serves every seed: the interval holds sampling noise only, not "
                "fine-tune-to-fine-tune variation, so it cannot decide a claim about the training method "
                "(decide it with one fine-tune per seed, e.g. experiments/mini-exp-1-decide.toml)")
        elif r.unbounded:
            v = "INCONCLUSIVE"
            details["verdict_reason"] = "the gap is not significantly non-zero: the ratio's interval is unbounded"
        else:
            v = verdict(r.low, r.high, spec.threshold, spec.direction)
    result = ContrastResult(spec.id, spec.kind, spec.metric, spec.candidate, spec.baseline, spec.target, r.estimate,
                            r.low, r.high, r.confidence, int(sum(r.n_per_cluster)), r.n_clusters, r.method,
                            spec.threshold, spec.direction, v, details)
    logger.info("contrast %s", result.as_text())
    return result


def compute_contrasts(specs: Iterable[ContrastSpec], per_sample: pl.DataFrame, *,
                      replication: Mapping[str, str], pair_on: Sequence[str] | None = None,
                      seed: int = 0) -> list[ContrastResult]:
    """:func:`compute_contrast` for each spec, ``replication`` mapping each contrast id to how its
    sides were replicated (:func:`fcr_eval.plan.planner.contrast_replication` decides it).

    Example:
        >>> results = compute_contrasts(experiment.contrasts, per_sample, replication=plan.replication)
    """
    return [compute_contrast(s, per_sample, replication=replication[s.id], pair_on=pair_on, seed=seed)
            for s in specs]
