"""Adaptive DeepCache (``sampler = "adaptive-deepcache"``, ``threshold = 0.2``): DeepCache's deep path is
refreshed when the accumulated relative change of conv_in's output reaches the threshold
(:func:`fcr_sample.apply_adaptive_cache`). Which steps refresh is decided at run time, so the plan
counts every step as a possible full step (the cost's upper bound); the run stores what it did."""

from __future__ import annotations

from fcr_eval.plan.caches._adaptive import adaptive_kind


def _build(v, steps: int):
    from fcr_sample import AdaptiveCacheConfig

    return AdaptiveCacheConfig(threshold=v.threshold, cache="deepcache", cache_branch_id=v.cache_branch_id)


KIND = adaptive_kind("deepcache", _build)
