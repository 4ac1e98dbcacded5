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
from dataclasses import dataclass

import torch

from .hooks import (
    CacheHook,
    bind_unet_args,
    conditioning_kwargs,
    encode_call,
    register_cache_hook,
    remove_cache_hook,
    unet_output,
)
from .schedules import NAMED_SCHEDULES, decoder_groups, key_steps
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
    "inject_prior_noise",
]

HOOK_NAME = "fcr_encoder_cache"


@dataclass(frozen=True)
class EncoderCacheConfig:
    """How encoder features are reused.

    Attributes:
        stride: uniform key-step stride k ("FD-k"): steps 0, k, 2k, ... are key. Ignored when
            ``key_steps`` or ``schedule="faster-diffusion"`` is given.
        key_steps: explicit key-step indices; must start at 0.
        schedule: ``"uniform"`` (use ``stride``) or ``"faster-diffusion"`` (the published
            non-uniform lists for 50 and 20 steps).
        always_key_first: make the first n steps key as well.
        parallel_decoding: run a group's decoders as one batch at its first step.
        max_parallel_steps: at most this many steps' decoders in one batch (memory; ``None`` for
            no cap). A longer group continues in further batches.
        prior_noise_alpha: Faster Diffusion's prior noise injection ``z_t += α·z_T`` for steps
            with ``t / T < prior_noise_tau``; 0 disables it (FD uses 0.003). Needs a pipeline.
        prior_noise_tau: threshold on ``t / num_train_timesteps`` (FD: 0.5).

    Example:
        >>> EncoderCacheConfig(stride=10)
        >>> EncoderCacheConfig(schedule="faster-diffusion", prior_noise_alpha=0.003)
    """

    stride: int | None = 10
    key_steps: tuple[int, ...] | None = None
    schedule: str = "uniform"
    always_key_first: int = 0
    parallel_decoding: bool = True
    max_parallel_steps: int | None = 10
    prior_noise_alpha: float = 0.0
    prior_noise_tau: float = 0.5

    def __post_init__(self):
        if self.schedule not in NAMED_SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; allowed are {NAMED_SCHEDULES}")
        if self.key_steps is not None:
            object.__setattr__(self, "key_steps", tuple(int(s) for s in self.key_steps))
            if not self.key_steps or min(self.key_steps) != 0:
                raise ValueError(f"key_steps must include step 0, got {list(self.key_steps)}")
            if min(self.key_steps) < 0:
                raise ValueError("key_steps must be >= 0")
        elif self.schedule == "uniform":
            if self.stride is None or int(self.stride) != self.stride or self.stride < 1:
                raise ValueError(f"stride must be an integer >= 1, got {self.stride!r}")
        if self.always_key_first < 0:
            raise ValueError(f"always_key_first must be >= 0, got {self.always_key_first}")
        if self.max_parallel_steps is not None and self.max_parallel_steps < 1:
            raise ValueError(
                f"max_parallel_steps must be >= 1 or None, got {self.max_parallel_steps}"
            )
        if self.prior_noise_alpha < 0:
            raise ValueError(f"prior_noise_alpha must be >= 0, got {self.prior_noise_alpha}")
        if not 0.0 <= self.prior_noise_tau <= 1.0:
            raise ValueError(
                f"prior_noise_tau is a fraction of the training timesteps in [0, 1], got {self.prior_noise_tau}"
            )

    def key_steps_for(self, num_steps: int) -> list[int]:
        """Key-step indices for a run of ``num_steps`` UNet calls."""
        return key_steps(
            num_steps,
            stride=self.stride,
            steps=self.key_steps,
            schedule=self.schedule,
            always_key_first=self.always_key_first,
        )

    @property
    def label(self) -> str:
        """Short name for tables and plots, e.g. ``FD-10``, ``FD-10-seq``, ``FD-published``."""
        if self.key_steps is not None:
            base = "FD-custom"
        elif self.schedule == "faster-diffusion":
            base = "FD-published"
        else:
            base = f"FD-{self.stride}"
        return base if self.parallel_decoding else base + "-seq"


