"""Adaptive DeepCache (``sampler = "adaptive-deepcache"``, ``threshold = 0.2``): DeepCache's deep path is
refreshed when the accumulated relative change of conv_in's output reaches the threshold
(:func:`fcr_sample.apply_adaptive_cache`). Which steps refresh is decided at run time, so the plan
counts every step as a possible full step (the cost's upper bound); the run stores what it did."""

from __future__ import annotations

from fcr_eval.plan.caches import CacheKind, cache_kind


def _build(v, steps: int):
    from fcr_sample import AdaptiveCacheConfig

    return AdaptiveCacheConfig(threshold=v.threshold, cache="deepcache", cache_branch_id=v.cache_branch_id)


def _apply(unet, config) -> None:
    from fcr_sample import apply_adaptive_cache

    apply_adaptive_cache(unet, config)


def _remove(unet) -> None:
    from fcr_sample import remove_adaptive_cache

    remove_adaptive_cache(unet)


def _forward_counts(steps: int, full: int) -> dict[str, int]:
    """As deepcache's, with every step counted as full (the plan's upper bound)."""
    return cache_kind("deepcache").forward_counts(steps, full)


KIND = CacheKind(build=_build, apply=_apply, remove=_remove, forward_counts=_forward_counts,
                 interval=lambda config: None)
