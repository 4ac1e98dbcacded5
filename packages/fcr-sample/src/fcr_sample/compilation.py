"""``torch.compile`` for a cached UNet: compile the blocks, not the hook.

Compiling the whole UNet after :func:`fcr_sample.apply_encoder_cache` hands the cache hook's Python
control flow to the compiler: its guards depend on the step count and the per-run state, so every
call of the pipeline produced new graphs. The heavy work lives in the UNet's blocks, which the
hook calls through their modules (``unet.down_blocks[i](...)``, ``unet.mid_block(...)``,
``unet.up_blocks[i](...)``), so *regional* compilation — each block compiled in place with
``nn.Module.compile`` — speeds up the encoder and decoder while the hook stays plain Python. A block
sees at most a few input shapes in a run (the image batch, and the step-tiled batches of parallel
decoding), so the second and later calls of the same shapes reuse the graphs.

Example:
    >>> apply_encoder_cache(pipe, EncoderCacheConfig(stride=10))
    >>> compile_unet_regions(pipe)             # before or after apply_*: the blocks, in place
    >>> images = pipe(prompt).images           # first call compiles, later calls do not
    >>> uncompile_unet_regions(pipe)           # back to eager blocks
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .hooks import resolve_target

logger = logging.getLogger(__name__)

__all__ = ["compile_unet_regions", "uncompile_unet_regions", "unet_regions"]


def unet_regions(unet) -> list[tuple[str, torch.nn.Module]]:
    """The blocks :func:`compile_unet_regions` compiles: every down block, the mid block and every
    up block, by name (``"down_blocks.0"``, ..., ``"mid_block"``, ``"up_blocks.0"``, ...)."""
    regions = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    if unet.mid_block is not None:
        regions.append(("mid_block", unet.mid_block))
    regions += [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
    return regions


def compile_unet_regions(pipe_or_unet, **compile_kwargs: Any) -> list[str]:
    """Compile the UNet's blocks in place (``nn.Module.compile``), leaving ``unet.forward`` — and
    so any fcr-sample cache hook on it — eager.

    Args:
        pipe_or_unet: a pipeline with a ``.unet`` or a ``UNet2DConditionModel``.
        **compile_kwargs: passed to ``torch.compile`` (``backend``, ``mode``, ``dynamic``, ...).

    Returns:
        The names of the compiled blocks.

    Example:
        >>> compile_unet_regions(pipe, mode="max-autotune-no-cudagraphs")
        ['down_blocks.0', ..., 'mid_block', 'up_blocks.0', ...]
    """
    unet, _ = resolve_target(pipe_or_unet)
    names = []
    for name, block in unet_regions(unet):
        block.compile(**compile_kwargs)
        names.append(name)
    logger.info("compiled %d UNet blocks (%s)", len(names), compile_kwargs or "defaults")
    return names


def uncompile_unet_regions(pipe_or_unet) -> None:
    """Undo :func:`compile_unet_regions`: the blocks run eagerly again."""
    unet, _ = resolve_target(pipe_or_unet)
    for _, block in unet_regions(unet):
        block._compiled_call_impl = None  # what nn.Module.compile sets; None means eager
