"""Adaptive Faster Diffusion (``sampler = "adaptive-fd"``, ``threshold = 0.2``): the encoder is refreshed
when the accumulated relative change of conv_in's output reaches the threshold
(:func:`fcr_sample.apply_adaptive_cache`; sequential decoding, since key steps are not known ahead). The
plan counts every step as a possible key step (the cost's upper bound); the run stores what it did."""

from __future__ import annotations

from fcr_eval.plan.caches._adaptive import adaptive_kind


def _build(v, steps: int):
    from fcr_sample import AdaptiveCacheConfig

    return AdaptiveCacheConfig(threshold=v.threshold, cache="fd")


KIND = adaptive_kind("fd", _build)
