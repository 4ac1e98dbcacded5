"""The ``[human_study]`` table: the A/B preference study over stored samples (``fcr-human-study``).

Example::

    human = load_human_study(chk, raw["human_study"], [v.id for v in variations])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fcr_eval.spec.checker import Checker

__all__ = ["HumanStudySpec", "load_human_study"]


@dataclass(frozen=True)
class HumanStudySpec:
    pairs: int = 1000
    comparisons: tuple[tuple[str, str], ...] = ()
    attention_checks: int = 0
    pairs_per_rater: int = 50
    description: str = ""


def load_human_study(chk: Checker, raw: Any, ids: Sequence[str]) -> HumanStudySpec:
    """``[human_study]`` → :class:`HumanStudySpec`; every compared id is a variation of this profile."""
    human = chk.build(HumanStudySpec, raw, "human_study")
    for a, b in human.comparisons:
        for val in (a, b):
            chk.one_of(val, ids, "human_study.comparisons[]", "human_study", "comparisons")
    return human
