"""DeepCache (Ma et al., 2023, https://arxiv.org/abs/2312.00858) as removable hooks on a UNet.

DeepCache runs the whole UNet only at *full* steps. At the steps in between it reruns just a
shallow path — ``conv_in``, the first layers of the encoder and the last layers of the decoder —
and takes every deeper feature from the last full step. This module reproduces the reference
implementation (PyPI ``deepcache``, ``DeepCacheSDHelper``) image for image; it is our own code,
built on diffusers' hook registry, and the package is used only by the tests and benchmarks
that check it.

**Where the cut lies.** ``cache_branch_id = 3·B + L`` names a block ``B`` and a layer ``L``
(a layer is one resnet with its attention; a down block's downsampler is the layer after its last
resnet). Down blocks and up blocks are both numbered from the shallow end: up block ``B`` is
``unet.up_blocks[-1 - B]``, and its layers are counted from its output side. At a cached step

* blocks deeper than ``B``, and the mid block, return their cached outputs;
* blocks shallower than ``B`` run;
* in down block ``B`` layers ``< L`` run (at ``L = 0`` the whole block is cached);
* in up block ``B`` layers ``<= L`` run, counted from the output side.

So at branch 0 a cached step runs ``conv_in``, the time embedding, the last resnet (and its
attention) of the last up block, fed by ``conv_in``'s output, and ``conv_out``.

**Which steps are full.** ``skip_mode="uniform"``: steps ``0, N, 2N, ...`` of the run (the
helper's mode). ``skip_mode="non-uniform"``: the package's ``uniform=False`` schedule, ⌈n/N⌉
full steps spaced by a power curve around step ``center`` (denser there), found by lowering
``pow`` from its given value in 0.02 steps until the count fits (:func:`nonuniform_full_steps`).

Example:
    >>> apply_deep_cache(pipe, DeepCacheConfig(cache_interval=5, cache_branch_id=0))
    >>> image = pipe("a photo of a cat", num_inference_steps=50).images[0]
    >>> remove_deep_cache(pipe)  # exactly the original UNet again
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks.hooks import HookRegistry, ModelHook

from .cache_configs import (  # torch-free; re-exported
    LAYERS_PER_BRANCH_BLOCK,
    SKIP_MODES,
    DeepCacheConfig,
    nonuniform_full_steps,
)
from .hooks import (
    CacheHook,
    bind_unet_args,
    find_cache_hooks,
    register_cache_hook,
    remove_cache_hook,
)
from .run_state import HookState

logger = logging.getLogger(__name__)

__all__ = [
    "SKIP_MODES",
    "DeepCacheConfig",
    "apply_deep_cache",
    "remove_deep_cache",
    "cached_module_names",
    "deep_cache_layers",
    "nonuniform_full_steps",
]

HOOK_NAME = "fcr_deep_cache"
LAYER_HOOK_NAME = "fcr_deep_cache_layer"

# -- the cut: which modules return cached outputs at a cached step ---------------------------


def _is_cached(kind: str, block: int, layer: int, cut_block: int, cut_layer: int) -> bool:
    """Whether the module at (kind, block, layer) is reused at a cached step (package semantics)."""
    if kind == "mid" or block > cut_block:
        return True
    if block < cut_block:
        return False
    return layer >= cut_layer if kind == "down" else layer > cut_layer


def _outermost_cached(unet, cut_block: int, cut_layer: int) -> list[tuple[str, torch.nn.Module]]:
    """The cached modules whose parent block still runs (what must be stored at full steps)."""
    out: list[tuple[str, torch.nn.Module]] = []
    for i, block in enumerate(unet.down_blocks):
        name = f"down_blocks.{i}"
        if _is_cached("down", i, 0, cut_block, cut_layer):
            out.append((name, block))
            continue
        n_layers = len(block.resnets)
        for j in range(n_layers):
            if _is_cached("down", i, j, cut_block, cut_layer):
                out += _layer_modules(name, block, j)
        for j, sampler in enumerate(block.downsamplers or []):
            if _is_cached("down", i, n_layers, cut_block, cut_layer):
                out.append((f"{name}.downsamplers.{j}", sampler))
    if unet.mid_block is not None:
        out.append(("mid_block", unet.mid_block))
    n_up = len(unet.up_blocks)
    for k, block in enumerate(unet.up_blocks):
        name, depth = f"up_blocks.{k}", n_up - 1 - k
        if _is_cached("up", depth, 0, cut_block, cut_layer):
            out.append((name, block))
            continue
        n_layers = len(block.resnets)
        for j in range(n_layers):
            if _is_cached("up", depth, n_layers - 1 - j, cut_block, cut_layer):
                out += _layer_modules(name, block, j)
        for j, sampler in enumerate(block.upsamplers or []):
            if _is_cached("up", depth, 0, cut_block, cut_layer):
                out.append((f"{name}.upsamplers.{j}", sampler))
    return out


def _layer_modules(name: str, block, j: int) -> list[tuple[str, torch.nn.Module]]:
    mods = [(f"{name}.resnets.{j}", block.resnets[j])]
    attentions = getattr(block, "attentions", None)
    if attentions is not None and j < len(attentions):
        mods.append((f"{name}.attentions.{j}", attentions[j]))
    return mods


def _check_branch(unet, config: DeepCacheConfig) -> None:
    n_blocks = min(len(unet.down_blocks), len(unet.up_blocks))
    if config.cache_block_id >= n_blocks:
        raise ValueError(
            f"cache_branch_id={config.cache_branch_id} names block {config.cache_block_id}, but this "
            f"UNet has {len(unet.down_blocks)} down / {len(unet.up_blocks)} up blocks: use "
            f"cache_branch_id < {LAYERS_PER_BRANCH_BLOCK * n_blocks}"
        )


def cached_module_names(unet, config: DeepCacheConfig) -> list[str]:
    """Names (as in ``unet.named_modules()``) of the modules reused at cached steps.

    Example:
        >>> cached_module_names(unet, DeepCacheConfig(cache_branch_id=0))[:2]
        ['down_blocks.0', 'down_blocks.1']
    """
    _check_branch(unet, config)
    return [n for n, _ in _outermost_cached(unet, config.cache_block_id, config.cache_layer_id)]


# -- the hooks -----------------------------------------------------------------------------


@dataclass
class DeepCacheState(HookState):
    """What DeepCache keeps within one sampling run.

    Attributes:
        full_steps: this run's full-step indices.
        reusing: inside a UNet call at a cached step (the layer hooks return stored outputs);
            ``False`` at full steps and outside UNet calls.
        refreshing: inside a UNet call at a full step (the layer hooks store their outputs).
        outputs: the stored output of every cached module, by module name.
        batch: the batch size the outputs were stored at.
    """

    full_steps: frozenset[int] = frozenset()
    reusing: bool = False
    refreshing: bool = False
    outputs: dict[str, Any] = field(default_factory=dict)
    batch: int | None = None


class _LayerCacheHook(ModelHook):
    """On one cached module: store its output at full steps, return it at cached steps."""

    _is_stateful = False

    def __init__(self, name: str, state_of):
        super().__init__()
        self.name = name
        self._state_of = state_of  # reads the owning hook's current state object

    def new_forward(self, module, *args, **kwargs):
        st = self._state_of()
        if st.reusing:
            return st.outputs[self.name]
        out = self.fn_ref.original_forward(*args, **kwargs)
        if st.refreshing:
            st.outputs[self.name] = out
        return out


class DeepCacheHook(CacheHook):
    """The hook on the UNet: counts steps, decides full vs cached, owns the layer hooks."""

    hook_name = HOOK_NAME
    state_cls = DeepCacheState

    def __init__(self, config: DeepCacheConfig, unet, pipeline=None):
        super().__init__(pipeline)
        _check_branch(unet, config)
        self.config = config
        self._layers = _outermost_cached(unet, config.cache_block_id, config.cache_layer_id)

    def initialize_hook(self, module):
        _install_layer_hooks(module, self._layers, lambda: self.state)
        return module

    def deinitalize_hook(self, module):  # diffusers' spelling; called by remove_hook
        _remove_layer_hooks(module, self._layers)
        return module

    def check_run(self, num_steps: int, num_schedule_steps: int) -> None:
        self.config.full_steps_for_run(num_steps, num_schedule_steps)

    def on_new_run(self, run) -> None:
        self.state.full_steps = frozenset(self.config.full_steps_for_run(run.num_steps, run.num_schedule_steps))

    def wants_full_step(self, unet, a: dict[str, Any], step: int) -> bool:
        """Whether ``step`` is one of the schedule's full steps (the adaptive cache decides here)."""
        return step in self.state.full_steps

    def new_forward(self, module, *args, **kwargs):
        a = bind_unet_args(module, args, kwargs)
        _, step = self.begin_call(a["timestep"])
        st = self.state
        batch = a["sample"].shape[0]
        full = self.wants_full_step(module, a, step) or st.batch != batch or not st.outputs
        if full and step not in st.full_steps:
            logger.debug("DeepCache: step %d runs in full (nothing stored at batch %d)", step, batch)
        st.reusing, st.refreshing = not full, full
        try:
            out = self.fn_ref.original_forward(*args, **kwargs)
        finally:
            st.reusing = st.refreshing = False
        if full:
            st.batch = batch
            self.stats.full_forwards += 1
            self.stats.encoder_forwards += 1
            self.stats.decoder_forwards += 1
            self.stats.decoder_batches += 1
            self.stats.decoder_rows += batch
        else:
            self.stats.partial_forwards += 1
        return out


