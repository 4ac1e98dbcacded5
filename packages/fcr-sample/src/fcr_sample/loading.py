"""Loading real checkpoints by hub id or local folder, with errors that say what to do offline.

A hub id that is not in the local cache is fetched only when the hub can be reached: one quick
connection to its host (:func:`hub_unreachable`) decides, so a machine without network gets one
clear error at once instead of the hub client's five retries and a misleading "no config.json".
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import torch

# The short model names (sd15, sd21, openjourney), defined torch-free; re-exported here.
from .vocabulary import MODEL_IDS

logger = logging.getLogger(__name__)

__all__ = [
    "MODEL_IDS",
    "ModelNotAvailableError",
    "default_device",
    "resolve_model_id",
    "hub_unreachable",
    "quiet_hub",
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


@lru_cache(maxsize=4)
def _probe(host: str, port: int, timeout: float) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return f"{host}:{port} cannot be reached ({e.strerror or e})"


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached from here, or ``None`` when it can (or when a
    proxy is set, which only the hub client can try). One TCP connection, remembered per process.

    Example:
        >>> hub_unreachable()
        'huggingface.co:443 cannot be reached (Name or service not known)'
    """
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    return _probe(url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80), timeout)


@contextmanager
def quiet_hub():
    """Within: the hub client's retry lines and diffusers' deprecation warnings about its own
    download arguments are not shown (the error that follows says what happened)."""
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            yield
    finally:
        hub_log.setLevel(level)


def _not_available(model: str, what: str, err: Exception, unreachable: str | None = None) -> ModelNotAvailableError:
    offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    first = (f"it is not in the local cache and the hub cannot be reached: {unreachable}" if unreachable else
             f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    return ModelNotAvailableError(
        f"cannot load {what} {model!r}: {first}\n"
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
    unreachable = None
    if Path(model).expanduser().exists():
        model = str(Path(model).expanduser())
        local_files_only = True if local_files_only is None else local_files_only
    elif not local_files_only and (unreachable := hub_unreachable()):
        local_files_only = True  # the cache only: the hub client would retry for a minute
    try:
        with quiet_hub():
            pipe = DiffusionPipeline.from_pretrained(
                model, torch_dtype=torch_dtype, local_files_only=bool(local_files_only), **kwargs
            )
    except (OSError, ValueError) as err:
        raise _not_available(model, "pipeline", err, unreachable) from err
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
    unreachable = None
    if path.exists():
        model = str(path)
        local_files_only = True if local_files_only is None else local_files_only
        if subfolder and not (path / subfolder).exists():
            subfolder = None
    elif not local_files_only and (unreachable := hub_unreachable()):
        local_files_only = True  # the cache only: the hub client would retry for a minute
    try:
        with quiet_hub():
            return UNet2DConditionModel.from_pretrained(
                model,
                subfolder=subfolder,
                torch_dtype=torch_dtype,
                local_files_only=bool(local_files_only),
                **kwargs,
            )
    except (OSError, ValueError) as err:
        raise _not_available(model, "UNet", err, unreachable) from err
