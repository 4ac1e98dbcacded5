"""The design's success criteria (design.md §1), evaluated from stored runs → pass/fail with numbers.

| criterion | value | passes when |
|---|---|---|
| ``quality_delta`` | (Q_cand − Q_base) / Q_base of the quality metric (FID-like, lower is better) | ≤ +0.05 |
| ``alignment_delta`` | (A_cand − A_base) / A_base (CLIPScore or class agreement) | ≥ −0.02 |
| ``speedup`` | sec/img of baseline ÷ sec/img of candidate (same batch size) | ≥ 1.4 |
| ``extra_memory`` | (M_cand − M_base) / M_base of peak memory (same memory kind) | ≤ +0.02 |
| ``variance_reduction`` | 1 − σ²(candidate) / σ²(same sampler without FCR), σ² = mean over Δ | ≥ 0.30 |
| ``variance_quality_r2`` | R² of σ² against Q − Q_base across variations (≥ 3) | ≥ 0.6 |
| ``finetune_compute`` | the candidate's ``finetune_compute_fraction`` metric | ≤ 0.03 |

"base" is FD-5 (encoder caching, stride 5, no FCR), "cand" is FCR at stride 10. Every value is
a mean over seeds; ``details`` holds both sides with 95 % t-intervals and seed counts. A criterion
whose inputs are missing is stored with ``passed = NULL`` and the reason in ``details``.

**Verdicts with confidence intervals.** A criterion whose value is a difference or ratio is
better judged from its CI than from its point value: :func:`verdict` says ``PASS`` when the whole
CI is on the passing side of the threshold, ``FAIL`` when it is wholly on the failing side and
``INCONCLUSIVE`` when it straddles the threshold. :func:`paired_criterion` evaluates a criterion
from paired per-sample values (e.g. per-sample class agreement of FD-5 and FCR-FD-10 from the
same x_T and prompt) with the clustered bootstrap of :mod:`fcr_eval.analysis.stats`; :func:`timing_criteria`
evaluates speed-up and extra memory from *repeated, interleaved* timings (one row per seed and
repeat), pairing the two variations' repeats. An INCONCLUSIVE result has ``passed = None`` and
``verdict = "INCONCLUSIVE"`` (``passed = None`` with ``verdict = None`` still means "not evaluated").

Example:
    >>> cfg = CriteriaConfig(baseline="fd-5", candidate="fcr-0.10-fd-10", no_fcr_reference="fd-10")
    >>> results = evaluate_store_criteria(store, "mini-exp-1", cfg)   # also written to `criteria`
    >>> [(r.criterion, r.passed, round(r.value, 3)) for r in results]
"""

from __future__ import annotations

import logging
from dataclasses import asdict

import polars as pl

from fcr_eval.analysis.stats import PairedBootstrapCI, mean_ci, paired_bootstrap_ci, pearson_r2
from fcr_eval.analysis.verdicts import verdict
from fcr_eval.records import CriterionResult
from fcr_eval.spec.criteria import CriteriaConfig

__all__ = [
    "evaluate_criteria",
    "ci_criterion",
    "paired_criterion",
    "timing_criteria",
]


logger = logging.getLogger(__name__)


def _per_seed(df: pl.DataFrame, variation: str, column: str) -> list[float]:
    if df.height == 0:
        return []
    return [float(v) for v in df.filter(pl.col("variation_id") == variation)[column].to_list() if v is not None]


def _summary(values: list[float]) -> dict:
    ci = mean_ci(values)
    return {"mean": ci.mean, "ci_low": ci.low, "ci_high": ci.high, "n_seeds": ci.n}


class _Builder:
    def __init__(self, experiment_id: str, code_version: str) -> None:
        self.experiment_id, self.code_version, self.rows = experiment_id, code_version, []

    def missing(self, criterion: str, threshold: float, reason: str, **details) -> None:
        logger.warning("criterion %s not evaluated: %s", criterion, reason)
        self.rows.append(CriterionResult(self.experiment_id, criterion, None, None, threshold,
                                         {"reason": reason, **details}, self.code_version))

    def add(self, criterion: str, value: float, threshold: float, passed: bool, **details) -> None:
        self.rows.append(CriterionResult(self.experiment_id, criterion, bool(passed), float(value), threshold,
                                         details, self.code_version, verdict="PASS" if passed else "FAIL"))

    def relative(self, criterion: str, base: list[float], cand: list[float], threshold: float, *,
                 higher_passes: bool, what: str, **details) -> None:
        if not base or not cand:
            side = "baseline" if not base else "candidate"
            return self.missing(criterion, threshold, f"no {what} values for the {side} variation", **details)
        b, c = _summary(base), _summary(cand)
        if b["mean"] == 0:
            return self.missing(criterion, threshold, f"baseline {what} is 0; relative change undefined")
        value = (c["mean"] - b["mean"]) / abs(b["mean"])
        passed = value >= threshold if higher_passes else value <= threshold
        self.add(criterion, value, threshold, passed, baseline=b, candidate=c, **details)


