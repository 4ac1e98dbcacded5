"""Names fcr-train's configs accept, importable without torch (fcr-eval's experiment schema
checks them at load time): feature distances, units of Δ, the embedded default's model names and
the output-consistency objective's options. Their meaning lives in :mod:`fcr_train.loss`,
:mod:`fcr_train.embedded` and :mod:`fcr_train.output_consistency`.
"""

__all__ = ["DISTANCES", "DELTA_UNITS", "EMBEDDED_MODELS", "OC_CACHES", "OC_TRAINABLE"]

#: Distances between two encoder feature maps (or two UNet outputs) a consistency loss can use.
DISTANCES = ("mse", "relative_mse", "cosine")
#: What one unit of Δ is: a DDPM training timestep, or one step of the sampler the fine-tune serves.
DELTA_UNITS = ("timesteps", "sampler_steps")
#: Model names of the embedded default: the shipped base weights, the same UNet untrained, and a
#: tiny UNet for tests.
EMBEDDED_MODELS = ("embedded", "embedded-random", "embedded-tiny")
#: The caches whose reused-step situation the output-consistency term can train.
OC_CACHES = ("fd", "deepcache")
#: Which parameters the output-consistency term's gradient may reach: what the cache recomputes at
#: a reused step, or everything (also through the stale features).
OC_TRAINABLE = ("recomputed", "all")
