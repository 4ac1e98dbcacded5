"""PASS / FAIL / INCONCLUSIVE from a confidence interval and a threshold: the one rule every
contrast and criterion verdict uses."""

from __future__ import annotations

from fcr_eval.spec.vocabulary import DIRECTIONS

__all__ = ["verdict"]


def verdict(ci_low: float, ci_high: float, threshold: float, direction: str) -> str:
    """``PASS`` / ``FAIL`` / ``INCONCLUSIVE`` of a criterion whose value has the CI [ci_low, ci_high].

    With ``direction="at_least"`` (the value must be ≥ threshold) it passes when ``ci_low ≥
    threshold`` and fails when ``ci_high < threshold``; ``"at_most"`` mirrors it. A CI that
    straddles the threshold is ``INCONCLUSIVE``: the data do not decide.

    Example:
        >>> verdict(1.45, 1.62, 1.4, "at_least"), verdict(1.21, 1.63, 1.4, "at_least")
        ('PASS', 'INCONCLUSIVE')
        >>> verdict(0.031, 0.066, 0.02, "at_most")
        'FAIL'
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction {direction!r} is not one of {DIRECTIONS}")
    if not (ci_low <= ci_high):
        raise ValueError(f"ci_low = {ci_low} must be <= ci_high = {ci_high} (and neither NaN)")
    if direction == "at_least":
        return "PASS" if ci_low >= threshold else "FAIL" if ci_high < threshold else "INCONCLUSIVE"
    return "PASS" if ci_high <= threshold else "FAIL" if ci_low > threshold else "INCONCLUSIVE"
