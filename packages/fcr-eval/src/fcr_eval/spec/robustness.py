"""The ``[[robustness]]`` table: the stresses a variation may sample under (exp-2's resolution
change, noise-schedule perturbation, FGSM on x_T, out-of-distribution prompts).

Example::

    robustness = load_robustness(chk, raw.get("robustness", []))
    robustness["none"].kind       # 'none': every file has the unstressed protocol
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fcr_eval.spec.checker import Checker
from fcr_eval.spec.vocabulary import PROTOCOL_SETTINGS
from fcr_eval.spec.vocabulary import ROBUSTNESS_PROTOCOLS as ROBUSTNESS_KINDS

__all__ = ["RobustnessSpec", "load_robustness"]


@dataclass(frozen=True)
class RobustnessSpec:
    """A stress applied at sampling time; ``kind`` is one of fcr_eval.metrics.robustness.PROTOCOLS."""

    id: str
    kind: str
    description: str = ""
    settings: dict = field(default_factory=dict)


def load_robustness(chk: Checker, raw: Any) -> dict[str, RobustnessSpec]:
    """``[[robustness]]`` → protocol id → :class:`RobustnessSpec`, with ``"none"`` always there."""
    robustness: dict[str, RobustnessSpec] = {"none": RobustnessSpec("none", "none", "no stress")}
    for i, r in enumerate(raw):
        spec = chk.build(RobustnessSpec, r, "robustness", i, label=f"robustness[{i}]")
        chk.name(spec.id, f"robustness[{i}].id", "robustness", "id", i)
        chk.one_of(spec.kind, ROBUSTNESS_KINDS, f"robustness[{i}].kind", "robustness", "kind", i)
        allowed = PROTOCOL_SETTINGS
        for k in spec.settings:
            if k not in allowed[spec.kind]:
                chk.fail(f"robustness[{i}].settings.{k} is not a setting of {spec.kind!r}; allowed: "
                         f"{sorted(allowed[spec.kind])}", "robustness", "settings", i)
        robustness[spec.id] = spec
    return robustness
