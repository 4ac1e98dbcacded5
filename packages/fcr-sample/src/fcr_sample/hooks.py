"""Plumbing shared by the caches: targets, counters, registration on diffusers' hook registry.

A cache is a :class:`CacheHook` subclass with a typed per-run state (``state_cls``, a
:class:`~fcr_sample.run_state.HookState` dataclass): the base class counts calls, detects new
sampling runs (:class:`~fcr_sample.run_state.RunTracker`) and resets ``self.state`` at the start of
each one, then calls ``on_new_run(run)``.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from diffusers.hooks.hooks import HookRegistry, ModelHook
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from .run_state import HookState, RunTracker
from .unet_parts import Conditioning, EncoderOutput, run_encoder

logger = logging.getLogger(__name__)

__all__ = [
    "CacheStats",
    "get_cache_stats",
    "reset_cache_stats",
    "find_cache_hooks",
    "resolve_target",
    "start_sampling_run",
    "remove_module_hook",
]


@dataclass
class CacheStats:
    """Forward counters of a cache, cumulative since it was applied or last reset.

    Attributes:
        unet_calls: calls of ``unet(...)`` made by the sampler.
        full_forwards: calls that ran the whole UNet (encoder and decoder) on their own input.
        encoder_forwards: encoder passes (conv_in, down blocks, mid block).
        decoder_forwards: per-step decoder evaluations; a batch of m steps counts m.
        decoder_batches: decoder invocations (a parallel batch counts once).
        decoder_rows: batch rows pushed through the decoder (steps × images, CFG doubles it).
        partial_forwards: DeepCache calls that ran only the shallow path.
        runs: sampling runs started.
        controlnet_forwards: ControlNet calls that ran (encoder cache on a ControlNet pipeline;
            a Multi-ControlNet call counts once).
        controlnet_skips: ControlNet calls answered without running it (non-key steps).
    """

    unet_calls: int = 0
    full_forwards: int = 0
    encoder_forwards: int = 0
    decoder_forwards: int = 0
    decoder_batches: int = 0
    decoder_rows: int = 0
    partial_forwards: int = 0
    runs: int = 0
    controlnet_forwards: int = 0
    controlnet_skips: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def resolve_target(pipe_or_unet) -> tuple[torch.nn.Module, Any]:
    """``(unet, pipeline_or_None)`` for a pipeline with a ``.unet`` or a bare UNet."""
    unet = getattr(pipe_or_unet, "unet", None)
    if isinstance(unet, torch.nn.Module):
        return _unwrap(unet), pipe_or_unet
    if isinstance(pipe_or_unet, torch.nn.Module):
        unet = _unwrap(pipe_or_unet)
        if hasattr(unet, "down_blocks") and hasattr(unet, "up_blocks") and hasattr(unet, "conv_in"):
            return unet, None
    raise TypeError(
        f"expected a diffusers pipeline with a .unet or a UNet2DConditionModel, got {type(pipe_or_unet).__name__}"
    )


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    if hasattr(module, "_orig_mod"):  # torch.compile wrapper: hooks go on the real module
        raise TypeError(
            "apply the cache before torch.compile: hooks must be registered on the original UNet"
        )
    return module


@functools.cache
def _forward_signature(cls) -> inspect.Signature:
    return inspect.signature(cls.forward)


def bind_unet_args(unet, args: tuple, kwargs: dict) -> dict[str, Any]:
    """UNet forward arguments by name, defaults filled in."""
    bound = _forward_signature(type(unet)).bind(unet, *args, **kwargs)
    bound.apply_defaults()
    out = dict(bound.arguments)
    out.pop("self", None)
    return out


#: UNet forward arguments that condition the blocks (passed on to ``prepare_conditioning``).
CONDITIONING_ARGS = (
    "class_labels",
    "timestep_cond",
    "attention_mask",
    "cross_attention_kwargs",
    "added_cond_kwargs",
    "encoder_attention_mask",
)


def conditioning_kwargs(a: dict[str, Any]) -> dict[str, Any]:
    return {k: a[k] for k in CONDITIONING_ARGS}


def encode_call(unet, a: dict[str, Any], cond: Conditioning) -> EncoderOutput:
    """The encoder on a call's sample, with its ControlNet / T2I-Adapter residuals."""
    return run_encoder(
        unet,
        a["sample"],
        cond,
        down_block_additional_residuals=a["down_block_additional_residuals"],
        mid_block_additional_residual=a["mid_block_additional_residual"],
        down_intrablock_additional_residuals=a["down_intrablock_additional_residuals"],
    )


def unet_output(out: torch.Tensor, return_dict: bool):
    """What ``UNet2DConditionModel.forward`` returns for ``out``."""
    return UNet2DConditionOutput(sample=out) if return_dict else (out,)


