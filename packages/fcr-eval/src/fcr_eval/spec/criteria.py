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

__all__ = ["CriteriaConfig", "FAMILY_ADJUSTMENTS", "load_criteria"]

#: Family-wise adjustments the criteria board offers.
FAMILY_ADJUSTMENTS = ("none", "holm")


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


def load_criteria(chk: Checker, raw: Any, ids: Sequence[str]) -> CriteriaConfig:
    """``[criteria]`` → :class:`CriteriaConfig`; every role names a variation of this profile."""
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
    return criteria
