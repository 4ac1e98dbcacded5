"""What a plan costs: FLOPs of one UNet forward per model and resolution, and the machine's
throughput that turns FLOPs into wall time.

The embedded UNet's cost is counted with torch's flop counter (exact; memoised per UNet and
resolution); a Stable Diffusion UNet's from its ``unet/config.json`` (:mod:`fcr_eval.plan.unet_flops`,
no torch), else from the experiment file or design.md §2 constants. :func:`calibrate_throughput`
times the embedded UNet for a few seconds.

Example:
    >>> cost = model_cost(exp, "sd15", 512)
    >>> round(cost.flops_per_forward / 1e9), round(cost.encoder_share, 2)
    (803, 0.33)
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from fcr_eval.plan.unet_flops import LATENT_FACTOR, unet_config_for, unet_flops
from fcr_eval.spec.experiment import Experiment

__all__ = ["ModelCost", "model_cost", "EMBEDDED_RESOLUTION", "stated_cost_notes", "calibrate_throughput", "DEFAULT_CPU_GFLOPS",
           "ASSUMED_GPU_TFLOPS", "SD_COSTS", "EFFICIENTNET_LITE0_FLOPS_224"]

#: Effective throughput assumed when the plan is not calibrated (``--no-calibrate``): the embedded
#: UNet at batch 64 measured 96 GFLOP/s on a 2-core dev machine at low load and ~25 under load;
#: the mini-exp-1 quick run took 1.6× the calibrated estimate (per-step overheads), hence 60.
DEFAULT_CPU_GFLOPS = 60.0
#: For real models: one A100-class GPU at ~40 % of its 312 TFLOP/s bf16 peak (a stated assumption).
ASSUMED_GPU_TFLOPS = 125.0

#: design.md §2: SD v1.5 UNet at 512² (64×64 latent): ~803 GFLOPs per forward, encoder ~33 %.
#: DeepCache's shallow path at branch 0 costs roughly a tenth of a forward (its 2.1× at N=5).
SD_COSTS = {"flops_per_forward": 803e9, "encoder_flop_share": 0.33, "deepcache_partial_share": 0.10}
#: A stated ``flops_per_forward`` this far (relative) from the architecture's count is reported.
_STATED_FLOPS_TOLERANCE = 0.15

#: EfficientNet-Lite0 at 224²: ~0.39 GFLOPs per image (scales with the square of the input size).
EFFICIENTNET_LITE0_FLOPS_224 = 0.39e9


@dataclass(frozen=True)
class ModelCost:
    """FLOPs of one UNet forward for one image (no CFG doubling) and its split."""

    flops_per_forward: float
    encoder_share: float
    deepcache_partial_share: float
    source: str  # "flop counter" or "design.md §2 constants"


_COST_CACHE: dict[tuple, ModelCost] = {}

#: Default sampling resolution (pixels) of each embedded backbone; Stable Diffusion's is 512.
EMBEDDED_RESOLUTION = {"fashion-mnist": 28, "emoji": 32}


def model_cost(exp: Experiment, model_id: str, resolution: int | None = None) -> ModelCost:
    """FLOPs per forward of ``model_id`` at ``resolution`` (default: the model's own): counted on the
    embedded UNet (exact; memoised per UNet and resolution), from the experiment file or design.md
    §2 constants for Stable Diffusion (not instantiated here)."""
    spec = exp.models[model_id]
    if spec.backbone == "emoji":
        from fcr_train.emoji_backbone import (
            EMOJI_TEXT_MAX_LENGTH,
            EMOJI_UNET_CONFIG,
            EMOJI_VAE_CONFIG,
            TINY_EMOJI_UNET_CONFIG,
        )

        cfg = TINY_EMOJI_UNET_CONFIG if spec.source == "emoji-tiny" else EMOJI_UNET_CONFIG
        factor = 2 ** (len(EMOJI_VAE_CONFIG["block_out_channels"]) - 1)  # pixels per latent side
        key = (spec.source, int(resolution // factor if resolution else cfg["sample_size"]))
        if key not in _COST_CACHE:
            _COST_CACHE[key] = _count_embedded_cost(cfg, key[1], EMOJI_TEXT_MAX_LENGTH)
        return _COST_CACHE[key]
    if spec.embedded:
        from fcr_train.api import TINY_EMBEDDED_UNET_CONFIG
        from fcr_train.embedded import EMBEDDED_UNET_CONFIG

        cfg = TINY_EMBEDDED_UNET_CONFIG if spec.source == "embedded-tiny" else EMBEDDED_UNET_CONFIG
        key = (spec.source, int(resolution or cfg["sample_size"]))
        if key not in _COST_CACHE:
            _COST_CACHE[key] = _count_embedded_cost(cfg, key[1])
        return _COST_CACHE[key]
    arch = unet_config_for(spec.source)
    if arch is not None:
        cfg, where = arch
        res = resolution or spec.resolution or int(cfg.get("sample_size", 64)) * LATENT_FACTOR
        split = unet_flops(cfg, max(1, res // LATENT_FACTOR))
        if split is not None:
            return ModelCost(split.total, split.encoder_share, SD_COSTS["deepcache_partial_share"],
                             f"counted from the UNet config ({where})")
    flops = spec.flops_per_forward or SD_COSTS["flops_per_forward"]
    if resolution and spec.resolution and resolution != spec.resolution:
        flops *= (resolution / spec.resolution) ** 2
    return ModelCost(flops, spec.encoder_flop_share or SD_COSTS["encoder_flop_share"],
                     SD_COSTS["deepcache_partial_share"], "experiment file / design.md §2 constants")


def stated_cost_notes(exp: Experiment) -> list[str]:
    """Where a model's stated ``flops_per_forward`` disagrees with its architecture's count."""
    notes = []
    for m in exp.models.values():
        if m.embedded or not m.flops_per_forward:
            continue
        counted = model_cost(exp, m.id, m.resolution)
        if counted.source.startswith("counted") and abs(m.flops_per_forward / counted.flops_per_forward - 1) \
                > _STATED_FLOPS_TOLERANCE:
            notes.append(f"model {m.id!r}: flops_per_forward = {m.flops_per_forward:.3g} in {exp.path} differs from "
                         f"{counted.flops_per_forward:.3g} counted from its UNet config at {m.resolution or 'its'}px; "
                         "the plan uses the count")
    return notes


def _count_embedded_cost(cfg: dict, res: int, tokens: int = 16) -> ModelCost:
    import torch
    from fcr_sample import DeepCacheConfig
    from fcr_sample.benchmark import deepcache_partial_flops, flop_split
    from fcr_train.embedded import build_unet

    unet = build_unet(cfg).eval()
    x = torch.randn(1, cfg["in_channels"], res, res)
    text = torch.randn(1, tokens, cfg["cross_attention_dim"])
    split = flop_split(unet, x, text)
    # the shallow path of DeepCache's default branch (0), which the mini experiments compare
    partial = deepcache_partial_flops(unet, x, text, DeepCacheConfig(cache_branch_id=0)) / split.total
    return ModelCost(split.total, split.encoder_share, partial, "flop counter")


def calibrate_throughput(seconds: float = 2.0) -> float:
    """Effective GFLOP/s of this machine on the embedded UNet (batched CFG forwards, the
    runner's dominant work). Takes about ``seconds``."""
    import torch
    from fcr_train.embedded import EMBEDDED_UNET_CONFIG, build_unet

    unet = build_unet(EMBEDDED_UNET_CONFIG).eval()
    x = torch.randn(64, 1, 28, 28)
    text = torch.randn(64, 16, 384)
    from fcr_eval.metrics.cost import count_flops

    flops = count_flops(lambda: unet(x, 500, text))
    with torch.no_grad():
        unet(x, 500, text)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            unet(x, 500, text)
            n += 1
    return flops * n / (time.perf_counter() - t0) / 1e9

