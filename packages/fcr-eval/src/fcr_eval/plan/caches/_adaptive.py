"""What the two adaptive kinds share: fcr-sample's adaptive hook, attached and removed the same way,
and the plan's cost upper bound — the wrapped cache's forward counts with every step a full one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fcr_eval.plan.caches import CacheKind, cache_kind


def _apply(unet, config) -> None:
    from fcr_sample import apply_adaptive_cache

    apply_adaptive_cache(unet, config)


def _remove(unet) -> None:
    from fcr_sample import remove_adaptive_cache

    remove_adaptive_cache(unet)


def adaptive_kind(wrapped: str, build: Callable[[Any, int], Any]) -> CacheKind:
    """The :class:`CacheKind` of an adaptive cache around kind ``wrapped`` (``"fd"`` or ``"deepcache"``),
    whose config ``build`` makes. Which steps refresh is decided at run time, so the plan counts every
    step as a possible full step (the cost's upper bound) and reports no uniform interval."""
    return CacheKind(build=build, apply=_apply, remove=_remove,
                     forward_counts=lambda steps, full: cache_kind(wrapped).forward_counts(steps, full),
                     interval=lambda config: None)
