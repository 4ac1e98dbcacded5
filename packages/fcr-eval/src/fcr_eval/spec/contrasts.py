"""The ``[[contrasts]]`` of an experiment file: what each paired comparison compares.

:class:`ContrastSpec` is the schema of one entry (checked when it is built) and
:func:`check_contrast` checks it against the experiment's variations; computing a contrast from
stored per-sample values is :mod:`fcr_eval.analysis.contrasts`.

Example:
    >>> spec = ContrastSpec("stride-gap", "difference", "cache_mse", candidate="fd-10", baseline="fd-5")
    >>> check_contrast(spec, ["fd-5", "fd-10"])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fcr_eval.spec.checker import Checker, SpecFieldError, check_profile_names
from fcr_eval.spec.names import NAME_RULE, name_problem
from fcr_eval.spec.vocabulary import CACHED_SAMPLERS, DIRECTIONS, SAMPLE_METRICS

__all__ = ["CONTRAST_KINDS", "ContrastSpec", "ContrastSpecError", "check_contrast", "load_contrasts",
           "RECOVERED_FRACTION_HALF_WIDTH"]


#: Contrast kind → the statistic of :mod:`fcr_eval.analysis.stats` that computes it.
CONTRAST_KINDS = {
    "difference": "mean_difference",
    "relative_difference": "relative_difference",
    "recovered_fraction": "recovered_fraction",
}


#: The CI half-width a recovered fraction should reach to answer the study's question.
RECOVERED_FRACTION_HALF_WIDTH = 0.15


class ContrastSpecError(SpecFieldError):
    """A contrast is malformed; ``key`` names the offending field (for file:line reporting)."""


@dataclass(frozen=True)
class ContrastSpec:
    """One paired comparison of an experiment (a ``[[contrasts]]`` entry).

    Attributes:
        id: its name (:data:`fcr_eval.spec.names.NAME_PATTERN`).
        kind: a key of :data:`CONTRAST_KINDS`.
        metric: a per-sample metric of :data:`fcr_eval.spec.vocabulary.SAMPLE_METRICS`.
        candidate, baseline: variation ids.
        target: ``recovered_fraction`` only — the variation whose value marks a closed gap.
        threshold, direction: optional criterion: ``direction`` ``"at_least"`` / ``"at_most"``.
        description: free text shown with the number.
        confidence: the interval's level.
        n_resamples: size of the bootstrap of the set-level gap (a recovered fraction's warning).
        target_half_width: the half-width the precision plan aims at (default: 0.15 for a
            recovered fraction, the study's target; half the current half-width otherwise).
        profiles: the contrast exists only in these profiles (like a variation's ``profiles``).
    """

    id: str
    kind: str
    metric: str
    candidate: str
    baseline: str
    target: str | None = None
    threshold: float | None = None
    direction: str | None = None
    description: str = ""
    confidence: float = 0.95
    n_resamples: int = 10_000
    profiles: tuple[str, ...] | None = None
    target_half_width: float | None = None

    def __post_init__(self) -> None:
        problem = name_problem(self.id)
        if problem:
            raise ContrastSpecError(f"id = {problem}; an id is {NAME_RULE}", "id")
        if self.kind not in CONTRAST_KINDS:
            raise ContrastSpecError(f"kind = {self.kind!r} is not one of {list(CONTRAST_KINDS)}", "kind")
        if (self.kind == "recovered_fraction") != (self.target is not None):
            raise ContrastSpecError(
                "a recovered_fraction contrast needs target = the small-stride variation (a closed gap)"
                if self.target is None else f"target is only used by kind 'recovered_fraction', not {self.kind!r}",
                "target")
        if (self.threshold is None) != (self.direction is None):
            raise ContrastSpecError("threshold and direction come together (direction = 'at_least' or 'at_most')",
                                    "direction" if self.direction is None else "threshold")
        if self.direction is not None and self.direction not in DIRECTIONS:
            raise ContrastSpecError(f"direction = {self.direction!r} is not one of {list(DIRECTIONS)}", "direction")
        if self.candidate == self.baseline:
            raise ContrastSpecError(f"candidate and baseline are both {self.candidate!r}", "baseline")
        if not 0 < self.confidence < 1:
            raise ContrastSpecError(f"confidence = {self.confidence} must be in (0, 1)", "confidence")
        if self.target_half_width is not None and not self.target_half_width > 0:
            raise ContrastSpecError(f"target_half_width = {self.target_half_width} must be > 0", "target_half_width")
        if self.n_resamples < 1000:
            raise ContrastSpecError(f"n_resamples = {self.n_resamples} is too few for a 95 % interval; use >= 1000",
                                    "n_resamples")

    @property
    def precision_target(self) -> float | None:
        """The half-width the precision plan aims at; ``None``: half the current one."""
        if self.target_half_width is not None:
            return self.target_half_width
        return RECOVERED_FRACTION_HALF_WIDTH if self.kind == "recovered_fraction" else None

    @property
    def variations(self) -> tuple[str, ...]:
        """The variations it needs: candidate, baseline (and target)."""
        return (self.candidate, self.baseline) + ((self.target,) if self.target else ())


def check_contrast(spec: ContrastSpec, variation_ids: Sequence[str], samplers: Mapping[str, str] | None = None) -> None:
    """Check that ``spec`` names known variations and a known per-sample metric, and that the
    comparison can be other than zero.

    Args:
        samplers: variation id → sampler kind; with it, a metric measured against the same weights'
            uncached sample (``cache_mse``, ...) is refused between two uncached variations, whose
            values are all zero by construction.

    Raises:
        ContrastSpecError: naming the unknown id and listing the known ones, or what the contrast
            cannot measure.

    Example:
        >>> check_contrast(spec, [v.id for v in experiment.variations])
    """
    if spec.metric not in SAMPLE_METRICS:
        raise ContrastSpecError(f"metric = {spec.metric!r} is not a per-sample metric; known: {sorted(SAMPLE_METRICS)}",
                                "metric")
    for role in ("candidate", "baseline", "target"):
        v = getattr(spec, role)
        if v is not None and v not in variation_ids:
            raise ContrastSpecError(f"{role} = {v!r} is not a variation of this experiment (profile); known variation "
                                    f"ids: {list(variation_ids)}", role)
    if spec.target is not None and spec.target in (spec.candidate, spec.baseline):
        raise ContrastSpecError(f"target = {spec.target!r} is also the {'candidate' if spec.target == spec.candidate else 'baseline'}: "
                                "a recovered fraction needs three different variations", "target")
    if samplers is not None and SAMPLE_METRICS[spec.metric].needs_reference and \
            not any(samplers[v] in CACHED_SAMPLERS for v in (spec.candidate, spec.baseline)):
        raise ContrastSpecError(
            f"metric = {spec.metric!r} compares each sample with the same weights' uncached sample, and candidate "
            f"{spec.candidate!r} and baseline {spec.baseline!r} both sample without a cache: every value is the same "
            "by construction, the contrast is 0 [0, 0]. Compare a cached variation, or use another metric", "metric")


def load_contrasts(chk: Checker, raw: Any, variation_ids: list[str], profile: str | None,
                   profiles: dict, samplers: Mapping[str, str] | None = None) -> tuple[ContrastSpec, ...]:
    """``[[contrasts]]`` → :class:`~fcr_eval.analysis.contrasts.ContrastSpec`, every name checked against this profile."""
    if not isinstance(raw, list):
        chk.fail("contrasts must be an array of tables ([[contrasts]])", None, "contrasts")
    out: list[ContrastSpec] = []
    for i, c in enumerate(raw):
        name = c.get("id", "?") if isinstance(c, dict) else "?"
        try:
            spec = chk.build(ContrastSpec, c, "contrasts", i, label=f"contrasts[{i}] ({name})")
            check_profile_names(chk, spec.profiles, f"contrast {name!r} (contrasts[{i}]).profiles", profiles,
                                 "contrasts", i)
            if spec.profiles is not None and profile not in spec.profiles:
                continue
            check_contrast(spec, variation_ids, samplers)
        except ContrastSpecError as e:
            chk.fail(f"contrast {name!r} (contrasts[{i}]): {e}", "contrasts", e.key, i)
        out.append(spec)
    ids = [c.id for c in out]
    dup = sorted({x for x in ids if ids.count(x) > 1})
    if dup:
        chk.fail(f"duplicate contrast ids {dup}", "contrasts")
    return tuple(out)