class CacheHook(ModelHook):
    """Base of the fcr-sample hooks: a run tracker, counters and a typed per-run state.

    Subclasses set ``hook_name`` and ``state_cls`` (a :class:`HookState` dataclass), read and write
    ``self.state`` in ``new_forward`` and fill it in ``on_new_run``; ``self.state`` has been reset
    to its defaults by then.
    """

    _is_stateful = True
    hook_name = "fcr_cache"
    state_cls: type[HookState] = HookState

    def __init__(self, pipeline=None):
        super().__init__()
        self.tracker = RunTracker(pipeline, name=type(self).__name__)
        self.stats = CacheStats()
        self.state = self.state_cls()
        self._runs_seen = 0

    def begin_call(self, timestep):
        run, step = self.tracker.begin_call(timestep)
        if self.tracker.runs_started != self._runs_seen:
            self._runs_seen = self.tracker.runs_started
            self.state.reset()
            try:
                self.on_new_run(run)
            except BaseException:
                # A run the config refuses (on_new_run checks it) is not continued by the next call
                # and is not counted: the UNet did not run.
                self.tracker.run = None
                raise
            self.stats.runs += 1
        self.stats.unet_calls += 1
        return run, step

    def check_run(self, num_steps: int, num_schedule_steps: int) -> None:  # overridden
        """Raise ``ValueError`` when the config cannot serve a run of ``num_steps`` UNet calls
        (e.g. a stride larger than the run). :meth:`on_new_run` checks the same."""

    def on_new_run(self, run) -> None:  # overridden; raises ValueError for a run the config refuses
        pass

    def loop_callback(self, scheduler) -> Callable[[dict[str, Any]], Any] | None:
        """A step callback :func:`fcr_sample.denoise` must run for this hook, or ``None``."""
        return None

    def reset_state(self, module):
        self.tracker.run = None
        self.state.reset()
        return module


def find_cache_hooks(pipe_or_unet) -> list[CacheHook]:
    unet, _ = resolve_target(pipe_or_unet)
    registry = getattr(unet, "_diffusers_hook", None)
    if registry is None:
        return []
    return [h for h in registry.hooks.values() if isinstance(h, CacheHook)]


def register_cache_hook(pipe_or_unet, hook_factory) -> CacheHook:
    unet, pipe = resolve_target(pipe_or_unet)
    existing = find_cache_hooks(unet)
    if existing:
        raise ValueError(
            f"{type(existing[0]).__name__} is already applied to this UNet; remove it first "
            "(remove_encoder_cache / remove_deep_cache)"
        )
    hook = hook_factory(unet, pipe)
    HookRegistry.check_if_exists_or_initialize(unet).register_hook(hook, hook.hook_name)
    logger.info("applied %s to %s", type(hook).__name__, type(unet).__name__)
    return hook


def remove_cache_hook(pipe_or_unet, hook_name: str) -> bool:
    """Remove a hook by name; returns whether one was there. Restores ``forward`` exactly."""
    unet, _ = resolve_target(pipe_or_unet)
    return remove_module_hook(unet, hook_name)


def remove_module_hook(module: torch.nn.Module, hook_name: str) -> bool:
    """Remove hook ``hook_name`` from ``module``'s diffusers registry, leaving the module exactly
    as it was before any hook; returns whether the hook was there."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None or hook_name not in registry.hooks:
        return False
    registry.remove_hook(hook_name, recurse=False)
    if not registry.hooks:
        # The registry leaves the class's own bound method as an instance attribute; drop it so
        # the module is exactly as it was (other code may compare ``unet.forward``).
        fwd = module.__dict__.get("forward")
        if fwd is not None and getattr(fwd, "__func__", None) is type(module).forward:
            del module.__dict__["forward"]
        del module._diffusers_hook
    return True


def get_cache_stats(pipe_or_unet) -> CacheStats:
    """A copy of the forward counters of the cache applied to ``pipe_or_unet``.

    Example:
        >>> reset_cache_stats(pipe); pipe("a photo of a cat", num_inference_steps=50)
        >>> get_cache_stats(pipe).encoder_forwards
        5
    """
    hooks = find_cache_hooks(pipe_or_unet)
    if not hooks:
        raise ValueError("no fcr-sample cache is applied to this pipeline/UNet")
    return CacheStats(**hooks[0].stats.as_dict())


def reset_cache_stats(pipe_or_unet) -> None:
    """Zero the forward counters (the cached features themselves reset at every run)."""
    for hook in find_cache_hooks(pipe_or_unet):
        hook.stats = CacheStats()


def start_sampling_run(module, timesteps: Sequence[float] | torch.Tensor) -> None:
    """Tell the caches on a bare UNet that a new sampling run over ``timesteps`` begins.

    Only needed when a cache was applied to a UNet rather than a pipeline and you write the
    sampling loop yourself (:func:`fcr_sample.denoise` does it for you).

    Raises:
        ValueError: no cache is applied, or a cache's config does not fit a run of
            ``len(timesteps)`` steps (e.g. ``EncoderCacheConfig(stride=50)`` for 5 steps).

    Example:
        >>> scheduler.set_timesteps(50)
        >>> start_sampling_run(unet, scheduler.timesteps)
        >>> for t in scheduler.timesteps:
        ...     eps = unet(x, t, encoder_hidden_states=text).sample
        ...     x = scheduler.step(eps, t, x).prev_sample
    """
    hooks = find_cache_hooks(module)
    if not hooks:
        raise ValueError("no fcr-sample cache is applied to this module")
    n = int(torch.as_tensor(timesteps).numel())
    for hook in hooks:  # a config that does not fit the run fails here, before the loop starts
        hook.check_run(n, n)
    for hook in hooks:
        hook.tracker.start(timesteps)
