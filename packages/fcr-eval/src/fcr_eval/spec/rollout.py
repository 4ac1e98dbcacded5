"""A variation's rollout options (``lambda_rollout`` and ``rollout_*``): their defaults, their
check and their resolved form.

``lambda_rollout`` (> 0) fine-tunes with the rollout term (:mod:`fcr_train.rollout`): ``rollout_k``
stale steps of ``rollout_cache`` after a key step on the variation's sampler grid, against the same
steps fresh. Unset options take :data:`fcr_train.vocabulary.ROLLOUT_DEFAULTS`, the values
:class:`fcr_train.rollout.RolloutConfig` itself defaults to; the planner builds that config from
:class:`RolloutSettings` with the variation's step count and distance.

Example::

    settings = resolve_rollout(variation)          # None without lambda_rollout
    check_rollout(chk, variation, i, steps=20)     # file:line errors for what the file may not say
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fcr_train.vocabulary import OC_CACHES, OC_TRAINABLE, ROLLOUT_DEFAULTS, ROLLOUT_TARGETS

from fcr_eval.spec.checker import Checker

__all__ = ["ROLLOUT_OPTIONS", "RolloutSettings", "resolve_rollout", "check_rollout"]

#: A variation's rollout options (``rollout_<name>`` in the file) and their defaults.
ROLLOUT_OPTIONS = {"k": ROLLOUT_DEFAULTS["k"], "cache": ROLLOUT_DEFAULTS["cache"], "target": ROLLOUT_DEFAULTS["target"],
                   "noise_power": ROLLOUT_DEFAULTS["noise_power"], "trainable": ROLLOUT_DEFAULTS["trainable"],
                   "rows": ROLLOUT_DEFAULTS["rollout_rows"], "guidance_scale": ROLLOUT_DEFAULTS["guidance_scale"]}


@dataclass(frozen=True)
class RolloutSettings:
    """A rollout fine-tune's options, defaults filled in."""

    lam: float
    k: int
    cache: str
    target: str
    noise_power: float
    trainable: str
    rows: int | None
    guidance_scale: float


# ``v`` below is a :class:`fcr_eval.spec.variations.VariationSpec` (which imports this module).


def resolve_rollout(v: Any) -> RolloutSettings | None:
    """``v``'s rollout options with the defaults filled in, or ``None`` without ``lambda_rollout``."""
    if v.lambda_rollout is None:
        return None
    given = {name: getattr(v, f"rollout_{name}") for name in ROLLOUT_OPTIONS}
    return RolloutSettings(lam=v.lambda_rollout, **{k: default if given[k] is None else given[k]
                                                    for k, default in ROLLOUT_OPTIONS.items()})


def check_rollout(chk: Checker, v: Any, i: int, steps: int) -> None:
    """``lambda_rollout`` and its options: one objective per fine-tune, each option only with its
    term, and a segment (a key step and ``rollout_k`` more) that fits in the variation's ``steps``."""
    sec, name = "variations", f"variations[{i}] ({v.id})"
    if v.lambda_rollout is None:
        for opt in ROLLOUT_OPTIONS:
            if getattr(v, f"rollout_{opt}") is not None:
                chk.fail(f"{name}.rollout_{opt} is an option of the rollout term, but the variation sets no "
                         "lambda_rollout", sec, f"rollout_{opt}", i)
        return
    others = [k for k in ("lambda_fcr", "lambda_oc") if getattr(v, k) is not None]
    if others:
        chk.fail(f"{name} sets both {others[0]} and lambda_rollout: a fine-tune trains one term besides denoising; "
                 "make two variations", sec, "lambda_rollout", i)
    if not v.lambda_rollout > 0:
        chk.fail(f"{name}.lambda_rollout = {v.lambda_rollout} must be > 0 (the λ = 0 control is lambda_fcr = 0)",
                 sec, "lambda_rollout", i)
    if v.blocks is not None:
        chk.fail(f"{name}.blocks chooses FCR's encoder blocks; the rollout term compares sampler states "
                 "(rollout_cache says whose stale path): drop blocks", sec, "blocks", i)
    k = v.rollout_k
    if k is not None and (not isinstance(k, int) or k < 0 or k > steps - 1):
        chk.fail(f"{name}.rollout_k = {k!r} stale steps must be an integer in [0, {steps - 1}]: the segment (a key "
                 f"step and k more) must fit in the variation's {steps} sampler steps", sec, "rollout_k", i)
    for opt, allowed in (("cache", OC_CACHES), ("target", ROLLOUT_TARGETS), ("trainable", OC_TRAINABLE)):
        if getattr(v, f"rollout_{opt}") is not None:
            chk.one_of(getattr(v, f"rollout_{opt}"), allowed, f"{name}.rollout_{opt}", sec, f"rollout_{opt}", i)
    if v.rollout_noise_power is not None and not v.rollout_noise_power >= 0:
        chk.fail(f"{name}.rollout_noise_power = {v.rollout_noise_power} must be >= 0 (0: key steps uniform over the "
                 "sampler's steps)", sec, "rollout_noise_power", i)
    if v.rollout_rows is not None and (not isinstance(v.rollout_rows, int) or v.rollout_rows < 1):
        chk.fail(f"{name}.rollout_rows = {v.rollout_rows!r} must be an integer >= 1 (rows of each batch that run "
                 "the rollout; leave it out for all)", sec, "rollout_rows", i)
    if v.rollout_guidance_scale is not None and not v.rollout_guidance_scale > 0:
        chk.fail(f"{name}.rollout_guidance_scale = {v.rollout_guidance_scale} must be > 0 (1 = the rollouts run "
                 "without classifier-free guidance)", sec, "rollout_guidance_scale", i)
