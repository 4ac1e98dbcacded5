"""fcr-sample: encoder-caching sampling (Faster Diffusion) for diffusers UNets.

Two lines speed up an existing pipeline::

    from fcr_sample import EncoderCacheConfig, apply_encoder_cache
    apply_encoder_cache(pipe, EncoderCacheConfig(stride=10))

Public API: the encoder cache (:class:`EncoderCacheConfig`, :func:`apply_encoder_cache`,
:func:`remove_encoder_cache`), the DeepCache comparator (:class:`DeepCacheConfig`,
:func:`apply_deep_cache`, :func:`remove_deep_cache`), the adaptive cache
(:class:`AdaptiveCacheConfig`, :func:`apply_adaptive_cache`, :func:`remove_adaptive_cache`),
calibrated schedules (:func:`calibrate_schedule`, :class:`CalibratedSchedule`), forward counters
(:func:`get_cache_stats`, :func:`reset_cache_stats`), key-step schedules (:func:`key_steps`),
regional ``torch.compile`` of a cached UNet (:func:`compile_unet_regions`),
bare-UNet loops (:func:`denoise` with its step ``callback``, :func:`start_sampling_run`,
:func:`prior_noise_callback`, :func:`inject_prior_noise`), the definition of
encoder features (:func:`encoder_features`), and the cache-error diagnostic
(:func:`attribute_cache_error`: where along the trajectory, and through which cached feature, a
cache's error enters).
"""

# Names resolve on first use (PEP 562), as in fcr_train: light modules (``fcr_sample.schedules``,
# ``fcr_sample.vocabulary``, ``fcr_sample.cache_configs``) import without torch, so an experiment
# schema that checks their names (and a plan that builds the cache configs)
# loads in a fraction of a second.
_EXPORTS = {
    "adaptive": ["apply_adaptive_cache", "remove_adaptive_cache"],
    "calibration": ["CalibratedSchedule", "ScheduleMismatchError", "calibrate_schedule",
                    "calibrate_schedule_from_error", "model_identity",
                    "scheduler_identity"],
    "attribution": ["CacheAttribution", "FeatureAttribution", "StepAttribution", "attribute_cache_error"],
    "compilation": ["compile_unet_regions", "uncompile_unet_regions"],
    "cache_configs": ["EncoderCacheConfig", "DeepCacheConfig", "AdaptiveCacheConfig"],  # torch-free
    "deep_cache": ["apply_deep_cache", "remove_deep_cache"],
    "encoder_cache": ["apply_encoder_cache", "remove_encoder_cache"],
    "features": ["encoder_feature_names", "encoder_features", "select_feature_names"],
    "hooks": ["CacheStats", "get_cache_stats", "reset_cache_stats", "start_sampling_run"],
    "loading": ["MODEL_IDS", "ModelNotAvailableError", "default_device", "load_pipeline", "load_unet"],
    "prior_noise": ["inject_prior_noise", "prior_noise_callback"],
    "sampling": ["denoise"],
    "schedules": ["FASTER_DIFFUSION_KEY_STEPS", "decoder_groups", "key_steps"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str):
    import importlib

    if name in _MODULE_OF:
        value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
        globals()[name] = value
        return value
    try:  # ``fcr_sample.hooks`` after a bare ``import fcr_sample``
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted([*globals(), *_MODULE_OF])


__version__ = "0.1.0"

__all__ = [
    "denoise",
    "EncoderCacheConfig",
    "apply_encoder_cache",
    "remove_encoder_cache",
    "inject_prior_noise",
    "prior_noise_callback",
    "DeepCacheConfig",
    "apply_deep_cache",
    "remove_deep_cache",
    "AdaptiveCacheConfig",
    "apply_adaptive_cache",
    "remove_adaptive_cache",
    "CalibratedSchedule",
    "ScheduleMismatchError",
    "calibrate_schedule",
    "calibrate_schedule_from_error",
    "model_identity",
    "scheduler_identity",
    "CacheStats",
    "get_cache_stats",
    "reset_cache_stats",
    "start_sampling_run",
    "key_steps",
    "decoder_groups",
    "FASTER_DIFFUSION_KEY_STEPS",
    "compile_unet_regions",
    "uncompile_unet_regions",
    "encoder_features",
    "attribute_cache_error",
    "CacheAttribution",
    "StepAttribution",
    "FeatureAttribution",
    "encoder_feature_names",
    "select_feature_names",
    "MODEL_IDS",
    "ModelNotAvailableError",
    "default_device",
    "load_pipeline",
    "load_unet",
]
