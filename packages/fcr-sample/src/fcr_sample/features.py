"""The one definition of "encoder features" used across the toolkit.

Encoder features are exactly what the encoder cache stores and reuses: the ``conv_in`` output,
every residual the down blocks emit, and the mid-block output. FCR training regularises them,
evaluation measures their variance across timesteps, and sampling caches them, all through
:func:`encoder_features`, so the three can never disagree about what "the encoder" is.

Subsets (``blocks=``) pick features by depth:

* ``"all"`` — every feature;
* ``"early"`` / ``"mid"`` / ``"late"`` — the down blocks split into three contiguous thirds by
  index (``conv_in`` counts with the first down block, the mid block with the last third);
* an iterable of name prefixes, e.g. ``["down_blocks.1", "mid_block"]``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .unet_parts import prepare_conditioning, run_encoder
from .vocabulary import BLOCK_GROUPS

__all__ = ["BLOCK_GROUPS", "encoder_feature_names", "select_feature_names", "encoder_features"]



def encoder_feature_names(unet) -> list[str]:
    """Names of every encoder feature of ``unet``, in forward order (``mid_block`` last)."""
    names = ["conv_in"]
    for i, block in enumerate(unet.down_blocks):
        names += [f"down_blocks.{i}.resnets.{j}" for j in range(len(block.resnets))]
        names += [f"down_blocks.{i}.downsamplers.{j}" for j in range(len(block.downsamplers or []))]
    if unet.mid_block is not None:
        names.append("mid_block")
    return names


def _depth_thirds(n_down: int) -> dict[str, set[int]]:
    """Split down-block indices 0..n-1 into early/mid/late thirds (never empty for n >= 3)."""
    idx = list(range(n_down))
    a = max(1, round(n_down / 3))
    b = max(a + 1, round(2 * n_down / 3)) if n_down >= 3 else a
    return {"early": set(idx[:a]), "mid": set(idx[a:b]), "late": set(idx[b:])}


def select_feature_names(unet, blocks: str | Iterable[str] = "all") -> list[str]:
    """Resolve a ``blocks`` selector to concrete feature names.

    Raises:
        ValueError: the selector names no feature, or is an unknown group.
    """
    names = encoder_feature_names(unet)
    if isinstance(blocks, str):
        if blocks == "all":
            return names
        if blocks in ("early", "mid", "late"):
            thirds = _depth_thirds(len(unet.down_blocks))
            chosen = []
            for name in names:
                if name == "conv_in":
                    depth_group = "early"
                elif name == "mid_block":
                    depth_group = "late"
                else:
                    i = int(name.split(".")[1])
                    depth_group = next(g for g, s in thirds.items() if i in s)
                if depth_group == blocks:
                    chosen.append(name)
            if not chosen:
                raise ValueError(
                    f"block group {blocks!r} is empty for a UNet with {len(unet.down_blocks)} down blocks"
                )
            return chosen
        if "." not in blocks and blocks not in ("conv_in", "mid_block"):
            raise ValueError(
                f"unknown block group {blocks!r}; use one of {BLOCK_GROUPS} or name prefixes such as 'down_blocks.1'"
            )
        blocks = [blocks]
    prefixes = list(blocks)
    chosen = [n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes)]
    missing = [p for p in prefixes if not any(n == p or n.startswith(p + ".") for n in names)]
    if missing:
        raise ValueError(f"no encoder feature matches {missing}; available: {names}")
    return chosen


def encoder_features(
    unet,
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    encoder_hidden_states: torch.Tensor | None,
    blocks: str | Iterable[str] = "all",
    **unet_kwargs: Any,
) -> dict[str, torch.Tensor]:
    """Run the UNet encoder (``conv_in``, down blocks, mid block) and return its features by name.

    Gradients flow as usual, so this is what an FCR loss differentiates. The decoder is not run.

    Args:
        unet: a diffusers ``UNet2DConditionModel``.
        sample: noisy input ``(B, C, H, W)``.
        timestep: scalar or ``(B,)`` timesteps.
        encoder_hidden_states: text states ``(B, L, D)`` (or ``None`` for unconditional UNets).
        blocks: ``"all"``, ``"early"``, ``"mid"``, ``"late"`` or an iterable of name prefixes.
        **unet_kwargs: ``class_labels``, ``timestep_cond``, ``added_cond_kwargs``,
            ``attention_mask``, ``encoder_attention_mask``, ``cross_attention_kwargs``.

    Returns:
        ``{name: tensor}`` in forward order, e.g. ``{"conv_in": ..., "down_blocks.0.resnets.0":
        ..., "mid_block": ...}``.

    Example:
        >>> feats = encoder_features(unet, x_t, t, text, blocks="late")
        >>> sum((f - g).pow(2).mean() for f, g in zip(feats.values(), other.values()))
    """
    names = select_feature_names(unet, blocks)
    cond = prepare_conditioning(unet, sample, timestep, encoder_hidden_states, **unet_kwargs)
    feats = run_encoder(unet, sample, cond).named_features()
    return {n: feats[n] for n in names}
