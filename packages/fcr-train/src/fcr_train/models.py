"""Real Stable Diffusion models: UNet + VAE + CLIP text encoder, by hub id or local folder.

:func:`load_sd_components` keeps the real path (``from_pretrained``). It first looks in the local
Hugging Face cache only; it contacts the hub only when ``HF_HUB_OFFLINE`` is not set. When a part
cannot be loaded it raises :class:`ModelNotAvailableError` naming the missing part and how to
point the toolkit at a local copy. Only the UNet is trained; VAE and text encoder are frozen and
live in :class:`SDConditioner`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

# The short model names and the "not available" error are fcr-sample's (the loader an engineer
# deploys); fine-tuning loads more parts of the same checkpoints and reports the same error.
from fcr_sample.loading import (
    MODEL_IDS,
    ModelNotAvailableError,
    hub_unreachable,
    quiet_hub,
    resolve_model_id,
)

# torch-free, so fcr-eval's plan can check a model folder without torch
from fcr_train.vocabulary import SD_PARTS

__all__ = ["SD_PARTS", "ModelNotAvailableError", "SDComponents", "load_sd_components", "SDConditioner"]

logger = logging.getLogger(__name__)



@dataclass
class SDComponents:
    """The parts of a Stable Diffusion checkpoint that FCR fine-tuning needs."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    source: str
    resolution: int

    def train_scheduler(self):
        """A DDPM scheduler with the checkpoint's noise schedule and prediction type (ε or v)."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.scheduler.config)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _missing_message(model: str, source: str, part: str, local: bool, exc: Exception | None,
                     unreachable: str | None = None) -> str:
    where = f"local folder {source}" if local else f"hub id {source!r}"
    if unreachable:
        where += f", which is not in the local cache, and the hub cannot be reached from here ({unreachable})"
        exc = None
    how = (
        f"Download it where the hub is reachable (`huggingface-cli download {source}`) and copy the folder here, "
        f"then pass --model /path/to/folder (a diffusers layout with {', '.join(SD_PARTS)}/ subfolders) "
        "or set HF_HOME to the copied cache."
        if not local else f"Make sure {source}/{part}/ exists (diffusers layout: {', '.join(SD_PARTS)}/)."
    )
    detail = f" ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})" if exc else ""
    return f"cannot load the {part!r} of {model!r} from the {where}{detail}. {how}"


def load_sd_components(model: str, *, revision: str | None = None, variant: str | None = None,
                       dtype: torch.dtype = torch.float32) -> SDComponents:
    """Load UNet, VAE, CLIP text encoder + tokenizer and scheduler of an SD checkpoint.

    Args:
        model: ``sd15`` / ``sd21`` / ``openjourney``, a hub id, or a local folder in diffusers layout.
        revision / variant: passed to ``from_pretrained``.
        dtype: dtype of the frozen VAE and text encoder (the UNet stays fp32 for training).

    Raises:
        ModelNotAvailableError: a part is missing; the message says which and what to do.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    source = resolve_model_id(model)
    local = Path(source).is_dir()
    if not local and (source.startswith((".", "/", "~")) or os.sep in source.strip("/").replace("/", "", 1)):
        raise ModelNotAvailableError(f"model folder {source} does not exist; pass an existing folder or a hub id "
                                     f"({', '.join(MODEL_IDS)} are known aliases)")
    if local:
        missing = [p for p in SD_PARTS if not (Path(source) / p).is_dir()]
        if missing:
            raise ModelNotAvailableError(_missing_message(model, source, missing[0], True, None)
                                         + f" Missing subfolders: {missing}.")
    loaders = {
        "unet": (UNet2DConditionModel, {"variant": variant}),
        "vae": (AutoencoderKL, {"variant": variant, "torch_dtype": dtype}),
        "text_encoder": (CLIPTextModel, {"variant": variant, "torch_dtype": dtype}),
        "tokenizer": (CLIPTokenizer, {}),
        "scheduler": (DDPMScheduler, {}),
    }
    parts = {}
    # The hub only when it can be reached: its client would otherwise retry every part for a minute.
    unreachable = None if local or _offline() else hub_unreachable()
    for part, (cls, kw) in loaders.items():
        kw = {k: v for k, v in kw.items() if v is not None}
        attempts = [True] if local or _offline() or unreachable else [True, False]
        err: Exception | None = None
        for local_only in attempts:
            try:
                with quiet_hub():
                    if part == "scheduler":
                        parts[part] = cls.from_pretrained(source, subfolder=part, revision=revision,
                                                          local_files_only=local_only)
                    else:
                        parts[part] = cls.from_pretrained(source, subfolder=part, revision=revision,
                                                          local_files_only=local_only, **kw)
                err = None
                break
            except (OSError, ValueError, EnvironmentError) as exc:  # noqa: UP024 - hub errors subclass both
                err = exc
        if err is not None:
            raise ModelNotAvailableError(_missing_message(model, source, part, local, err, unreachable)) from err
    vae_scale = 2 ** (len(parts["vae"].config.block_out_channels) - 1)
    resolution = int(parts["unet"].config.sample_size) * vae_scale
    parts["vae"].requires_grad_(False).eval()
    parts["text_encoder"].requires_grad_(False).eval()
    logger.info("loaded %s (%s): UNet %.1fM params, prediction %s, %dpx", model, source,
                sum(p.numel() for p in parts["unet"].parameters()) / 1e6, parts["scheduler"].config.prediction_type, resolution)
    return SDComponents(source=source, resolution=resolution, **parts)


class SDConditioner:
    """Batch -> ``(latents, CLIP token states)`` with the frozen VAE and text encoder.

    ``null_states`` are the empty prompt's states (condition dropout).
    """

    def __init__(self, comps: SDComponents):
        self.comps = comps
        self._device: torch.device | None = None
        self._null: torch.Tensor | None = None

    def _to(self, device: torch.device) -> None:
        if self._device != device:
            self.comps.vae.to(device)
            self.comps.text_encoder.to(device)
            self._device = device

    @torch.no_grad()
    def encode_text(self, captions: list[str], device: torch.device) -> torch.Tensor:
        self._to(device)
        tok = self.comps.tokenizer(list(captions), padding="max_length", truncation=True,
                                   max_length=self.comps.tokenizer.model_max_length, return_tensors="pt")
        return self.comps.text_encoder(tok.input_ids.to(device))[0].float()

    @property
    def null_states(self) -> torch.Tensor:
        if self._null is None:
            self._null = self.encode_text([""], self._device or torch.device("cpu"))
        return self._null

    @torch.no_grad()
    def __call__(self, batch: dict, device: torch.device, generator: torch.Generator | None = None):
        self._to(device)
        vae = self.comps.vae
        pixels = batch["pixels"].to(device, next(vae.parameters()).dtype)
        dist = vae.encode(pixels).latent_dist
        # draw on CPU from the trainer's generator so resumed runs get the same latents
        eps = torch.randn(dist.mean.shape, generator=generator).to(device, dist.mean.dtype)
        latents = (dist.mean + dist.std * eps) * vae.config.scaling_factor
        return latents.float(), self.encode_text(batch["caption"], device)

    def describe(self) -> dict:
        return {"kind": "stable-diffusion", "source": self.comps.source, "resolution": self.comps.resolution,
                "vae_scaling_factor": self.comps.vae.config.scaling_factor}
