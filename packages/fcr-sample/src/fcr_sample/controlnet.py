"""The ControlNet of a pipeline runs only when the encoder cache will use its residuals.

A ControlNet's outputs enter the UNet only as additional residuals of the encoder (the down-block
residuals and the mid-block output). Under the encoder cache those are computed at key steps and
reused at the others, so at a non-key step the ControlNet's work would be thrown away. This hook
on ``pipe.controlnet`` (a ``ControlNetModel`` or a ``MultiControlNetModel``) asks the UNet's
encoder-cache hook whether the coming UNet call encodes; if not, it returns the outputs of the
last real ControlNet call without running it (the UNet ignores them), so a non-key step costs the
decoder alone. :func:`fcr_sample.apply_encoder_cache` registers it and
:func:`fcr_sample.remove_encoder_cache` removes it; nothing to do by hand.

T2I-Adapters need nothing of the kind: diffusers' adapter pipelines run the adapter once per call,
before the loop, and pass its residuals to every UNet call, which the cache consumes at key steps.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers.hooks.hooks import HookRegistry, ModelHook

from .hooks import remove_module_hook

logger = logging.getLogger(__name__)

__all__ = ["ControlNetSkipHook", "attach_controlnet_skip", "detach_controlnet_skip"]

HOOK_NAME = "fcr_controlnet_skip"


class ControlNetSkipHook(ModelHook):
    """Runs the ControlNet only before UNet calls that encode; otherwise replays its last outputs."""

    _is_stateful = True

    def __init__(self, cache_hook):
        super().__init__()
        self.cache_hook = cache_hook  # the EncoderCacheHook on the pipeline's UNet
        self.last: Any = None

    def new_forward(self, module, *args, **kwargs):
        stats = self.cache_hook.stats
        if self.last is None or self.cache_hook.will_encode():
            self.last = self.fn_ref.original_forward(*args, **kwargs)
            stats.controlnet_forwards += 1
        else:
            stats.controlnet_skips += 1
        return self.last

    def reset_state(self, module):
        self.last = None
        return module


def attach_controlnet_skip(pipe, cache_hook) -> ControlNetSkipHook | None:
    """Register :class:`ControlNetSkipHook` on ``pipe.controlnet`` if the pipeline has one."""
    controlnet = getattr(pipe, "controlnet", None) if pipe is not None else None
    if not isinstance(controlnet, torch.nn.Module):
        return None
    hook = ControlNetSkipHook(cache_hook)
    HookRegistry.check_if_exists_or_initialize(controlnet).register_hook(hook, HOOK_NAME)
    logger.info("the %s runs only at the encoder cache's key steps", type(controlnet).__name__)
    return hook


def detach_controlnet_skip(pipe) -> bool:
    """Remove the hook from ``pipe.controlnet``; returns whether it was there."""
    controlnet = getattr(pipe, "controlnet", None) if pipe is not None else None
    if not isinstance(controlnet, torch.nn.Module):
        return False
    return remove_module_hook(controlnet, HOOK_NAME)