def _seed_mean_timing_criteria(b: _Builder, cfg: CriteriaConfig, timings: pl.DataFrame, roles: dict) -> None:
    """Speed-up and extra memory from one timing per seed (means over seeds, no CI): the path for
    stores without repeated timings."""
    t = timings.filter(pl.col("batch_size") == cfg.timing_batch_size) if timings.height else timings
    sb, sc = _per_seed(t, cfg.baseline, "sec_per_image"), _per_seed(t, cfg.candidate, "sec_per_image")
    if sb and sc:
        bs, cs = _summary(sb), _summary(sc)
        speedup = bs["mean"] / cs["mean"]
        b.add("speedup", speedup, cfg.min_speedup, speedup >= cfg.min_speedup, baseline=bs, candidate=cs,
              batch_size=cfg.timing_batch_size, devices=sorted(set(t["device"].to_list())), **roles)
    else:
        b.missing("speedup", cfg.min_speedup, f"no timings at batch size {cfg.timing_batch_size} for both variations")

    mem = t.filter(pl.col("peak_memory_bytes").is_not_null()) if t.height else t
    kinds = sorted(set(mem["memory_kind"].to_list())) if mem.height else []
    if len(kinds) > 1:
        b.missing("extra_memory", cfg.max_extra_memory, f"memory kinds differ: {kinds}; compare like with like")
    else:
        b.relative("extra_memory", _per_seed(mem, cfg.baseline, "peak_memory_bytes"),
                   _per_seed(mem, cfg.candidate, "peak_memory_bytes"), cfg.max_extra_memory, higher_passes=False,
                   what="peak memory", memory_kind=kinds[0] if kinds else None, **roles)


def evaluate_criteria(experiment_id: str, config: CriteriaConfig, *, metrics: pl.DataFrame,
                      timings: pl.DataFrame, feature_stats: pl.DataFrame, code_version: str = "") -> list[CriterionResult]:
    """Evaluate every criterion from frames shaped like the store's query helpers return
    (``variation_id``, ``seed`` plus the table's columns).

    Example:
        >>> evaluate_criteria("exp", cfg, metrics=store.metrics(experiment_id="exp"),
        ...                   timings=store.timings(experiment_id="exp"),
        ...                   feature_stats=store.feature_stats(experiment_id="exp"))
    """
    cfg = config
    b = _Builder(experiment_id, code_version)
    roles = {"baseline_variation": cfg.baseline, "candidate_variation": cfg.candidate}

    def metric(name: str) -> pl.DataFrame:
        return metrics.filter(pl.col("metric") == name) if metrics.height else metrics

    q = metric(cfg.quality_metric)
    b.relative("quality_delta", _per_seed(q, cfg.baseline, "value"), _per_seed(q, cfg.candidate, "value"),
               cfg.max_quality_increase, higher_passes=False, what=cfg.quality_metric, metric=cfg.quality_metric,
               **roles)
    a = metric(cfg.alignment_metric)
    b.relative("alignment_delta", _per_seed(a, cfg.baseline, "value"), _per_seed(a, cfg.candidate, "value"),
               -cfg.max_alignment_drop, higher_passes=True, what=cfg.alignment_metric,
               metric=cfg.alignment_metric, **roles)

    if timings.height and "repeat" in timings.columns and timings["repeat"].n_unique() > 1:
        b.rows.extend(timing_criteria(experiment_id, cfg, timings, code_version=code_version))
    else:
        _seed_mean_timing_criteria(b, cfg, timings, roles)

    fs = feature_stats.filter(pl.col("block") == cfg.variance_block) if feature_stats.height else feature_stats
    per_run = (fs.group_by(["variation_id", "seed"]).agg(pl.col("variance").mean().alias("sigma2"))
               if fs.height else pl.DataFrame({"variation_id": [], "seed": [], "sigma2": []}))
    if cfg.no_fcr_reference is None:
        b.missing("variance_reduction", cfg.min_variance_reduction, "no no_fcr_reference variation configured")
    else:
        ref, cand = _per_seed(per_run, cfg.no_fcr_reference, "sigma2"), _per_seed(per_run, cfg.candidate, "sigma2")
        if ref and cand and _summary(ref)["mean"] > 0:
            rs, cs = _summary(ref), _summary(cand)
            red = 1 - cs["mean"] / rs["mean"]
            b.add("variance_reduction", red, cfg.min_variance_reduction, red >= cfg.min_variance_reduction,
                  reference=rs, candidate=cs, block=cfg.variance_block, reference_variation=cfg.no_fcr_reference,
                  candidate_variation=cfg.candidate)
        else:
            b.missing("variance_reduction", cfg.min_variance_reduction, "σ²_Δ missing for the candidate or reference")

    q_base = _per_seed(q, cfg.baseline, "value")
    variations = list(cfg.r2_variations) if cfg.r2_variations else sorted(set(per_run["variation_id"].to_list())) \
        if per_run.height else []
    xs, ys, used = [], [], []
    for v in variations:
        s2, qv = _per_seed(per_run, v, "sigma2"), _per_seed(q, v, "value")
        if s2 and qv and q_base:
            xs.append(_summary(s2)["mean"])
            ys.append(_summary(qv)["mean"] - _summary(q_base)["mean"])
            used.append(v)
    if len(used) >= 3:
        try:
            corr = pearson_r2(xs, ys)
            b.add("variance_quality_r2", corr.r2, cfg.min_r2, corr.r2 >= cfg.min_r2, r=corr.r, p_value=corr.p_value,
                  variations=used, sigma2=xs, quality_delta=ys, metric=cfg.quality_metric, block=cfg.variance_block)
        except ValueError as e:
            b.missing("variance_quality_r2", cfg.min_r2, str(e), variations=used)
    else:
        b.missing("variance_quality_r2", cfg.min_r2,
                  f"need σ²_Δ and {cfg.quality_metric} for ≥ 3 variations, have {len(used)}", variations=used)

    ft = _per_seed(metric(cfg.finetune_metric), cfg.candidate, "value")
    if ft:
        s = _summary(ft)
        b.add("finetune_compute", s["mean"], cfg.max_finetune_fraction, s["mean"] <= cfg.max_finetune_fraction,
              candidate=s, metric=cfg.finetune_metric, candidate_variation=cfg.candidate)
    else:
        b.missing("finetune_compute", cfg.max_finetune_fraction, f"no {cfg.finetune_metric} metric for the candidate")

    for r in b.rows:
        r.details.setdefault("config", asdict(cfg))  # type: ignore[union-attr]
    return b.rows


