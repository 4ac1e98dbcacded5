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

Example:
    >>> cfg = CriteriaConfig(baseline="fd-5", candidate="fcr-0.10-fd-10", no_fcr_reference="fd-10")
    >>> results = evaluate_store_criteria(store, "mini-exp-1", cfg)   # also written to `criteria`
    >>> [(r.criterion, r.passed, round(r.value, 3)) for r in results]
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import polars as pl

from .stats import mean_ci, pearson_r2
from .store import CriterionResult, ResultsStore

__all__ = ["CriteriaConfig", "evaluate_criteria", "evaluate_store_criteria"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CriteriaConfig:
    """Which variations play which role, which metrics to use, and the thresholds."""

    baseline: str
    candidate: str
    no_fcr_reference: str | None = None
    quality_metric: str = "fd_efficientnet_lite0"
    alignment_metric: str = "class_agreement"
    finetune_metric: str = "finetune_compute_fraction"
    timing_batch_size: int = 1
    variance_block: str = "all"
    r2_variations: Sequence[str] | None = None
    max_quality_increase: float = 0.05
    max_alignment_drop: float = 0.02
    min_speedup: float = 1.4
    max_extra_memory: float = 0.02
    min_variance_reduction: float = 0.30
    min_r2: float = 0.6
    max_finetune_fraction: float = 0.03


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
                                         details, self.code_version))

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


def evaluate_store_criteria(store: ResultsStore, experiment_id: str, config: CriteriaConfig, *,
                            write: bool = True) -> list[CriterionResult]:
    """Evaluate the criteria of ``experiment_id`` from ``store`` and (by default) write them to its
    ``criteria`` table, replacing earlier verdicts.

    Example:
        >>> evaluate_store_criteria(ResultsStore("results/fcr.duckdb"), "mini-exp-1", cfg)
    """
    from .provenance import code_version

    rows = evaluate_criteria(
        experiment_id, config, metrics=store.metrics(experiment_id=experiment_id),
        timings=store.timings(experiment_id=experiment_id), feature_stats=store.feature_stats(experiment_id=experiment_id),
        code_version=code_version(),
    )
    if write:
        store.write_criteria(rows)
    for r in rows:
        logger.info("criterion %-20s %s value=%s threshold=%s", r.criterion,
                    {True: "PASS", False: "FAIL", None: "n/a"}[r.passed], r.value, r.threshold)
    return rows
