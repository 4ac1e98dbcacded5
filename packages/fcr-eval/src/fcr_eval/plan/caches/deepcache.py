"""DeepCache (``sampler = "deepcache"``): a deep up-block feature is cached at key steps and only
the shallow path reruns in between (:func:`fcr_sample.apply_deep_cache`, equal image for image to
the ``deepcache`` package)."""

from __future__ import annotations

from fcr_eval.plan.caches import CacheKind


def _build(v, steps: int):
    from fcr_sample import DeepCacheConfig

    return DeepCacheConfig(cache_interval=v.stride, cache_branch_id=v.cache_branch_id)


def _apply(unet, config) -> None:
    from fcr_sample import apply_deep_cache

    apply_deep_cache(unet, config)


def _remove(unet) -> None:
    from fcr_sample import remove_deep_cache

    remove_deep_cache(unet)


def _forward_counts(steps: int, full: int) -> dict[str, int]:
    """Key steps run the whole UNet; the others its shallow path (a partial forward)."""
    return {"unet_calls": steps, "full_forwards": full, "encoder_forwards": full, "decoder_forwards": full,
            "partial_forwards": steps - full}


def _interval(config) -> int | None:
    return int(config.cache_interval) if getattr(config, "skip_mode", "uniform") == "uniform" else None


KIND = CacheKind(build=_build, apply=_apply, remove=_remove, forward_counts=_forward_counts, interval=_interval)