def _install_layer_hooks(unet, layers, state_of) -> None:
    """Put a store/reuse hook on every module of ``layers``, all reading ``state_of()``."""
    for name, sub in layers:
        hook = _LayerCacheHook(name, state_of)
        HookRegistry.check_if_exists_or_initialize(sub).register_hook(hook, LAYER_HOOK_NAME)
    _invalidate_child_cache(unet)


def _remove_layer_hooks(unet, layers) -> None:
    for _, sub in layers:
        _unregister(sub, LAYER_HOOK_NAME)
    _invalidate_child_cache(unet)


@contextmanager
def deep_cache_layers(unet, config: DeepCacheConfig) -> Iterator[DeepCacheState]:
    """DeepCache's cut on a bare UNet, driven by hand: the layer hooks the cache itself uses.

    Inside the block every module that DeepCache reuses at a cached step (the ones
    :func:`cached_module_names` lists) carries the same store/reuse hook as under
    :func:`apply_deep_cache`, controlled by the yielded :class:`DeepCacheState`: with
    ``state.refreshing = True`` a ``unet(...)`` call stores those modules' outputs (a full step),
    with ``state.reusing = True`` it returns the stored outputs and runs only the shallow path (a
    cached step), with both ``False`` the UNet runs as usual. No sampling run is tracked, so rows
    may have different timesteps — what a training objective on DeepCache's situation needs
    (``fcr_train.output_consistency``). The hooks are gone when the block ends.

    Args:
        unet: a ``UNet2DConditionModel`` with no fcr-sample cache applied.
        config: where the cut lies (``cache_branch_id``; the interval is not used).

    Raises:
        ValueError: a cache is applied to ``unet``, or the branch lies deeper than the UNet.

    Example:
        >>> with deep_cache_layers(unet, DeepCacheConfig(cache_branch_id=0)) as st:
        ...     st.refreshing = True
        ...     unet(x_key, t_key, text)          # full step: stores the deep features
        ...     st.refreshing, st.reusing = False, True
        ...     eps = unet(x, t, text).sample     # cached step: shallow path only
    """
    if find_cache_hooks(unet):
        raise ValueError("deep_cache_layers: a cache is already applied to this UNet; remove it first")
    _check_branch(unet, config)
    layers = _outermost_cached(unet, config.cache_block_id, config.cache_layer_id)
    state = DeepCacheState()
    _install_layer_hooks(unet, layers, lambda: state)
    try:
        yield state
    finally:
        _remove_layer_hooks(unet, layers)
        state.reset()


