"""Faster Diffusion (``sampler = "fd"``): the encoder runs at key steps only and its features are
reused by the decoder in between (:func:`fcr_sample.apply_encoder_cache`), with parallel decoding
and prior noise injection as the variation sets them."""

from __future__ import annotations

from fcr_eval.plan.caches import CacheKind


def _build(v, steps: int):
    from fcr_sample import EncoderCacheConfig

    return EncoderCacheConfig(stride=v.stride, schedule=v.schedule, parallel_decoding=v.parallel_decoding,
                              prior_noise_alpha=v.prior_noise_alpha)


def _apply(unet, config) -> None:
    from fcr_sample import apply_encoder_cache

    apply_encoder_cache(unet, config)


def _remove(unet) -> None:
    from fcr_sample import remove_encoder_cache

    remove_encoder_cache(unet)


def _forward_counts(steps: int, full: int) -> dict[str, int]:
    """The encoder runs at the key steps, the decoder at every step."""
    return {"unet_calls": steps, "full_forwards": full, "encoder_forwards": full, "decoder_forwards": steps,
            "partial_forwards": 0}


def _interval(config) -> int | None:
    return int(config.stride) if config.key_steps is None and config.schedule == "uniform" else None


KIND = CacheKind(build=_build, apply=_apply, remove=_remove, forward_counts=_forward_counts, interval=_interval)
