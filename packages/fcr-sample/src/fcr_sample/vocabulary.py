"""Names fcr-sample's configs and callers may use, importable without torch.

The encoder block groups (:data:`BLOCK_GROUPS`) are defined here so that an experiment schema
(fcr-eval's spec) can check them without importing torch; :mod:`fcr_sample.features` gives
them their meaning. Schedule names live in :mod:`fcr_sample.schedules`, which is torch-free too.
"""

__all__ = ["BLOCK_GROUPS", "MODEL_IDS"]

#: Encoder block groups whose features FCR regularises: all of them, or the early / mid / late
#: part of the encoder (see :func:`fcr_sample.features.select_feature_names`).
BLOCK_GROUPS = ("all", "early", "mid", "late")

#: Short names for the models the FCR experiments use, and their hub ids.
MODEL_IDS = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd21": "stabilityai/stable-diffusion-2-1",
    "openjourney": "prompthero/openjourney",
}