def inject_prior_noise(
    latents: torch.Tensor,
    initial_latents: torch.Tensor,
    timestep,
    *,
    alpha: float = 0.003,
    tau: float = 0.5,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """Faster Diffusion's prior noise injection for hand-written loops: ``z_t + α·z_T`` if ``t/T < τ``."""
    if float(timestep) / num_train_timesteps < tau:
        return latents + alpha * initial_latents
    return latents


class EncoderCacheHook(CacheHook):
    """The hook registered on the UNet by :func:`apply_encoder_cache`."""

    hook_name = HOOK_NAME

    def __init__(self, config: EncoderCacheConfig, pipeline=None):
        super().__init__(pipeline)
        self.config = config
        self._wrapped_scheduler = None

    # -- run bookkeeping -------------------------------------------------------------------
    def on_new_run(self, run) -> None:
        # Uniform and explicit schedules count UNet calls (PNDM makes one more call than it has
        # steps); the published FD lists are defined per number of inference steps.
        n = (
            run.num_schedule_steps
            if self.config.schedule == "faster-diffusion" and self.config.key_steps is None
            else run.num_steps
        )
        keys = [k for k in self.config.key_steps_for(n) if k < run.num_steps]
        run.state["keys"] = set(keys)
        batches = decoder_groups(keys, run.num_steps, self.config.max_parallel_steps)
        run.state["batch_of"] = {s: b for b in batches for s in b}
        run.state["enc"] = None
        run.state["pending"] = {}
        if self.config.prior_noise_alpha > 0:
            self._attach_scheduler()

    # -- prior noise injection: wraps scheduler.step on the pipeline's scheduler ------------
    def _attach_scheduler(self) -> None:
        sched = self.tracker.scheduler
        if sched is self._wrapped_scheduler:
            return
        self.detach_scheduler()
        original = sched.step
        hook = self

        def step(model_output, timestep, sample, *args, **kwargs):
            run = hook.tracker.run
            if run.scheduler_steps == 0:
                run.initial_latents = sample.detach().clone()
            out = original(model_output, timestep, sample, *args, **kwargs)
            run.scheduler_steps += 1
            nxt = run.scheduler_steps
            if nxt < run.num_steps:
                t_next = float(run.timesteps[nxt])
                T = sched.config.num_train_timesteps
                if t_next / T < hook.config.prior_noise_tau:
                    delta = hook.config.prior_noise_alpha * run.initial_latents
                    if isinstance(out, tuple):
                        out = (out[0] + delta,) + tuple(out[1:])
                    else:
                        out.prev_sample = out.prev_sample + delta
            return out

        sched.step = step  # instance attribute; detach_scheduler deletes it
        self._wrapped_scheduler = sched

    def detach_scheduler(self) -> None:
        sched, self._wrapped_scheduler = self._wrapped_scheduler, None
        if sched is not None and "step" in sched.__dict__:
            del sched.__dict__["step"]

    # -- the forward ---------------------------------------------------------------------------
    def new_forward(self, module, *args, **kwargs):
        a = bind_unet_args(module, args, kwargs)
        run, step = self.begin_call(a["timestep"])
        st = run.state
        sample, ehs = a["sample"], a["encoder_hidden_states"]
        cond_kwargs = conditioning_kwargs(a)
        is_key = step in st["keys"]
        cond = None
        if is_key or st["enc"] is None:
            cond = prepare_conditioning(module, sample, a["timestep"], ehs, **cond_kwargs)
            st["enc"] = encode_call(module, a, cond)
            st["enc_batch"] = sample.shape[0]
            st["enc_ehs"] = ehs
            st["pending"].clear()
            self.stats.encoder_forwards += 1
            self.stats.full_forwards += 1
        elif sample.shape[0] != st["enc_batch"]:
            raise RuntimeError(
                f"batch size changed inside a sampling run ({st['enc_batch']} -> {sample.shape[0]}); "
                "encoder features cannot be reused"
            )

        enc: EncoderOutput = st["enc"]
        if step in st["pending"]:
            if _same_tensor(ehs, st["enc_ehs"]):
                out = st["pending"].pop(step)
                return unet_output(out, a["return_dict"])
            st["pending"].clear()  # conditioning changed mid-group: compute this step on its own

        batch = st["batch_of"][step]
        if (
            self.config.parallel_decoding
            and batch[0] == step
            and len(batch) > 1
            and _same_tensor(ehs, st["enc_ehs"])
        ):
            outs = self._decode_batch(module, run, batch, enc, sample, ehs, cond_kwargs)
            st["pending"].update(outs)
            out = st["pending"].pop(step)
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
            detected automatically) or a bare ``UNet2DConditionModel`` (then call
            :func:`fcr_sample.start_sampling_run` before each run).
        config: an :class:`EncoderCacheConfig`; defaults to FD-10 with parallel decoding.

    Returns:
        The registered hook (its ``stats`` hold the forward counters).

    Raises:
        ValueError: a cache is already applied, or prior noise injection was asked for on a
            bare UNet (it changes the latents between steps, which only the pipeline holds).

    Example:
        >>> apply_encoder_cache(pipe, EncoderCacheConfig(stride=10))
        >>> images = pipe(prompts, num_inference_steps=50).images
    """
    config = config or EncoderCacheConfig()

    def factory(unet, pipe):
        if pipe is None and config.prior_noise_alpha > 0:
            raise ValueError(
                "prior noise injection changes the latents between steps, so it needs the pipeline: "
                "apply the cache to the pipeline, or call fcr_sample.inject_prior_noise in your loop "
                "and leave prior_noise_alpha=0"
            )
        return EncoderCacheHook(config, pipe)

    return register_cache_hook(pipe_or_unet, factory)


def remove_encoder_cache(pipe_or_unet) -> None:
    """Remove the encoder cache; the UNet (and scheduler) behave exactly as before it was applied."""
    if not remove_cache_hook(pipe_or_unet, HOOK_NAME):
        logger.warning("remove_encoder_cache: no encoder cache was applied")
