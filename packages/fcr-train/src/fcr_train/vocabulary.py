"""Names fcr-train's configs accept, importable without torch (fcr-eval's experiment schema
checks them at load time): feature distances, units of Δ, and the embedded default's model names.
Their meaning lives in :mod:`fcr_train.loss` and :mod:`fcr_train.embedded`.
"""

__all__ = ["DISTANCES", "DELTA_UNITS", "EMBEDDED_MODELS"]

#: Distances between two encoder feature maps (or two UNet outputs) a consistency loss can use.
DISTANCES = ("mse", "relative_mse", "cosine")
#: What one unit of Δ is: a DDPM training timestep, or one step of the sampler the fine-tune serves.
DELTA_UNITS = ("timesteps", "sampler_steps")
#: Model names of the embedded default: the shipped base weights, the same UNet untrained, and a
#: tiny UNet for tests.
EMBEDDED_MODELS = ("embedded", "embedded-random", "embedded-tiny")
