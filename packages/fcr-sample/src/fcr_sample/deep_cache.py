"""A DeepCache-style comparator, on the same terms as the encoder cache.

DeepCache (Ma et al., 2023, https://arxiv.org/abs/2312.00858) caches a *deep* decoder feature —
the hidden state entering a shallow up block — at full steps, and at the steps in between reruns
only the shallow path: ``conv_in``, the first down blocks and the last up blocks. It is the
strongest training-free peer of encoder caching. This implementation works at block granularity:
``cache_branch_id = b`` keeps down blocks ``0..b`` and up blocks ``n-1-b..n-1`` live.
At ``b = 0`` on SD v1.5 the live path is conv_in, the first down block and the last up block.

    apply_deep_cache(pipe, DeepCacheConfig(cache_interval=5, cache_branch_id=0))
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .hooks import (
    CacheHook,
    bind_unet_args,
    conditioning_kwargs,
    encode_call,
    register_cache_hook,
    remove_cache_hook,
    unet_output,
)
from .schedules import key_steps
from .unet_parts import (
    prepare_conditioning,
    residuals_consumed,
    run_down_blocks,
    run_up_blocks,
)

logger = logging.getLogger(__name__)

__all__ = ["DeepCacheConfig", "apply_deep_cache", "remove_deep_cache"]

HOOK_NAME = "fcr_deep_cache"


@dataclass(frozen=True)
class DeepCacheConfig:
    """DeepCache settings.

    Attributes:
        cache_interval: N; steps 0, N, 2N, ... run the full UNet.
        cache_branch_id: b; the shallow path kept live at cached steps (0 = shallowest).
        always_key_first: also run the first n steps in full.
    """

    cache_interval: int = 5
    cache_branch_id: int = 0
    always_key_first: int = 0

    def __post_init__(self):
        if int(self.cache_interval) != self.cache_interval or self.cache_interval < 1:
            raise ValueError(f"cache_interval must be an integer >= 1, got {self.cache_interval!r}")
        if self.cache_branch_id < 0:
            raise ValueError(f"cache_branch_id must be >= 0, got {self.cache_branch_id}")
        if self.always_key_first < 0:
            raise ValueError(f"always_key_first must be >= 0, got {self.always_key_first}")

    @property
    def label(self) -> str:
        return f"DeepCache-N{self.cache_interval}-b{self.cache_branch_id}"


class DeepCacheHook(CacheHook):
    hook_name = HOOK_NAME

    def __init__(self, config: DeepCacheConfig, unet, pipeline=None):
        super().__init__(pipeline)
        n_up = len(unet.up_blocks)
        if config.cache_branch_id >= min(n_up, len(unet.down_blocks)):
            raise ValueError(
                f"cache_branch_id must be < {min(n_up, len(unet.down_blocks))} for this UNet "
                f"({len(unet.down_blocks)} down / {n_up} up blocks), got {config.cache_branch_id}"
            )
        self.config = config
        self.cut = n_up - 1 - config.cache_branch_id  # first live up block
        self.n_res = residuals_consumed(unet, self.cut)

    def on_new_run(self, run) -> None:
        run.state["keys"] = set(
            key_steps(
                run.num_steps,
                stride=self.config.cache_interval,
                always_key_first=self.config.always_key_first,
            )
        )
        run.state["deep"] = None

    def new_forward(self, module, *args, **kwargs):
        a = bind_unet_args(module, args, kwargs)
        run, step = self.begin_call(a["timestep"])
        st = run.state
        sample = a["sample"]
        cond = prepare_conditioning(
            module,
            sample,
            a["timestep"],
            a["encoder_hidden_states"],
            **conditioning_kwargs(a),
        )
        shape = tuple(sample.shape[-2:])
        if step in st["keys"] or st["deep"] is None or st["deep"].shape[0] != sample.shape[0]:
            enc = encode_call(module, a, cond)
            res = enc.down_block_res_samples
            st["deep"] = run_up_blocks(module, enc.mid, res, cond, shape, stop_block=self.cut)
            out = run_up_blocks(
                module, st["deep"], res[: self.n_res], cond, shape, start_block=self.cut
            )
            self.stats.full_forwards += 1
            self.stats.encoder_forwards += 1
            self.stats.decoder_forwards += 1
            self.stats.decoder_batches += 1
            self.stats.decoder_rows += out.shape[0]
        else:
            _, res = run_down_blocks(
                module, sample, cond, num_blocks=self.config.cache_branch_id + 1
            )
            out = run_up_blocks(
                module, st["deep"], res[: self.n_res], cond, shape, start_block=self.cut
            )
            self.stats.partial_forwards += 1
        return unet_output(out, a["return_dict"])


def apply_deep_cache(pipe_or_unet, config: DeepCacheConfig | None = None) -> DeepCacheHook:
    """Make ``pipe_or_unet`` sample with DeepCache-style feature reuse.

    Same contract as :func:`fcr_sample.apply_encoder_cache`: a pipeline is tracked automatically,
    a bare UNet needs :func:`fcr_sample.start_sampling_run` before each run.

    Example:
        >>> apply_deep_cache(pipe, DeepCacheConfig(cache_interval=5))
        >>> images = pipe(prompts, num_inference_steps=50).images
    """
    config = config or DeepCacheConfig()
    return register_cache_hook(pipe_or_unet, lambda unet, pipe: DeepCacheHook(config, unet, pipe))


def remove_deep_cache(pipe_or_unet) -> None:
    """Remove the DeepCache hook, restoring the exact original behaviour."""
    if not remove_cache_hook(pipe_or_unet, HOOK_NAME):
        logger.warning("remove_deep_cache: no DeepCache hook was applied")
