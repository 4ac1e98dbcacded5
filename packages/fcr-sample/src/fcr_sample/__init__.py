"""fcr-sample: encoder-caching sampling (Faster Diffusion) for diffusers UNets.

Two lines speed up an existing pipeline::

    from fcr_sample import EncoderCacheConfig, apply_encoder_cache
    apply_encoder_cache(pipe, EncoderCacheConfig(stride=10))

Public API: the encoder cache (:class:`EncoderCacheConfig`, :func:`apply_encoder_cache`,
:func:`remove_encoder_cache`), the DeepCache comparator (:class:`DeepCacheConfig`,
:func:`apply_deep_cache`, :func:`remove_deep_cache`), forward counters
(:func:`get_cache_stats`, :func:`reset_cache_stats`), key-step schedules (:func:`key_steps`),
regional ``torch.compile`` of a cached UNet (:func:`compile_unet_regions`),
bare-UNet loops (:func:`denoise` with its step ``callback``, :func:`start_sampling_run`,
:func:`prior_noise_callback`, :func:`inject_prior_noise`), the definition of
encoder features (:func:`encoder_features`), and the cache-error diagnostic
(:func:`attribute_cache_error`: where along the trajectory, and through which cached feature, a
cache's error enters).
"""

from .attribution import (
    CacheAttribution,
    FeatureAttribution,
    StepAttribution,
    attribute_cache_error,
)
from .compilation import compile_unet_regions, uncompile_unet_regions
from .deep_cache import DeepCacheConfig, apply_deep_cache, remove_deep_cache
from .encoder_cache import (
    EncoderCacheConfig,
    apply_encoder_cache,
    remove_encoder_cache,
)
from .features import encoder_feature_names, encoder_features, select_feature_names
from .hooks import CacheStats, get_cache_stats, reset_cache_stats, start_sampling_run
from .loading import MODEL_IDS, ModelNotAvailableError, default_device, load_pipeline, load_unet
from .prior_noise import inject_prior_noise, prior_noise_callback
from .sampling import denoise
from .schedules import FASTER_DIFFUSION_KEY_STEPS, decoder_groups, key_steps

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
