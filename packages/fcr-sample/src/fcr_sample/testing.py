"""Tiny seeded models built from config, for tests, demos and CPU benchmarks.

Nothing here downloads anything. The Stable Diffusion pipeline builder needs ``transformers``
(for a tiny CLIP text encoder), which is not a dependency of fcr-sample itself.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch

__all__ = [
    "tiny_unet_config",
    "tiny_unet",
    "small_unet_config",
    "sd15_unet_config",
    "tiny_sd_pipeline",
    "write_tiny_clip_vocab",
]


def tiny_unet_config(**overrides) -> dict:
    """A 3-level cross-attention UNet (latent 4×16×16), a few hundred k parameters."""
    cfg = dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    cfg.update(overrides)
    return cfg


# Stable Diffusion's block layout: three cross-attention levels and a plain deepest level.
_SD_LAYOUT = dict(
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    down_block_types=(
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8,
    norm_num_groups=32,
)


def small_unet_config(**overrides) -> dict:
    """An SD-shaped UNet (4 levels, 2 layers per block) small enough for CPU benchmarks."""
    return {
        **_SD_LAYOUT,
        "sample_size": 32,
        "block_out_channels": (32, 64, 64, 64),
        "cross_attention_dim": 64,
        **overrides,
    }


def sd15_unet_config(**overrides) -> dict:
    """The Stable Diffusion v1.5 UNet architecture (859.5M parameters; random weights)."""
    return {
        **_SD_LAYOUT,
        "sample_size": 64,
        "block_out_channels": (320, 640, 1280, 1280),
        "cross_attention_dim": 768,
        **overrides,
    }


def tiny_unet(seed: int = 0, **overrides):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**tiny_unet_config(**overrides)).eval()


def write_tiny_clip_vocab(folder: Path, extra_chars: str = "") -> None:
    """Write ``vocab.json`` and ``merges.txt``: a character-level BPE vocabulary that
    ``CLIPTokenizer`` accepts (no merges needed).

    Covers lower-case letters, digits and ``.,'!?-`` plus ``extra_chars``; any other character
    becomes the unknown token, which CLIP shares with ``<|endoftext|>``.
    """
    chars = list(dict.fromkeys(string.ascii_lowercase + string.digits + ".,'!?-" + extra_chars))
    vocab = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def tiny_sd_pipeline(
    seed: int = 0, scheduler: str = "ddim", *, sample_size: int = 16, max_length: int = 16
):
    """A real ``StableDiffusionPipeline`` assembled from tiny random components.

    UNet from :func:`tiny_unet_config`, a 2-level ``AutoencoderKL``, a 2-layer CLIP text encoder
    and a CLIP tokenizer over a character vocabulary written to a temporary folder.
    """
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    try:
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "tiny_sd_pipeline needs transformers: `pip install transformers`"
        ) from err

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(sample_size=sample_size)).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=sample_size * 2,
    ).eval()
    folder = Path(tempfile.mkdtemp(prefix="fcr-tiny-clip-"))
    write_tiny_clip_vocab(folder)
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id,
        )
    ).eval()
    sched_kwargs = dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )
    schedulers = {
        "ddim": lambda: DDIMScheduler(
            clip_sample=False, set_alpha_to_one=False, steps_offset=1, **sched_kwargs
        ),
        "dpm++": lambda: DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", **sched_kwargs),
        "euler": lambda: EulerDiscreteScheduler(**sched_kwargs),
        "pndm": lambda: PNDMScheduler(skip_prk_steps=True, steps_offset=1, **sched_kwargs),
    }
    if scheduler not in schedulers:
        raise ValueError(f"unknown scheduler {scheduler!r}; allowed are {sorted(schedulers)}")
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=schedulers[scheduler](),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_latents(
    pipe,
    *,
    steps: int = 10,
    guidance: float = 7.5,
    batch: int = 1,
    seed: int = 0,
    prompt: str = "a photo of a shirt",
    **call_kwargs,
) -> torch.Tensor:
    """Final latents of one seeded pipeline call (no VAE decode); ``call_kwargs`` go to the call."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return pipe(
            [prompt] * batch,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=g,
            output_type="latent",
            **call_kwargs,
        ).images
