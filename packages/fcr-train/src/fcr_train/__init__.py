"""FCR fine-tuning (feature consistency regularization) for diffusers UNets on accelerate.

Public API (see each object's docstring):

* loss: :class:`FCRConfig`, :func:`fcr_loss`, :func:`feature_distance`
* training: :class:`TrainConfig`, :func:`train`, :class:`RunResult`, :func:`latest_checkpoint`
* runs: :class:`FinetuneConfig`, :class:`DataConfig`, :func:`finetune`, :class:`PretrainConfig`, :func:`pretrain`
* embedded default: :func:`load_embedded_base`, :class:`EmbeddedBase`, :func:`sample_images`,
  :func:`make_scheduler`, :func:`build_unet`, :data:`EMBEDDED_UNET_CONFIG`, :data:`TINY_UNET_CONFIG`
* Stable Diffusion: :func:`load_sd_components`, :class:`ModelNotAvailableError`
"""

from .api import DataConfig, FinetuneConfig, PretrainConfig, finetune, pretrain, save_sample_grid
from .embedded import (
    EMBEDDED_UNET_CONFIG,
    TINY_UNET_CONFIG,
    EmbeddedBase,
    build_unet,
    class_prompts,
    load_embedded_base,
    make_scheduler,
    sample_images,
)
from .loss import FCRConfig, FCRLossOutput, fcr_loss, feature_distance
from .models import ModelNotAvailableError, load_sd_components
from .trainer import RunResult, TrainConfig, latest_checkpoint, train

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
    "ModelNotAvailableError",
    "load_sd_components",
    "RunResult",
    "TrainConfig",
    "latest_checkpoint",
    "train",
]
