"""The success-criteria board of a stored experiment: reads the store, evaluates the design's
criteria (:mod:`fcr_eval.analysis.criteria`), replaces paired alignment where per-sample values
exist, and turns verdicts the data cannot carry into INCONCLUSIVE. It writes nothing: the caller
keeps the verdicts (``ResultsStore.write_criteria``; ``fcr-eval run`` does).

Example:
    >>> cfg = CriteriaConfig(baseline="fd-5", candidate="fcr-0.10-fd-10", no_fcr_reference="fd-10")
    >>> rows = evaluate_store_criteria(ResultsStore("results/fcr.duckdb"), "mini-exp-1", cfg)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import polars as pl

from fcr_eval.analysis.criteria import evaluate_criteria, paired_criterion
from fcr_eval.analysis.verdicts import holm_verdicts
from fcr_eval.records import CriterionResult
from fcr_eval.spec.criteria import CriteriaConfig
from fcr_eval.spec.vocabulary import SHARED_FINETUNE
from fcr_eval.store import ResultsStore

__all__ = ["evaluate_store_criteria", "PER_SAMPLE_ALIGNMENT"]

logger = logging.getLogger(__name__)


#: The per-sample form of each set-level alignment metric (pairs across variations by seed and sample).
PER_SAMPLE_ALIGNMENT = {"class_agreement": "class_correct", "clip_score": "clip_score"}


def _paired_alignment(store: ResultsStore, experiment_id: str, cfg: CriteriaConfig, version: str):
    """ΔCLIPScore / Δclass agreement as a paired relative difference with a seed-clustered
    bootstrap CI, from the per-sample values both variations stored; ``None`` without them."""
    from fcr_eval.analysis.contrasts import pair_samples

    metric = PER_SAMPLE_ALIGNMENT.get(cfg.alignment_metric)
    if metric is None:
        return None
    per_sample = store.sample_metrics(experiment_id=experiment_id, metric=metric,
                                      variation_id=[cfg.baseline, cfg.candidate])
    if per_sample.height == 0 or per_sample["variation_id"].n_unique() < 2:
        return None
    pairs = pair_samples(per_sample, metric, [cfg.candidate, cfg.baseline])
    cand, base = pairs[cfg.candidate].to_numpy(), pairs[cfg.baseline].to_numpy()
    if len(cand) < 2 or float(base.mean()) == 0.0:
        return None
    return paired_criterion(experiment_id, "alignment_delta", cand, base, threshold=-cfg.max_alignment_drop,
                            direction="at_least", statistic="relative_difference", clusters=pairs["seed"].to_numpy(),
                            code_version=version, metric=metric, baseline_variation=cfg.baseline,
                            candidate_variation=cfg.candidate, pairs=len(cand))


def _undecided_when_unsound(r: CriterionResult, store: ResultsStore, experiment_id: str) -> CriterionResult:
    """A verdict the data cannot carry becomes INCONCLUSIVE, with the reason: a quality delta from
    Fréchet distances of fewer samples than feature dimensions (singular covariance), and an R²
    whose correlation is not significant at 5 % (e.g. three points)."""
    from fcr_eval.records import unestimable_fd

    reason = None
    if r.criterion == "quality_delta" and r.value is not None:
        metric = str(r.details.get("metric", ""))
        m = store.metrics(experiment_id=experiment_id, metric=metric)
        worst = unestimable_fd(m) if m.height else None
        if worst is not None:
            reason = (f"{metric} from {worst[0]} samples per run in {worst[1]} dimensions is not "
                      "estimable (singular covariance); judge quality by the paired contrasts")
    elif r.criterion == "variance_quality_r2" and r.value is not None:
        p = r.details.get("p_value")
        if p is None or not p < 0.05:
            reason = f"the correlation is not significant (p = {p:.2g}, {len(r.details.get('variations', []))} points)"
    if reason is None:
        return r
    details = {**r.details, "reason": reason, "verdict_without_uncertainty": r.verdict}
    return dataclasses.replace(r, passed=None, verdict="INCONCLUSIVE", details=details)


#: Criteria about the training method, with the two variations whose weights they compare.
_METHOD_CRITERIA = {"quality_delta": ("candidate", "baseline"), "alignment_delta": ("candidate", "baseline"),
                    "variance_reduction": ("candidate", "no_fcr_reference")}


def _undecided_when_shared(r: CriterionResult, cfg: CriteriaConfig,
                           replication: Callable[[tuple[str, ...]], str]) -> CriterionResult:
    roles = _METHOD_CRITERIA.get(r.criterion)
    if roles is None or r.verdict not in ("PASS", "FAIL"):
        return r
    sides = tuple(getattr(cfg, role) for role in roles if getattr(cfg, role))
    if len(sides) < 2 or replication(sides) != SHARED_FINETUNE:
        return r
    reason = (f"{sides[0]} is one fine-tune shared by every seed: the value holds sampling noise only, not "
              "fine-tune-to-fine-tune variation, so it cannot decide a claim about the training method")
    return dataclasses.replace(r, passed=None, verdict="INCONCLUSIVE",
                               details={**r.details, "reason": reason, "verdict_without_uncertainty": r.verdict})


def interval_df(details: dict) -> int | None:
    """The degrees of freedom of a stored interval, read from its method's name
    (:func:`fcr_eval.analysis.replication.method_name`: ``… (G-1 df)`` over ``n_clusters``,
    ``… (n-1 df)`` over ``n_samples``); ``None`` for a bootstrap or normal interval."""
    method = str(details.get("method") or "")
    for tag, count in (("(G-1 df)", "n_clusters"), ("(n-1 df)", "n_samples")):
        if tag in method and details.get(count):
            return int(details[count]) - 1
    return None


def _family_adjusted(rows: list[CriterionResult], adjustment: str) -> list[CriterionResult]:
    """Holm over the criteria whose verdict comes from an interval (the others keep theirs); every
    row records the adjustment and the family size."""
    decided = [i for i, r in enumerate(rows) if r.verdict in ("PASS", "FAIL", "INCONCLUSIVE")
               and r.ci_low is not None and r.ci_high is not None and r.value is not None
               and r.details.get("direction") in ("at_least", "at_most") and "reason" not in r.details]
    note = {"family_adjustment": adjustment, "family_size": len(decided)}
    if adjustment != "holm" or not decided:
        return [dataclasses.replace(r, details={**r.details, **note}) for r in rows]
    adjusted = holm_verdicts([(rows[i].value, rows[i].ci_low, rows[i].ci_high, rows[i].threshold,
                               rows[i].details["direction"], interval_df(rows[i].details)) for i in decided])
    out = list(rows)
    for i, v in zip(decided, adjusted, strict=True):
        r = rows[i]
        out[i] = dataclasses.replace(r, verdict=v, passed={"PASS": True, "FAIL": False}.get(v),
                                     details={**r.details, **note, "verdict_unadjusted": r.verdict})
    return [dataclasses.replace(r, details={**r.details, **note}) if i not in decided else r
            for i, r in enumerate(out)]


def evaluate_store_criteria(store: ResultsStore, experiment_id: str, config: CriteriaConfig, *,
                            replication: Callable[[tuple[str, ...]], str] | None = None) -> list[CriterionResult]:
    """Evaluate the criteria of ``experiment_id`` from ``store`` (read only).

    ``replication`` (:func:`fcr_eval.analysis.replication.contrast_replication` over the weights the
    runs sampled) says how two variations' weights were replicated; a criterion about the training
    method whose FCR side is one fine-tune shared by every seed is INCONCLUSIVE, with the reason.
    ``config.family_adjustment = "holm"`` adjusts the verdicts of the criteria with an interval as
    one family (recorded in each verdict's details).

    Example:
        >>> rows = evaluate_store_criteria(ResultsStore.open_readonly("results/fcr.duckdb"), "mini-exp-1", cfg)
        >>> ResultsStore("results/fcr.duckdb").write_criteria(rows)     # to keep them
    """
    from fcr_eval.provenance import code_version

    version = code_version()
    rounds = store.timing_rounds(experiment_id)
    # An interleaved timing session (rounds of back-to-back timings) gives the speed criteria a CI;
    # without one they fall back to the per-run timings' seed means.
    timings = (rounds.with_columns(pl.lit(0).alias("seed"), pl.col("round").alias("repeat"))
               if rounds.height and rounds["round"].n_unique() > 1 else store.timings(experiment_id=experiment_id))
    rows = evaluate_criteria(
        experiment_id, config, metrics=store.metrics(experiment_id=experiment_id),
        timings=timings, feature_stats=store.feature_stats(experiment_id=experiment_id), code_version=version,
    )
    paired = _paired_alignment(store, experiment_id, config, version)
    if paired is not None:
        rows = [paired if r.criterion == "alignment_delta" else r for r in rows]
    rows = [_undecided_when_unsound(r, store, experiment_id) for r in rows]
    if replication is not None:
        rows = [_undecided_when_shared(r, config, replication) for r in rows]
    rows = _family_adjusted(rows, config.family_adjustment)
    for r in rows:
        logger.info("criterion %-20s %s value=%s threshold=%s", r.criterion,
                    {True: "PASS", False: "FAIL", None: "n/a"}[r.passed], r.value, r.threshold)
    return rows
