"""The Python API the experiment runner (fcr-eval) calls: :func:`finetune` and :func:`pretrain`.

Example (FCR fine-tune of the embedded base, λ = 0.1 on the late blocks)::

    from fcr_train import FinetuneConfig, TrainConfig, FCRConfig, finetune
    cfg = FinetuneConfig(
        model="embedded",
        train=TrainConfig(output_dir="runs/fcr-0.1", max_steps=500, batch_size=64, lr=1e-4,
                          fcr=FCRConfig(lam=0.1, delta_max=10, blocks="late")),
    )
    result = finetune(cfg, validation_fn=my_fid)   # RunResult
    unet = UNet2DConditionModel.from_pretrained(result.final_unet)

Stable Diffusion: ``model="sd15"`` (or ``"sd21"``, ``"openjourney"``, a hub id, or a local folder in
diffusers layout) and a :class:`DataConfig` for LAION / ArtBench / COCO / Flickr30k data.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .data import FashionMNISTDataset
from .embedded import (
    EMBEDDED_MODELS,
    EMBEDDED_UNET_CONFIG,
    TINY_UNET_CONFIG,
    build_unet,
    load_embedded_base,
    sample_images,
)
from .loss import FCRConfig
from .provenance import run_provenance
from .trainer import EmbeddedConditioner, RunResult, TrainConfig, train
from .vocabulary import EMOJI_MODELS

__all__ = ["DataConfig", "FinetuneConfig", "PretrainConfig", "finetune", "pretrain", "TINY_EMBEDDED_UNET_CONFIG",
           "save_sample_grid", "load_emoji_model"]

logger = logging.getLogger(__name__)

# The tiny test UNet, made compatible with MiniLM's 384-d states and 28x28 Fashion-MNIST.
TINY_EMBEDDED_UNET_CONFIG = {**TINY_UNET_CONFIG, "sample_size": 28, "cross_attention_dim": 384}


@dataclass
class DataConfig:
    """Which training data.

    Attributes:
        kind: ``fashion-mnist`` (embedded), ``emoji`` (the emoji backbone; ``split`` train / test), ``laion`` (parquet/CSV of image path + caption),
            ``webdataset`` (tar shards), ``artbench`` (class folders), ``coco`` (captions JSON),
            ``flickr30k`` (captions token/CSV file).
        path: the table / JSON / captions file, the shard folder or glob, the class-folder root;
            for ``fashion-mnist`` the IDX folder (default: the Debian package path).
        images_dir: folder the image names in ``path`` are relative to (COCO, Flickr30k, LAION).
        resolution: training resolution in pixels (default: 512 for SD, 28 for the embedded UNet).
        limit: use only the first ``limit`` samples.
        split: Fashion-MNIST split.
        image_column / caption_column: LAION table columns (auto-detected when ``None``).
    """

    kind: str = "fashion-mnist"
    path: str | None = None
    images_dir: str | None = None
    resolution: int | None = None
    limit: int | None = None
    split: str = "train"
    image_column: str | None = None
    caption_column: str | None = None


@dataclass
class FinetuneConfig:
    """A fine-tuning run.

    Attributes:
        model: ``embedded`` (the committed base weights, or ``base_weights``), ``embedded-random``,
            ``embedded-tiny`` (tests), ``emoji`` / ``emoji-random`` / ``emoji-tiny`` (the latent emoji
            backbone, :mod:`fcr_train.emoji_backbone`), or an SD model: ``sd15`` / ``sd21`` / ``openjourney``,
            a hub id, or a local diffusers folder.
        base_weights: UNet folder for ``model="embedded"`` (default: the shipped weights).
        revision / variant: passed to ``from_pretrained`` for SD models.
        data: :class:`DataConfig`.
        train: :class:`TrainConfig` (holds the :class:`FCRConfig`, or instead an
            :class:`~fcr_train.output_consistency.OutputConsistencyConfig` (or another objective of
            :mod:`fcr_train.objectives`) in ``train.objective`` with ``fcr.lam = 0``).
    """

    model: str = "embedded"
    base_weights: str | None = None
    revision: str | None = None
    variant: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["train"] = self.train.to_dict()
        return d


def _embedded_parts(model: str, base_weights: str | None):
    if model not in EMBEDDED_MODELS:
        raise ValueError(f"not an embedded model: {model!r} (use one of {EMBEDDED_MODELS})")
    base = load_embedded_base(base_weights, random_init=model != "embedded")
    if model == "embedded-tiny":
        base.unet = build_unet(TINY_EMBEDDED_UNET_CONFIG)
    return base


def finetune(config: FinetuneConfig, *, validation_fn=None, step_callback=None) -> RunResult:
    """Fine-tune a UNet with L_denoise + λ·FCR and return the run's checkpoints.

    Args:
        config: :class:`FinetuneConfig`.
        validation_fn: ``fn(unet, step) -> float`` (lower is better unless
            ``train.early_stopping_mode="max"``), called every ``train.validate_every`` steps.
        step_callback: ``fn(step, logs)`` after each optimizer step.

    Returns:
        :class:`fcr_train.trainer.RunResult` — ``final_unet`` is a folder for
        ``UNet2DConditionModel.from_pretrained``; ``checkpoints`` resume with ``train.resume=True``.
    """
    meta = {"command": "finetune", "finetune": config.to_dict()}
    if config.model in EMOJI_MODELS:
        return _finetune_emoji(config, meta, validation_fn, step_callback)
    if config.model in EMBEDDED_MODELS:
        if config.data.kind != "fashion-mnist":
            raise ValueError(f"the embedded model trains on data.kind='fashion-mnist', got {config.data.kind!r}")
        base = _embedded_parts(config.model, config.base_weights)
        meta["base_weights"] = str(base.weights_path) if base.weights_path else None
        meta["base_provenance"] = base.provenance
        dataset = FashionMNISTDataset(config.data.split, config.data.path, limit=config.data.limit)
        conditioner = EmbeddedConditioner(base.prompt_states, base.null_states)
        return train(base.unet, base.scheduler, dataset, conditioner, config.train,
                     validation_fn=validation_fn, step_callback=step_callback, run_metadata=meta)

    from .loaders import build_dataset
    from .models import SDConditioner, load_sd_components

    comps = load_sd_components(config.model, revision=config.revision, variant=config.variant)
    resolution = config.data.resolution or comps.resolution
    dataset = build_dataset(config.data, resolution=resolution)
    conditioner = SDConditioner(comps)
    meta["model_source"] = comps.source
    return train(comps.unet, comps.train_scheduler(), dataset, conditioner, config.train,
                 validation_fn=validation_fn, step_callback=step_callback, run_metadata=meta)


def load_emoji_model(model: str, base_weights: str | None = None):
    """The emoji backbone for an ``EMOJI_MODELS`` name: ``emoji`` (the shipped UNet, or the UNet folder
    ``base_weights``), ``emoji-random`` (the same UNet untrained), ``emoji-tiny`` (tests); always the
    shipped VAE."""
    from .emoji_backbone import TINY_EMOJI_UNET_CONFIG, load_emoji_base

    if model not in EMOJI_MODELS:
        raise ValueError(f"not an emoji model: {model!r} (use one of {EMOJI_MODELS})")
    if model == "emoji":
        return load_emoji_base(base_weights)
    return load_emoji_base(random_init=True, unet_config=TINY_EMOJI_UNET_CONFIG if model == "emoji-tiny" else None)


def _finetune_emoji(config: FinetuneConfig, meta: dict, validation_fn, step_callback) -> RunResult:
    from .emoji import EmojiDataset
    from .emoji_backbone import LatentConditioner

    if config.data.kind != "emoji":
        raise ValueError(f"the emoji backbone trains on data.kind='emoji', got {config.data.kind!r}")
    base = load_emoji_model(config.model, config.base_weights)
    meta["base_weights"] = str(base.weights_path) if base.weights_path else None
    meta["base_provenance"] = base.provenance
    meta["data"] = base.data.source
    dataset = EmojiDataset(config.data.split, limit=config.data.limit, data=base.data)
    return train(base.unet, base.scheduler, dataset, LatentConditioner(base.vae, base.states), config.train,
                 validation_fn=validation_fn, step_callback=step_callback, run_metadata=meta)


@dataclass
class PretrainConfig:
    """Pretraining the embedded base UNet from scratch on Fashion-MNIST.

    Attributes:
        train: :class:`TrainConfig`; the defaults here are the recipe of the shipped weights.
        unet_config: ``"embedded"`` (:data:`EMBEDDED_UNET_CONFIG`) or ``"tiny"`` (tests).
        data_dir / limit: Fashion-MNIST folder and subset size.
        export_dir: where to write the final (EMA) weights, ``command.json`` and ``samples.png``
            (``None`` = only the run folder).
        grid_columns / sample_steps / guidance_scale: the sample grid written next to the weights.
    """

    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        output_dir="runs/pretrain", max_steps=3000, batch_size=64, lr=5e-4, warmup_steps=200,
        weight_decay=0.0, ema_decay=0.999, cond_dropout=0.1, checkpoint_every=250, keep_checkpoints=2,
        hflip=True, fcr=FCRConfig(lam=0.0)))
    unet_config: str = "embedded"
    data_dir: str | None = None
    limit: int | None = None
    export_dir: str | None = None
    grid_columns: int = 8
    sample_steps: int = 50
    guidance_scale: float = 2.0
    seed_init: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["train"] = self.train.to_dict()
        return d


def save_sample_grid(base, path: str | Path, *, columns: int = 8, steps: int = 50, guidance_scale: float = 2.0,
                     seed: int = 0, unet=None) -> Path:
    """Sample ``columns`` images per class and save a grid (one row per class, labelled) as PNG."""
    from PIL import Image, ImageDraw

    n_cls = len(base.classes)
    labels = torch.arange(n_cls).repeat_interleave(columns)
    g = torch.Generator().manual_seed(seed)
    imgs = sample_images(base, labels, steps=steps, guidance_scale=guidance_scale, generator=g, unet=unet)
    arr = (imgs[:, 0].numpy() * 255).round().astype("uint8")
    scale, pad, label_w = 3, 2, 110
    h, w = arr.shape[1] * scale, arr.shape[2] * scale
    grid = Image.new("L", (label_w + columns * (w + pad), n_cls * (h + pad)), 255)
    draw = ImageDraw.Draw(grid)
    for c in range(n_cls):
        draw.text((4, c * (h + pad) + h // 2 - 6), base.classes[c], fill=0)
        for j in range(columns):
            tile = Image.fromarray(arr[c * columns + j]).resize((w, h), Image.NEAREST)
            grid.paste(tile, (label_w + j * (w + pad), c * (h + pad)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    logger.info("wrote sample grid %s (%d classes x %d, DDIM-%d, guidance %.1f, seed %d)",
                path, n_cls, columns, steps, guidance_scale, seed)
    return path


def pretrain(config: PretrainConfig, *, step_callback=None, command: list[str] | None = None) -> RunResult:
    """Train the embedded base UNet from scratch (λ = 0 unless ``train.fcr`` says otherwise).

    Writes the run folder; with ``export_dir`` also the final weights (EMA if enabled) as
    ``diffusion_pytorch_model.safetensors`` + ``config.json``, ``command.json`` (the exact command,
    code version, hardware, steps, wall time, final losses) and ``samples.png``.
    """
    from diffusers import UNet2DConditionModel

    base = load_embedded_base(random_init=True)
    cfg = {"embedded": EMBEDDED_UNET_CONFIG, "tiny": TINY_EMBEDDED_UNET_CONFIG}.get(config.unet_config)
    if cfg is None:
        raise ValueError(f"unet_config must be 'embedded' or 'tiny', got {config.unet_config!r}")
    base.unet = build_unet(cfg, seed=config.seed_init)
    dataset = FashionMNISTDataset("train", config.data_dir, limit=config.limit)
    conditioner = EmbeddedConditioner(base.prompt_states, base.null_states)
    result = train(base.unet, base.scheduler, dataset, conditioner, config.train, step_callback=step_callback,
                   run_metadata={"command": "pretrain", "pretrain": config.to_dict()})
    if config.export_dir and result.final_unet is not None:
        export = Path(config.export_dir)
        export.mkdir(parents=True, exist_ok=True)
        unet = UNet2DConditionModel.from_pretrained(result.final_unet)
        unet.save_pretrained(export, safe_serialization=True)
        base.unet = unet.eval()
        grid = save_sample_grid(base, export / "samples.png", columns=config.grid_columns,
                                steps=config.sample_steps, guidance_scale=config.guidance_scale)
        record = {
            "command": " ".join(command or sys.argv),
            "pretrain_config": config.to_dict(),
            "steps": result.steps,
            "wall_time_s": round(result.wall_time_s, 1),
            "final_logs": result.last_logs,
            "weights_from": str(result.final_unet),
            "sampler_for_grid": {"scheduler": "DDIM", "steps": config.sample_steps,
                                 "guidance_scale": config.guidance_scale, "seed": 0, "file": grid.name},
            "provenance": run_provenance(),
            # the code that trained (read when the run started), not the code at export time
            "provenance_at_start": json.loads((result.run_dir / "config.json").read_text()).get("provenance"),
            "stopped_by_time": result.stopped_by_time,
        }
        (export / "command.json").write_text(json.dumps(record, indent=2, default=str))
        logger.info("exported base weights to %s", export)
    return result
