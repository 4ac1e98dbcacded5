"""Encoder propagation (Faster Diffusion) as a removable hook on a diffusers UNet.

Faster Diffusion (Li et al., 2023, https://arxiv.org/abs/2312.09608) runs the UNet encoder only
at *key* steps and reuses its features at the steps in between, where only the decoder runs.
Because a non-key step's decoder sees only the cached features, the text states and that
step's time embedding — never that step's latent — the decoders of a whole group can run as one
batch at the key step (*parallel decoding*); the following UNet calls just return those
predictions. All of this lives in one hook on the UNet, so an unmodified ``pipe(...)`` call
samples with it::

    from fcr_sample import EncoderCacheConfig, apply_encoder_cache, remove_encoder_cache

    apply_encoder_cache(pipe, EncoderCacheConfig(stride=10))
    image = pipe("a photo of a cat", num_inference_steps=50).images[0]
    remove_encoder_cache(pipe)  # back to the exact original behaviour
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .cache_configs import EncoderCacheConfig  # torch-free; re-exported
from .controlnet import attach_controlnet_skip, detach_controlnet_skip
from .hooks import (
    CacheHook,
    bind_unet_args,
    conditioning_kwargs,
    encode_call,
    register_cache_hook,
    remove_cache_hook,
    resolve_target,
    unet_output,
)
from .prior_noise import inject_prior_noise, prior_noise_callback
from .run_state import HookState
from .schedules import decoder_groups
from .unet_parts import (
    EncoderOutput,
    expand_for_steps,
    prepare_conditioning,
    run_decoder,
)

logger = logging.getLogger(__name__)

__all__ = [
    "EncoderCacheConfig",
    "apply_encoder_cache",
    "remove_encoder_cache",
    "PARALLEL_BYTES_AUTO",
    "decoder_activation_bytes",
    "parallel_steps_cap",
]

HOOK_NAME = "fcr_encoder_cache"


@dataclass
class EncoderCacheState(HookState):
    """What the encoder cache keeps during one sampling run (reset at the start of each)."""

    keys: frozenset[int] = frozenset()  # key-step indices of this run
    batch_of: dict[int, list[int]] = field(default_factory=dict)  # step -> its decoder batch
    enc: EncoderOutput | None = None  # the cached encoder output
    enc_batch: int = 0  # batch size the cache was computed for
    enc_ehs: torch.Tensor | None = None  # text states the cache was computed with
    pending: dict[int, torch.Tensor] = field(default_factory=dict)  # decoded, not yet returned
    initial_latents: torch.Tensor | None = None  # z_T seen by the UNet (pipeline prior noise)
    steps_ended: int = 0  # steps whose prior-noise step callback has run


class EncoderCacheHook(CacheHook):
    """The hook registered on the UNet by :func:`apply_encoder_cache`."""

    hook_name = HOOK_NAME
    state_cls = EncoderCacheState

    def __init__(self, config: EncoderCacheConfig, pipeline=None):
        super().__init__(pipeline)
        self.config = config

    # -- run bookkeeping -------------------------------------------------------------------
    def check_run(self, num_steps: int, num_schedule_steps: int) -> None:
        self.config.key_steps_for_run(num_steps, num_schedule_steps)

    def on_new_run(self, run) -> None:
        self.state.keys = frozenset(self.config.key_steps_for_run(run.num_steps, run.num_schedule_steps))
        # batch_of is planned at the run's first call, once the batch and feature sizes are known

    def _plan_batches(self, run, enc: EncoderOutput) -> None:
        cap = parallel_steps_cap(self.config, enc)
        batches = decoder_groups(sorted(self.state.keys), run.num_steps, cap)
        self.state.batch_of = {s: b for b in batches for s in b}

    def will_encode(self) -> bool:
        """Whether the next UNet call runs the encoder (a key step, a new run or no cache yet).

        Components that feed only the encoder (a ControlNet) ask this to run only when needed.
        """
        step = self.tracker.next_step()
        return step is None or self.state.enc is None or step in self.state.keys

    # -- prior noise injection: through step callbacks, never by patching the scheduler -----
    def loop_callback(self, scheduler):
        """For :func:`fcr_sample.denoise`: the prior-noise callback when ``prior_noise_alpha > 0``."""
        if self.config.prior_noise_alpha == 0:
            return None
        inject = prior_noise_callback(
            self.config.prior_noise_alpha,
            self.config.prior_noise_tau,
            num_train_timesteps=scheduler.config.num_train_timesteps,
        )

        def callback(info):
            self.state.steps_ended = info["i"] + 1
            return inject(info)

        return callback

    def prior_noise_step_end(self, pipe, i: int, t, callback_kwargs: dict) -> dict:
        """Prior noise injection as a diffusers ``callback_on_step_end``.

        Pass it to the pipeline call when ``prior_noise_alpha > 0``::

            hook = apply_encoder_cache(pipe, EncoderCacheConfig(stride=10, prior_noise_alpha=0.003))
            pipe(prompt, callback_on_step_end=hook.prior_noise_step_end)

        ``z_T`` is the run's first UNet input, un-scaled with the scheduler's
        ``scale_model_input`` (a scalar per step in diffusers' schedulers).
        """
        run, st = self.tracker.run, self.state
        if run is None or st.initial_latents is None:
            raise RuntimeError(
                "prior_noise_step_end runs inside a pipeline call on a pipeline the encoder cache "
                "was applied to (apply_encoder_cache(pipe, ...)), after the UNet's first call"
            )
        st.steps_ended = i + 1
        if i + 1 >= run.num_steps:
            return callback_kwargs
        latents = callback_kwargs["latents"]
        z_T = st.initial_latents[: latents.shape[0]]
        callback_kwargs["latents"] = inject_prior_noise(
            latents,
            z_T,
            run.timesteps[i + 1],
            alpha=self.config.prior_noise_alpha,
            tau=self.config.prior_noise_tau,
            num_train_timesteps=pipe.scheduler.config.num_train_timesteps,
        )
        return callback_kwargs

    def _track_prior_noise(self, step: int, sample: torch.Tensor, timestep) -> None:
        st = self.state
        if step == 0:
            sched = self.tracker.scheduler
            if sched is not None:  # pipeline: undo the model-input scaling to get z_T
                scale = sched.scale_model_input(torch.ones_like(sample[:1]), timestep)
                st.initial_latents = (sample / scale).detach()
        elif st.steps_ended < step:
            where = (
                "pass callback_on_step_end=hook.prior_noise_step_end to the pipeline call (hook = "
                "the return value of apply_encoder_cache)"
                if self.tracker.scheduler is not None
                else "sample with fcr_sample.denoise (it runs the injection), or run "
                "hook.loop_callback(scheduler) after every scheduler step of your loop"
            )
            raise RuntimeError(
                f"EncoderCacheConfig(prior_noise_alpha={self.config.prior_noise_alpha}) needs a step "
                f"callback to change the latents between steps, and none ran after step {step - 1}: "
                f"{where}; or set prior_noise_alpha=0"
            )

    # -- the forward ---------------------------------------------------------------------------
    def wants_key_step(self, unet, a: dict, step: int) -> bool:
        """Whether ``step`` is one of the schedule's key steps (the adaptive cache decides here)."""
        return step in self.state.keys

    def new_forward(self, module, *args, **kwargs):
        a = bind_unet_args(module, args, kwargs)
        run, step = self.begin_call(a["timestep"])
        st = self.state
        sample, ehs = a["sample"], a["encoder_hidden_states"]
        if self.config.prior_noise_alpha > 0:
            self._track_prior_noise(step, sample, a["timestep"])
        cond_kwargs = conditioning_kwargs(a)
        is_key = self.wants_key_step(module, a, step)
        cond = None
        if is_key or st.enc is None:
            cond = prepare_conditioning(module, sample, a["timestep"], ehs, **cond_kwargs)
            st.enc = encode_call(module, a, cond)
            st.enc_batch = sample.shape[0]
            st.enc_ehs = ehs
            st.pending.clear()
            if not st.batch_of:
                self._plan_batches(run, st.enc)
            self.stats.encoder_forwards += 1
            self.stats.full_forwards += 1
        elif sample.shape[0] != st.enc_batch:
            raise RuntimeError(
                f"batch size changed inside a sampling run ({st.enc_batch} -> {sample.shape[0]}); "
                "encoder features cannot be reused"
            )

        enc: EncoderOutput = st.enc
        if step in st.pending:
            if _same_tensor(ehs, st.enc_ehs):
                out = st.pending.pop(step)
                return unet_output(out, a["return_dict"])
            st.pending.clear()  # conditioning changed mid-group: compute this step on its own

        batch = st.batch_of[step]
        if (
            self.config.parallel_decoding
            and batch[0] == step
            and len(batch) > 1
            and _same_tensor(ehs, st.enc_ehs)
        ):
            outs = self._decode_batch(module, run, batch, enc, sample, ehs, cond_kwargs)
            st.pending.update(outs)
            out = st.pending.pop(step)
        else:
            if cond is None:
                cond = prepare_conditioning(module, sample, a["timestep"], ehs, **cond_kwargs)
            out = run_decoder(module, enc, cond)
            self.stats.decoder_forwards += 1
            self.stats.decoder_batches += 1
            self.stats.decoder_rows += out.shape[0]
        return unet_output(out, a["return_dict"])

    def _decode_batch(
        self, unet, run, batch, enc, sample, ehs, cond_kwargs
    ) -> dict[int, torch.Tensor]:
        m, B = len(batch), sample.shape[0]
        ts = run.timesteps[batch].to(sample.device)
        t_rows = ts.repeat_interleave(B)  # rows [s*B:(s+1)*B] belong to batch[s]
        probe = sample.new_empty((m * B, 1, 1, 1))  # conditioning reads only batch, dtype, device
        tiled = {
            k: expand_for_steps(v, m) if torch.is_tensor(v) else v for k, v in cond_kwargs.items()
        }
        if isinstance(tiled.get("added_cond_kwargs"), dict):
            tiled["added_cond_kwargs"] = {
                k: expand_for_steps(v, m) if torch.is_tensor(v) else v
                for k, v in tiled["added_cond_kwargs"].items()
            }
        cond = prepare_conditioning(unet, probe, t_rows, expand_for_steps(ehs, m), **tiled)
        out = run_decoder(unet, enc.repeat(m), cond)
        self.stats.decoder_forwards += m
        self.stats.decoder_batches += 1
        self.stats.decoder_rows += out.shape[0]
        return dict(zip(batch, out.chunk(m), strict=False))


#: The ``max_parallel_bytes="auto"`` budget by device type (bytes of the decoder's largest
#: activation for one batch). CPU: 16 MiB. A batch beyond a few tens of MiB per activation ran
#: slower per step than step-by-step decoding on one CPU thread (embedded base, batch 60 with CFG:
#: 18 MiB per step; batching 10 steps took 18.6 s against 9.7 s sequential), while a batch of
#: small images gains from batching (benchmarks/parallel_decoding.py, docs/benchmarks.md).
#: Accelerators: 4 GiB, where batching is what makes parallel decoding pay (Faster Diffusion's
#: wall-clock gain) and memory, not cache size, is the limit.
PARALLEL_BYTES_AUTO: dict[str, int] = {"cpu": 16 * 2**20, "default": 4 * 2**30}


def decoder_activation_bytes(enc: EncoderOutput) -> int:
    """Bytes of the decoder's largest activation for one step of ``enc``'s batch.

    Estimated as twice the largest encoder feature (an up block concatenates a skip feature with
    its hidden state at that resolution), for the whole batch.
    """
    feats = (*enc.down_block_res_samples, enc.mid)
    return 2 * max(t.numel() * t.element_size() for t in feats)


def parallel_steps_cap(config: EncoderCacheConfig, enc: EncoderOutput) -> int | None:
    """How many steps' decoders one parallel batch may hold for ``enc``'s batch and device.

    The smaller of ``config.max_parallel_steps`` and what ``config.max_parallel_bytes`` allows
    (at least 1: a step always decodes); ``None`` when neither caps.

    Example:
        >>> parallel_steps_cap(EncoderCacheConfig(max_parallel_bytes=2**20), enc)  # 300 KiB/step
        3
    """
    budget = config.max_parallel_bytes
    if budget == "auto":
        device = enc.mid.device.type
        budget = PARALLEL_BYTES_AUTO.get(device, PARALLEL_BYTES_AUTO["default"])
    by_size = None if budget is None else max(1, budget // decoder_activation_bytes(enc))
    caps = [c for c in (config.max_parallel_steps, by_size) if c is not None]
    return min(caps) if caps else None


def _same_tensor(a, b) -> bool:
    if a is b:
        return True
    if a is None or b is None:
        return False
    return a.shape == b.shape and (a.data_ptr() == b.data_ptr() or bool(torch.equal(a, b)))


def apply_encoder_cache(pipe_or_unet, config: EncoderCacheConfig | None = None) -> EncoderCacheHook:
    """Make ``pipe_or_unet`` sample with encoder propagation (Faster Diffusion).

    Args:
        pipe_or_unet: a diffusers pipeline with a ``.unet`` (recommended: sampling runs are then
            detected automatically, and a pipeline's ControlNet / Multi-ControlNet then runs only
            at key steps, see :mod:`fcr_sample.controlnet`) or a bare ``UNet2DConditionModel`` (then call
            :func:`fcr_sample.start_sampling_run` before each run).
        config: an :class:`EncoderCacheConfig`; defaults to FD-10 with parallel decoding.

    Returns:
        The registered hook (its ``stats`` hold the forward counters).

    Raises:
        ValueError: a cache is already applied.

    Example:
        >>> apply_encoder_cache(pipe, EncoderCacheConfig(stride=10))
        >>> images = pipe(prompts, num_inference_steps=50).images
    """
    config = config or EncoderCacheConfig()
    hook = register_cache_hook(pipe_or_unet, lambda unet, pipe: EncoderCacheHook(config, pipe))
    attach_controlnet_skip(hook.tracker.pipeline, hook)
    return hook


def remove_encoder_cache(pipe_or_unet) -> None:
    """Remove the encoder cache (and its ControlNet hook); the pipeline behaves exactly as before."""
    _, pipe = resolve_target(pipe_or_unet)
    detach_controlnet_skip(pipe)
    if not remove_cache_hook(pipe_or_unet, HOOK_NAME):
        logger.warning("remove_encoder_cache: no encoder cache was applied")