# --------------------------------------------------------------------------------------------
# Verdicts from confidence intervals
# --------------------------------------------------------------------------------------------


def ci_criterion(experiment_id: str, criterion: str, ci: PairedBootstrapCI, threshold: float, direction: str, *,
                 code_version: str = "", **details) -> CriterionResult:
    """A :class:`CriterionResult` from a bootstrap CI: value = the estimate, verdict from the CI.

    Example:
        >>> r = ci_criterion("exp", "speedup", ci, 1.4, "at_least"); r.verdict, r.ci_low, r.ci_high
    """
    v = verdict(ci.ci_low, ci.ci_high, threshold, direction)
    info = {"verdict": v, "ci_low": ci.ci_low, "ci_high": ci.ci_high, "confidence": ci.confidence,
            "direction": direction, "statistic": ci.statistic, "n_samples": ci.n, "n_clusters": ci.n_clusters,
            "method": ci.method, "n_undefined": ci.n_undefined, **details}
    passed = {"PASS": True, "FAIL": False, "INCONCLUSIVE": None}[v]
    logger.info("criterion %s = %.4g [%.4g, %.4g] vs %s %g: %s", criterion, ci.estimate, ci.ci_low, ci.ci_high,
                direction, threshold, v)
    return CriterionResult(experiment_id, criterion, passed, ci.estimate, threshold, info, code_version,
                           verdict=v, ci_low=ci.ci_low, ci_high=ci.ci_high)


def paired_criterion(experiment_id: str, criterion: str, candidate, baseline, *, threshold: float, direction: str,
                     statistic: str = "relative_difference", clusters=None, n_resamples: int = 10_000,
                     confidence: float = 0.95, seed: int = 0, code_version: str = "", **details) -> CriterionResult:
    """Evaluate a criterion from paired per-sample values with a clustered bootstrap CI.

    Args:
        candidate, baseline: per-sample values, row i = the same (seed, sample) in both.
        threshold, direction: e.g. ``-0.02, "at_least"`` for ΔCLIPScore ≥ −2 %.
        statistic: a key of :data:`fcr_eval.analysis.stats.PAIRED_STATISTICS` (default relative difference).
        clusters: a label per row (the seed), for the two-stage bootstrap.

    Example:
        >>> r = paired_criterion("exp", "alignment_delta", fcr_hits, fd5_hits, threshold=-0.02,
        ...                      direction="at_least", clusters=seeds)
        >>> r.verdict in VERDICTS
        True
    """
    ci = paired_bootstrap_ci(candidate, baseline, clusters=clusters, statistic=statistic, n_resamples=n_resamples,
                             confidence=confidence, seed=seed)
    return ci_criterion(experiment_id, criterion, ci, threshold, direction, code_version=code_version, **details)


