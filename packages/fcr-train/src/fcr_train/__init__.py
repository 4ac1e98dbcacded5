"""FCR fine-tuning (feature consistency regularization) for diffusers UNets on accelerate.

Public API (see each object's docstring):

* loss: :class:`FCRConfig`, :func:`fcr_loss`, :func:`feature_distance`
* output consistency (the second objective): :class:`OutputConsistencyConfig`,
  :func:`output_consistency_loss`
* the rollout objective (the third): :class:`RolloutConfig`, :func:`rollout_loss`
* training: :class:`TrainConfig`, :func:`train`, :class:`RunResult`, :func:`latest_checkpoint`,
  :class:`CheckpointError` (a resume checkpoint that is cut off or of another model)
* runs: :class:`FinetuneConfig`, :class:`DataConfig`, :func:`finetune`, :class:`PretrainConfig`, :func:`pretrain`
* embedded default: :func:`load_embedded_base`, :class:`EmbeddedBase`, :func:`sample_images`,
  :func:`make_scheduler`, :func:`build_unet`, :data:`EMBEDDED_UNET_CONFIG`, :data:`TINY_UNET_CONFIG`
* Stable Diffusion: :func:`load_sd_components`, :class:`ModelNotAvailableError`
"""

# Names resolve on first use (PEP 562), so that light modules such as ``fcr_common.cli_errors``
# import without torch: the apps report bad input in a fraction of a second.
_EXPORTS = {
    "api": ("DataConfig", "FinetuneConfig", "PretrainConfig", "finetune", "pretrain", "save_sample_grid"),
    "embedded": ("EMBEDDED_UNET_CONFIG", "TINY_UNET_CONFIG", "EmbeddedBase", "build_unet", "class_prompts",
                 "load_embedded_base", "make_scheduler", "sample_images"),
    "loss": ("FCRConfig", "FCRLossOutput", "fcr_loss", "feature_distance"),
    "models": ("ModelNotAvailableError", "load_sd_components"),
    "output_consistency": ("OutputConsistencyConfig", "OutputConsistencyLossOutput", "output_consistency_loss"),
    "rollout": ("RolloutConfig", "RolloutLossOutput", "rollout_loss"),
    "trainer": ("RunResult", "TrainConfig", "latest_checkpoint", "train"),
    "checkpoints": ("CheckpointError",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str):
    import importlib

    if name in _MODULE_OF:
        value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
        globals()[name] = value
        return value
    try:  # ``fcr_train.trainer`` after a bare ``import fcr_train``, as before
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted([*globals(), *_MODULE_OF])


__version__ = "0.1.0"

__all__ = [
    "DataConfig",
    "FinetuneConfig",
    "PretrainConfig",
    "finetune",
    "pretrain",
    "save_sample_grid",
    "EMBEDDED_UNET_CONFIG",
    "TINY_UNET_CONFIG",
    "EmbeddedBase",
    "build_unet",
    "class_prompts",
    "load_embedded_base",
    "make_scheduler",
    "sample_images",
    "FCRConfig",
    "FCRLossOutput",
    "fcr_loss",
    "feature_distance",
    "OutputConsistencyConfig",
    "OutputConsistencyLossOutput",
    "output_consistency_loss",
    "RolloutConfig",
    "RolloutLossOutput",
    "rollout_loss",
    "ModelNotAvailableError",
    "load_sd_components",
    "RunResult",
    "TrainConfig",
    "latest_checkpoint",
    "train",
    "CheckpointError",
]