def _unregister(module: torch.nn.Module, name: str) -> None:
    """Take hook ``name`` off ``module``; an emptied registry leaves no trace on the module."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None:
        return
    registry.remove_hook(name, recurse=False)
    if registry.hooks:
        return
    del module._diffusers_hook
    leftover = module.__dict__.get("forward")  # the registry re-sets the bound class method
    if getattr(leftover, "__func__", None) is type(module).forward:
        del module.__dict__["forward"]


def _invalidate_child_cache(unet) -> None:
    registry = getattr(unet, "_diffusers_hook", None)
    if registry is not None and hasattr(registry, "invalidate_child_registries_cache"):
        registry.invalidate_child_registries_cache()


def apply_deep_cache(pipe_or_unet, config: DeepCacheConfig | None = None) -> DeepCacheHook:
    """Make ``pipe_or_unet`` sample with DeepCache.

    Args:
        pipe_or_unet: a diffusers pipeline with a ``.unet`` (sampling runs are then detected
            automatically) or a bare ``UNet2DConditionModel`` (call
            :func:`fcr_sample.start_sampling_run` before each run, or use :func:`fcr_sample.denoise`).
        config: a :class:`DeepCacheConfig`; defaults to interval 5, branch 0, uniform.

    Returns:
        The hook on the UNet (its ``stats`` count full and partial forwards).

    Raises:
        ValueError: a cache is already applied, or the branch lies deeper than the UNet.

    Example:
        >>> apply_deep_cache(pipe, DeepCacheConfig(cache_interval=5, cache_branch_id=0))
        >>> images = pipe(prompts, num_inference_steps=50).images
    """
    config = config or DeepCacheConfig()
    return register_cache_hook(pipe_or_unet, lambda unet, pipe: DeepCacheHook(config, unet, pipe))


def remove_deep_cache(pipe_or_unet) -> None:
    """Remove DeepCache (the UNet hook and every layer hook), restoring the exact original UNet."""
    if not remove_cache_hook(pipe_or_unet, HOOK_NAME):
        logger.warning("remove_deep_cache: no DeepCache hook was applied")