TIMING_COLUMNS = ("variation_id", "seed", "repeat", "batch_size", "sec_per_image")


def _paired_repeats(t: pl.DataFrame, baseline: str, candidate: str, column: str) -> pl.DataFrame:
    keep = ["seed", "repeat", column]
    b = t.filter(pl.col("variation_id") == baseline).select(keep).drop_nulls()
    c = t.filter(pl.col("variation_id") == candidate).select(keep).drop_nulls()
    return b.join(c, on=["seed", "repeat"], how="inner", suffix="_candidate").sort(["seed", "repeat"])


def timing_criteria(experiment_id: str, config: CriteriaConfig, timings: pl.DataFrame, *, n_resamples: int = 10_000,
                    seed: int = 0, code_version: str = "") -> list[CriterionResult]:
    """``speedup`` and ``extra_memory`` with CIs from repeated, interleaved timings.

    ``timings`` has one row per (variation, seed, repeat) at each batch size — columns
    :data:`TIMING_COLUMNS` plus ``peak_memory_bytes`` / ``memory_kind`` for memory. Repeat ``r`` of
    the baseline and of the candidate must have been timed back to back in one process (interleaved,
    order alternating), so a slow spell of the machine hits both; the criteria therefore pair rows
    by (seed, repeat) and bootstrap the pairs, clustered by seed. Speed-up is mean(baseline s/img)
    ÷ mean(candidate s/img); extra memory is the relative difference of mean peak memory.

    Example:
        >>> rows = timing_criteria("exp", cfg, timings)   # columns variation_id, seed, repeat, ...
        >>> [(r.criterion, r.verdict) for r in rows]
    """
    cfg = config
    missing = [c for c in TIMING_COLUMNS if c not in timings.columns]
    if missing:
        raise ValueError(f"timing_criteria needs columns {list(TIMING_COLUMNS)}; missing {missing} "
                         "(one row per variation, seed and repeat of interleaved timings)")
    b = _Builder(experiment_id, code_version)
    roles = {"baseline_variation": cfg.baseline, "candidate_variation": cfg.candidate,
             "batch_size": cfg.timing_batch_size}
    t = timings.filter(pl.col("batch_size") == cfg.timing_batch_size)
    sec = _paired_repeats(t, cfg.baseline, cfg.candidate, "sec_per_image")
    if sec.height >= 2:
        b.rows.append(paired_criterion(
            experiment_id, "speedup", sec["sec_per_image_candidate"], sec["sec_per_image"], threshold=cfg.min_speedup,
            direction="at_least", statistic="inverse_ratio", clusters=sec["seed"], n_resamples=n_resamples, seed=seed,
            code_version=code_version, n_repeats=sec.height, **roles))
    else:
        b.missing("speedup", cfg.min_speedup, f"need >= 2 paired (seed, repeat) timings at batch size "
                  f"{cfg.timing_batch_size} for both variations, have {sec.height}", **roles)
    mem_rows = t.filter(pl.col("peak_memory_bytes").is_not_null()) if "peak_memory_bytes" in t.columns else t.clear()
    kinds = sorted(set(mem_rows["memory_kind"].to_list())) if "memory_kind" in mem_rows.columns else []
    mem = _paired_repeats(mem_rows, cfg.baseline, cfg.candidate, "peak_memory_bytes") if mem_rows.height else mem_rows
    if len(kinds) > 1:
        b.missing("extra_memory", cfg.max_extra_memory, f"memory kinds differ: {kinds}; compare like with like")
    elif mem.height >= 2:
        b.rows.append(paired_criterion(
            experiment_id, "extra_memory", mem["peak_memory_bytes_candidate"].cast(pl.Float64),
            mem["peak_memory_bytes"].cast(pl.Float64), threshold=cfg.max_extra_memory, direction="at_most",
            statistic="relative_difference", clusters=mem["seed"], n_resamples=n_resamples, seed=seed,
            code_version=code_version, memory_kind=kinds[0] if kinds else None, n_repeats=mem.height, **roles))
    else:
        b.missing("extra_memory", cfg.max_extra_memory, "need >= 2 paired peak-memory measurements for both variations")
    for r in b.rows:
        r.details.setdefault("config", asdict(cfg))  # type: ignore[union-attr]
    return b.rows
