"""The ``[criteria]`` table of an experiment file: which variations play which role in the
design's success criteria, which metrics they use, and the thresholds (design.md §1).

Evaluating them is :mod:`fcr_eval.analysis.criteria` (from frames) and
:mod:`fcr_eval.report.board` (from a store).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fcr_eval.spec.checker import Checker
from fcr_eval.spec.evaluation import EvaluationSpec

__all__ = ["CriteriaConfig", "FAMILY_ADJUSTMENTS", "THRESHOLD_RANGES", "load_criteria"]

#: Family-wise adjustments the criteria board offers.
FAMILY_ADJUSTMENTS = ("none", "holm")

#: Each threshold's meaningful values: (lowest, highest, lowest excluded, what the number is).
#: A value outside can never decide anything (a speed-up of -1, a drop of 500 % of the alignment).
THRESHOLD_RANGES: dict[str, tuple[float | None, float | None, bool, str]] = {
    "min_speedup": (0.0, None, True, "a speed-up is baseline ÷ candidate seconds per image, > 0 (1 = as fast)"),
    "max_alignment_drop": (0.0, 1.0, False, "a drop is a fraction of the baseline's alignment, from 0 (none) to "
                                            "1 (all of it)"),
    "max_quality_increase": (-1.0, None, False, "a relative change of the quality metric is -1 (-100 %) or more"),
    "max_extra_memory": (-1.0, None, False, "a relative change of peak memory is -1 (-100 %) or more"),
    "min_variance_reduction": (0.0, 1.0, False, "a reduction of σ²_Δ is a fraction from 0 to 1"),
    "min_r2": (0.0, 1.0, False, "R² is from 0 to 1"),
    "max_finetune_fraction": (0.0, None, True, "a fraction of the pre-training compute, > 0"),
}


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
    #: ``"holm"``: verdicts of the criteria with an interval are Holm-adjusted as one family (the
    #: adjustment is recorded with each verdict); ``"none"``: each at its own 95 %.
    family_adjustment: str = "none"

    def __post_init__(self) -> None:
        if self.family_adjustment not in FAMILY_ADJUSTMENTS:
            raise ValueError(f"family_adjustment = {self.family_adjustment!r} is not one of {list(FAMILY_ADJUSTMENTS)}")


def load_criteria(chk: Checker, raw: Any, ids: Sequence[str], evaluation: EvaluationSpec) -> CriteriaConfig:
    """``[criteria]`` → :class:`CriteriaConfig`; every role names a variation of this profile, the
    roles compare different variations, every threshold is a value that can decide something, and
    the speed criterion's batch size is one the experiment times."""
    criteria = chk.build(CriteriaConfig, raw, "criteria")  # roles + thresholds, design.md §1
    if criteria.r2_variations is not None:
        if not isinstance(criteria.r2_variations, list):
            chk.fail("criteria.r2_variations must be a list of variation ids", "criteria", "r2_variations")
        criteria = dataclasses.replace(criteria, r2_variations=tuple(criteria.r2_variations))
    for k in ("baseline", "candidate", "no_fcr_reference"):
        val = getattr(criteria, k)
        if val is not None:
            chk.one_of(val, ids, f"criteria.{k}", "criteria", k)
    for val in criteria.r2_variations or ():
        chk.one_of(val, ids, "criteria.r2_variations[]", "criteria", "r2_variations")
    for role in ("baseline", "no_fcr_reference"):
        if getattr(criteria, role) == criteria.candidate:
            chk.fail(f"criteria.{role} = criteria.candidate = {criteria.candidate!r}: a criterion compares two "
                     "different variations; name the one the candidate is judged against", "criteria", role)
    for name, (low, high, low_open, what) in THRESHOLD_RANGES.items():
        value = getattr(criteria, name)
        too_low = low is not None and (value <= low if low_open else value < low)
        if too_low or (high is not None and value > high):
            chk.fail(f"criteria.{name} = {value} means nothing: {what}", "criteria", name)
    if criteria.timing_batch_size not in evaluation.timing_batch_sizes:
        chk.fail(f"criteria.timing_batch_size = {criteria.timing_batch_size} is not a batch size the experiment "
                 f"times (evaluation.timing_batch_sizes = {list(evaluation.timing_batch_sizes)}), so the speed "
                 "criterion would never be decided; use one of them", "criteria", "timing_batch_size")
    return criteria
