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
    "SCHEDULER_NAMES",
    "tiny_scheduler",
    "tiny_sd_components",
    "tiny_sd_pipeline",
    "tiny_controlnet",
    "tiny_controlnet_pipeline",
    "tiny_t2i_adapter_pipeline",
    "tiny_sdxl_pipeline",
    "sample_latents",
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


_SCHEDULER_KWARGS = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
)


def _scheduler_factories() -> dict:
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        LCMScheduler,
        PNDMScheduler,
        UniPCMultistepScheduler,
    )

    kw = _SCHEDULER_KWARGS
    return {
        "ddim": lambda: DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1, **kw),
        "dpm++": lambda: DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", **kw),
        "euler": lambda: EulerDiscreteScheduler(**kw),
        "euler-a": lambda: EulerAncestralDiscreteScheduler(**kw),
        "pndm": lambda: PNDMScheduler(skip_prk_steps=True, steps_offset=1, **kw),
        "unipc": lambda: UniPCMultistepScheduler(**kw),
        "lcm": lambda: LCMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1, **kw),
    }


#: Scheduler names :func:`tiny_scheduler` (and the tiny pipelines) accept.
SCHEDULER_NAMES = ("ddim", "dpm++", "euler", "euler-a", "pndm", "unipc", "lcm")


def tiny_scheduler(name: str = "ddim"):
    """A fresh scheduler with Stable Diffusion's noise schedule, by name (:data:`SCHEDULER_NAMES`)."""
    factories = _scheduler_factories()
    if name not in factories:
        raise ValueError(f"unknown scheduler {name!r}; allowed are {sorted(factories)}")
    return factories[name]()


def _tiny_text_encoder(tokenizer, seed: int, max_length: int, *, with_projection: bool = False):
    try:
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the tiny pipelines need transformers: `pip install transformers`") from err
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=max_length,
        projection_dim=8,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else tokenizer.eos_token_id,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def _tiny_tokenizer(max_length: int):
    from transformers import CLIPTokenizer

    folder = Path(tempfile.mkdtemp(prefix="fcr-tiny-clip-"))
    write_tiny_clip_vocab(folder)
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length
    )


def _tiny_vae(seed: int, sample_size: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=sample_size * 2,
    ).eval()


def tiny_sd_components(
    seed: int = 0, scheduler: str = "ddim", *, sample_size: int = 16, max_length: int = 16
) -> dict:
    """The components of a tiny Stable Diffusion pipeline, for any SD-family pipeline class.

    UNet from :func:`tiny_unet_config`, a 2-level ``AutoencoderKL`` (images are 2× the latent), a
    2-layer CLIP text encoder and a CLIP tokenizer over a character vocabulary written to a
    temporary folder. ``StableDiffusionImg2ImgPipeline(**tiny_sd_components())`` etc. work.
    """
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(sample_size=sample_size)).eval()
    tokenizer = _tiny_tokenizer(max_length)
    return dict(
        unet=unet,
        vae=_tiny_vae(seed + 1, sample_size),
        text_encoder=_tiny_text_encoder(tokenizer, seed + 2, max_length),
        tokenizer=tokenizer,
        scheduler=tiny_scheduler(scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd_pipeline(
    seed: int = 0, scheduler: str = "ddim", *, sample_size: int = 16, max_length: int = 16,
    pipeline_class=None,
):
    """A real ``StableDiffusionPipeline`` (or ``pipeline_class``, e.g. the img2img or inpainting
    pipeline) assembled from :func:`tiny_sd_components`."""
    from diffusers import StableDiffusionPipeline

    cls = pipeline_class or StableDiffusionPipeline
    comps = tiny_sd_components(seed, scheduler, sample_size=sample_size, max_length=max_length)
    if "inpaint" in cls.__name__.lower():  # the inpainting UNet takes latents, mask and masked image
        from diffusers import UNet2DConditionModel

        torch.manual_seed(seed)
        comps["unet"] = UNet2DConditionModel(
            **tiny_unet_config(sample_size=sample_size, in_channels=9)
        ).eval()
    return _quiet(cls(**comps))


def tiny_controlnet(unet, seed: int = 0):
    """A ``ControlNetModel`` shaped like ``unet`` with random (not zero) output convolutions, so
    its residuals change the UNet's output; conditioning images are 2× the latent size."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=(4, 8), load_weights_from_unet=False
    ).eval()
    with torch.no_grad():
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            conv.weight.normal_(0, 0.3)
            conv.bias.normal_(0, 0.1)
    return net


def tiny_controlnet_pipeline(seed: int = 0, scheduler: str = "ddim", *, num_controlnets: int = 1):
    """A real ``StableDiffusionControlNetPipeline`` on :func:`tiny_sd_components`; with
    ``num_controlnets > 1`` its ControlNet is a ``MultiControlNetModel``."""
    from diffusers import StableDiffusionControlNetPipeline
    from diffusers.models.controlnets import MultiControlNetModel

    comps = tiny_sd_components(seed, scheduler)
    nets = [tiny_controlnet(comps["unet"], seed + 10 + k) for k in range(num_controlnets)]
    controlnet = nets[0] if num_controlnets == 1 else MultiControlNetModel(nets)
    return _quiet(StableDiffusionControlNetPipeline(controlnet=controlnet, **comps))


def tiny_t2i_adapter_pipeline(seed: int = 0, scheduler: str = "ddim"):
    """A real ``StableDiffusionAdapterPipeline`` on :func:`tiny_sd_components` with a random
    ``T2IAdapter`` whose features match the tiny UNet's down blocks (images 2× the latent)."""
    from diffusers import StableDiffusionAdapterPipeline, T2IAdapter

    comps = tiny_sd_components(seed, scheduler)
    torch.manual_seed(seed + 20)
    adapter = T2IAdapter(
        in_channels=3,
        channels=list(tiny_unet_config()["block_out_channels"]),
        num_res_blocks=1,
        downscale_factor=2,
        adapter_type="full_adapter",
    ).eval()
    return _quiet(StableDiffusionAdapterPipeline(adapter=adapter, **comps))


def tiny_sdxl_pipeline(seed: int = 0, scheduler: str = "ddim", *, pipeline_class=None,
                       sample_size: int = 16, max_length: int = 16):
    """A real ``StableDiffusionXLPipeline`` (or ``pipeline_class``, e.g. the SDXL img2img
    pipeline): two text encoders, and a UNet with SDXL's added text/time conditioning."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **tiny_unet_config(
            sample_size=sample_size,
            cross_attention_dim=16,  # both text encoders' states, concatenated
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 8,  # six time ids + pooled text
        )
    ).eval()
    tokenizer = _tiny_tokenizer(max_length)
    cls = pipeline_class or StableDiffusionXLPipeline
    return _quiet(cls(
        unet=unet,
        vae=_tiny_vae(seed + 1, sample_size),
        text_encoder=_tiny_text_encoder(tokenizer, seed + 2, max_length),
        text_encoder_2=_tiny_text_encoder(tokenizer, seed + 3, max_length, with_projection=True),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=tiny_scheduler(scheduler),
    ))


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
