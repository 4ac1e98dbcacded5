"""An adaptive cache: each step decides from a cheap run-time signal whether to refresh.

A uniform schedule spends its full steps evenly, yet a cache's error enters unevenly: on the
embedded base ~90 % of FD-10's final error enters in its first served segment, and the errors of
consecutive stale steps add up (``docs/mechanism/README.md``). The adaptive cache refreshes when
the trajectory has moved: at every UNet call it runs ``conv_in`` on the step's input (one
convolution; the UNet's first, shallowest feature), adds the relative change of that feature
since the previous step, ``mean|f_s − f_{s−1}| / mean|f_{s−1}|``, to a per-sample sum, and runs the
whole UNet when the sum reaches :attr:`AdaptiveCacheConfig.threshold` (the sum then restarts).
Otherwise the step is served from the cache: DeepCache's shallow path (``cache="deepcache"``) or
Faster Diffusion's decoder on the cached encoder features (``cache="fd"``).

**Per batch, not per sample.** One decision serves the whole batch (CFG's two halves included):
the batch refreshes when *any* sample's accumulated change reaches the threshold, so no sample is
served past its threshold; a larger batch of diverse samples therefore refreshes at least as often
as its members would alone. Per-sample decisions would split a batch into rows that run in full
and rows that do not, which DeepCache's stored outputs and FD's cached encoder batch do not allow
without running the UNet twice per step.

**What it gives up.** The key steps are not known before the run, so FD's *parallel decoding*
(batching a group's decoders at its key step) is impossible: adaptive FD decodes step by step.
A pipeline's ControlNet runs at every step (whether its residuals will be used is decided inside
the UNet call). Prior noise injection is not offered.

Usage, two lines on an existing pipeline::

    from fcr_sample import AdaptiveCacheConfig, apply_adaptive_cache
    apply_adaptive_cache(pipe, AdaptiveCacheConfig(threshold=0.2))  # DeepCache's deep path by default
    image = pipe("a photo of a cat", num_inference_steps=50).images[0]

State resets at the start of every sampling run; ``hook.signal.refresh_steps`` lists the steps of
the last run that ran in full, and :func:`fcr_sample.get_cache_stats` counts them as
``full_forwards`` (cached steps: ``partial_forwards`` for DeepCache, ``decoder_forwards`` beyond
the full ones for FD). ``threshold=0`` refreshes every step and samples exactly as the uncached
UNet.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .cache_configs import AdaptiveCacheConfig, EncoderCacheConfig  # torch-free; re-exported
from .deep_cache import DeepCacheConfig, DeepCacheHook
from .encoder_cache import EncoderCacheHook
from .hooks import register_cache_hook, remove_cache_hook

logger = logging.getLogger(__name__)

__all__ = ["AdaptiveCacheConfig", "RefreshSignal", "apply_adaptive_cache", "remove_adaptive_cache"]

HOOK_NAME = "fcr_adaptive_cache"


class RefreshSignal:
    """The refresh decision of one adaptive cache: accumulated relative change of ``conv_in``'s output.

    Attributes:
        refresh_steps: the steps of the current (or last) run that refreshed, in order.
        accumulated: per-sample accumulated relative change since the last refresh (``None``
            before the run's first step).
    """

    def __init__(self, config: AdaptiveCacheConfig):
        self.config = config
        self.reset()

    def reset(self) -> None:
        self.refresh_steps: list[int] = []
        self.accumulated: torch.Tensor | None = None
        self._previous: torch.Tensor | None = None
        self._cached_in_a_row = 0

    @staticmethod
    def feature(unet, sample: torch.Tensor) -> torch.Tensor:
        """``conv_in``'s output for ``sample``, one row per sample (the UNet's own input handling)."""
        with torch.no_grad():
            x = 2 * sample - 1.0 if unet.config.center_input_sample else sample
            return unet.conv_in(x).reshape(sample.shape[0], -1).float()

    def decide(self, unet, sample: torch.Tensor, step: int, *, forced: bool = False) -> bool:
        """Whether ``step`` refreshes; ``forced``: it must (nothing cached yet, batch changed)."""
        f = self.feature(unet, sample)
        prev = self._previous
        if forced or step == 0 or prev is None or prev.shape != f.shape:
            refresh = True
        else:
            change = (f - prev).abs().mean(dim=1) / prev.abs().mean(dim=1).clamp_min(1e-12)
            self.accumulated = self.accumulated + change
            cap = self.config.max_cached_steps
            refresh = bool((self.accumulated >= self.config.threshold).any()) or (
                cap is not None and self._cached_in_a_row >= cap
            )
        self._previous = f
        if refresh:
            self.accumulated = torch.zeros(f.shape[0], device=f.device)
            self._cached_in_a_row = 0
            self.refresh_steps.append(step)
        else:
            self._cached_in_a_row += 1
        return refresh


class AdaptiveDeepCacheHook(DeepCacheHook):
    """DeepCache whose full steps are decided by a :class:`RefreshSignal`."""

    hook_name = HOOK_NAME

    def __init__(self, config: AdaptiveCacheConfig, unet, pipeline=None):
        super().__init__(DeepCacheConfig(cache_interval=1, cache_branch_id=config.cache_branch_id), unet, pipeline)
        self.adaptive = config
        self.signal = RefreshSignal(config)

    def check_run(self, num_steps: int, num_schedule_steps: int) -> None:
        pass  # every run length is served

    def on_new_run(self, run) -> None:
        self.signal.reset()

    def wants_full_step(self, unet, a: dict[str, Any], step: int) -> bool:
        st = self.state
        forced = st.batch != a["sample"].shape[0] or not st.outputs
        return self.signal.decide(unet, a["sample"], step, forced=forced)

    def reset_state(self, module):
        self.signal.reset()
        return super().reset_state(module)


class AdaptiveEncoderCacheHook(EncoderCacheHook):
    """The encoder cache (sequential decoding) whose key steps are decided by a :class:`RefreshSignal`."""

    hook_name = HOOK_NAME

    def __init__(self, config: AdaptiveCacheConfig, pipeline=None):
        # key step 0 only as far as the parent's bookkeeping goes; the signal decides every step
        super().__init__(EncoderCacheConfig(key_steps=(0,), parallel_decoding=False), pipeline)
        self.adaptive = config
        self.signal = RefreshSignal(config)

    def on_new_run(self, run) -> None:
        super().on_new_run(run)
        self.signal.reset()

    def will_encode(self) -> bool:
        return True  # decided inside the UNet call, after a ControlNet has run

    def wants_key_step(self, unet, a: dict, step: int) -> bool:
        return self.signal.decide(unet, a["sample"], step, forced=self.state.enc is None)

    def reset_state(self, module):
        self.signal.reset()
        return super().reset_state(module)


def apply_adaptive_cache(pipe_or_unet, config: AdaptiveCacheConfig | None = None):
    """Make ``pipe_or_unet`` sample with an adaptive cache.

    Args:
        pipe_or_unet: a diffusers pipeline with a ``.unet`` (SD, SDXL, img2img, inpainting,
            ControlNet: runs are detected automatically) or a bare ``UNet2DConditionModel`` (call
            :func:`fcr_sample.start_sampling_run` before each run, or use :func:`fcr_sample.denoise`).
        config: an :class:`AdaptiveCacheConfig`; default: DeepCache's deep path (branch 0) at
            the default threshold.

    Returns:
        The hook on the UNet: ``hook.stats`` counts forwards, ``hook.signal.refresh_steps`` lists
        the steps of the last run that ran in full.

    Raises:
        ValueError: a cache is already applied, or the branch lies deeper than the UNet.

    Example:
        >>> hook = apply_adaptive_cache(pipe, AdaptiveCacheConfig(threshold=0.2))
        >>> image = pipe("a photo of a cat", num_inference_steps=50).images[0]
        >>> hook.signal.refresh_steps
        [0, 1, 2, 4, 7, ...]
    """
    config = config or AdaptiveCacheConfig()
    if config.cache == "deepcache":
        return register_cache_hook(pipe_or_unet, lambda unet, pipe: AdaptiveDeepCacheHook(config, unet, pipe))
    return register_cache_hook(pipe_or_unet, lambda unet, pipe: AdaptiveEncoderCacheHook(config, pipe))


def remove_adaptive_cache(pipe_or_unet) -> None:
    """Remove the adaptive cache (every hook it put on the UNet), restoring the exact original UNet."""
    if not remove_cache_hook(pipe_or_unet, HOOK_NAME):
        logger.warning("remove_adaptive_cache: no adaptive cache was applied")
