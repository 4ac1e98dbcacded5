"""Loading real checkpoints by hub id or local folder, with errors that say what to do offline."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

# The short model names (sd15, sd21, openjourney), defined torch-free; re-exported here.
from .vocabulary import MODEL_IDS

logger = logging.getLogger(__name__)

__all__ = [
    "MODEL_IDS",
    "ModelNotAvailableError",
    "default_device",
    "resolve_model_id",
    "load_pipeline",
    "load_unet",
]



class ModelNotAvailableError(OSError):
    """A model could be found neither locally nor (when offline) on the hub."""


def default_device() -> torch.device:
    """CUDA when a GPU is present, else CPU (never assumes a GPU)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_model_id(model: str | os.PathLike) -> str:
    """Map a short name (``sd15``, ``sd21``, ``openjourney``) to its hub id; paths pass through."""
    return MODEL_IDS.get(str(model), str(model))


def _not_available(model: str, what: str, err: Exception) -> ModelNotAvailableError:
    offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return ModelNotAvailableError(
        f"cannot load {what} {model!r}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}\n"
        f"{'The hub is disabled (HF_HUB_OFFLINE is set). ' if offline else ''}"
        "If this machine cannot reach the Hugging Face hub, download the model on one that can "
        f"(`hf download {model} --local-dir /path/to/{model.split('/')[-1]}`), copy the folder here "
        "and pass that folder instead of the hub id (or point HF_HOME at a cache that holds it)."
    )


def load_pipeline(
    model: str | os.PathLike,
    *,
    torch_dtype: torch.dtype | None = None,
    device=None,
    local_files_only: bool | None = None,
    **kwargs,
):
    """A diffusers pipeline from a hub id, a short name or a local folder.

    Example:
        >>> pipe = load_pipeline("sd15", torch_dtype=torch.float16)
        >>> pipe = load_pipeline("/models/stable-diffusion-v1-5")
    """
    from diffusers import DiffusionPipeline

    model = resolve_model_id(model)
    if Path(model).expanduser().exists():
        model = str(Path(model).expanduser())
        local_files_only = True if local_files_only is None else local_files_only
    try:
        pipe = DiffusionPipeline.from_pretrained(
            model, torch_dtype=torch_dtype, local_files_only=bool(local_files_only), **kwargs
        )
    except (OSError, ValueError) as err:
        raise _not_available(model, "pipeline", err) from err
    return pipe.to(device or default_device())


def load_unet(
    model: str | os.PathLike,
    *,
    subfolder: str | None = "unet",
    torch_dtype: torch.dtype | None = None,
    local_files_only: bool | None = None,
    **kwargs,
):
    """The ``UNet2DConditionModel`` of a pipeline (``subfolder="unet"``) or a bare UNet folder."""
    from diffusers import UNet2DConditionModel

    model = resolve_model_id(model)
    path = Path(model).expanduser()
    if path.exists():
        model = str(path)
        local_files_only = True if local_files_only is None else local_files_only
        if subfolder and not (path / subfolder).exists():
            subfolder = None
    try:
        return UNet2DConditionModel.from_pretrained(
            model,
            subfolder=subfolder,
            torch_dtype=torch_dtype,
            local_files_only=bool(local_files_only),
            **kwargs,
        )
    except (OSError, ValueError) as err:
        raise _not_available(model, "UNet", err) from err
