"""PASS / FAIL / INCONCLUSIVE from a confidence interval and a threshold: the one rule every
contrast and criterion verdict uses."""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy import stats as _st

from fcr_eval.spec.vocabulary import DIRECTIONS

__all__ = ["verdict", "holm_verdicts"]


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


def holm_verdicts(intervals: Sequence[tuple], *, confidence: float = 0.95) -> list[str]:
    """Verdicts of a family of criteria, Holm-adjusted (Holm 1979, "A simple sequentially rejective
    multiple test procedure", Scand. J. Statist. 6, 65–70).

    Each entry is ``(estimate, ci_low, ci_high, threshold, direction)`` with a two-sided
    ``confidence`` interval, optionally followed by the interval's degrees of freedom (a t interval
    over G clusters has G − 1; ``None``: a normal or bootstrap interval). Every criterion carries two
    one-sided claims — PASS (the value is on the passing side of the threshold) and FAIL (on the
    failing side) — each at level α/2 unadjusted, which is what :func:`verdict` reads off the
    interval. Their p-values come from the interval read back as estimate ± q·se (q the t quantile at
    those df, else the normal one; se = width / (2q)), so an unadjusted claim is rejected exactly when
    the interval excludes the threshold (for an asymmetric interval, e.g. Fieller's, this is an
    approximation); Holm's step-down then rejects across all 2·m claims
    at family level α = 1 − ``confidence``. A criterion is PASS / FAIL when its claim is rejected,
    INCONCLUSIVE otherwise; Holm keeps the chance that any claim of the family is wrong at ≤ α.
    With one criterion it gives the unadjusted verdict.

    Example:
        >>> holm_verdicts([(1.6, 1.5, 1.7, 1.4, "at_least"), (0.01, -0.01, 0.03, 0.02, "at_most")])
        ['PASS', 'INCONCLUSIVE']
    """
    alpha = 1 - confidence
    claims = []  # (p, index, verdict if rejected)
    for i, entry in enumerate(intervals):
        est, lo, hi, thr, direction = entry[:5]
        df = entry[5] if len(entry) > 5 else None
        if direction not in DIRECTIONS:
            raise ValueError(f"direction {direction!r} is not one of {DIRECTIONS}")
        dist = _st.t(df) if df is not None and df >= 1 else _st.norm
        se = (hi - lo) / (2 * dist.ppf(1 - alpha / 2))
        sign = 1.0 if direction == "at_least" else -1.0
        if se > 0 and math.isfinite(se):
            zs = sign * (est - thr) / se
            claims += [(float(dist.sf(zs)), i, "PASS"), (float(dist.cdf(zs)), i, "FAIL")]
        else:  # a zero-width interval: decided without uncertainty
            claims.append((0.0 if sign * (est - thr) != 0 else 1.0, i, "PASS" if sign * (est - thr) >= 0 else "FAIL"))
    out = ["INCONCLUSIVE"] * len(intervals)
    claims.sort(key=lambda c: c[0])
    # One-sided claims at α/2 each reproduce the unadjusted verdicts; Holm spreads α over 2m claims.
    for k, (p, i, v) in enumerate(claims):
        if p > alpha / (len(claims) - k):
            break
        out[i] = v
    return out
