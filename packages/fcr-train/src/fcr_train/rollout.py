"""The rollout objective: train the UNet on the segment a cache actually serves.

FCR scores features and output consistency scores one reused step at a time. The mechanism study
(docs/mechanism/README.md) found that neither is what the sampled cache error is made of: it comes
from the predicted x0 of the *first served segment* and from how the errors of *consecutive* stale
steps add up, and both objectives miss it. This objective scores the served segment itself:

    L_total = L_denoise + λ · d(R_stale(x_τi; k), sg[R_fresh(x_τi; k)])

* ``x_τi = q(x0, ε, τ_i)``: a training sample noised to the timestep of sampler step ``i`` (a key
  step of the cache), on the sampler's own grid (DDIM with ``sampler_steps`` steps).
* ``R_fresh(x; k)``: the key step and the ``k`` following sampler steps, every one a full forward
  (the uncached sampler).
* ``R_stale(x; k)``: the same ``k + 1`` steps as the cache serves them: the key step runs in full
  and stores what the cache reuses, steps ``i+1 .. i+k`` reuse it (the cache's own stale path:
  FD's encoder/decoder split, :mod:`fcr_sample.unet_parts`, or DeepCache's layer hooks,
  :func:`fcr_sample.deep_cache.deep_cache_layers`). The key step's output is the same in both and
  is a constant: the term never asks the key step to compensate for what follows it.
* What is compared (``target``): ``"x0"``, the scheduler's predicted x0 at the segment's last step
  (where the sample is heading when the cache refreshes), or ``"state"``, the latent after the
  segment (what the rest of the run continues from).
* ``sg``: the fresh rollout is a constant target (as in output consistency).
* ``d``: one of :data:`fcr_train.loss.DISTANCES` (relative MSE by default: scale-free, a mean over
  the rows).

**Weighted toward high noise.** The key step ``i`` is drawn from ``0 .. n−1−k`` (the segment fits
in the run) with probability ∝ ``(τ_i / T) ** noise_power``: 0 is uniform over the sampler's
steps, larger values put the term where the mechanism study found the error (the first segment,
τ ≈ T). Drawing with these probabilities is the same in expectation as weighting a uniform draw
by them, with less variance for the same number of rollouts.

**Which rows.** The denoising loss uses every row with its own ``t ~ U(0, T−1)`` — exactly the
λ = 0 control's draw, so an arm differs from the control only by the term. The rollout runs on the
first ``rollout_rows`` rows (all by default), with the same ``x0`` and ε.

**Gradients** (``trainable``, as output consistency): ``"recomputed"`` reaches only what the cache
re-runs at a reused step (FD: time embedding, up blocks, head; DeepCache: time embedding and the
shallow path) — the key step's pass runs under ``no_grad``; ``"all"`` also reaches the modules
that computed the stale features at the key step. :func:`trainable_parameter_names` lists them.
Through the segment the gradient flows along the stale trajectory (DeepCache's shallow path reads
each step's latent; FD's decoder never does, so FD's stale steps add up linearly in the state).

**Cost** of a step: the plain step, plus per rollout row one key-step forward (no grad unless
``"all"``), ``k`` fresh forwards (no grad) and ``k`` stale passes with their backward (FD: decoder
only; DeepCache: the shallow path). :func:`rollout_cost_factor` gives it in full-forward units,
``benchmarks/train_step.py`` measures it.

Classifier-free guidance: with ``guidance_scale != 1`` both rollouts run the unconditional and
the conditional branch as one batch (as :func:`fcr_sample.denoise` does) and step with the guided
output; the caller passes the null text states.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from fcr_sample.deep_cache import DeepCacheConfig, deep_cache_layers
from fcr_sample.unet_parts import expand_for_steps, prepare_conditioning, run_decoder, run_encoder

from .loss import DISTANCES, denoise_target, feature_distance
from .output_consistency import cache_trainable_parameter_names
from .vocabulary import OC_CACHES, OC_TRAINABLE, ROLLOUT_DEFAULTS, ROLLOUT_TARGETS, check_choice

logger = logging.getLogger(__name__)

__all__ = [
    "ROLLOUT_TARGETS",
    "RolloutConfig",
    "RolloutLossOutput",
    "RolloutSegment",
    "check_rollout",
    "fresh_rollout",
    "key_step_probabilities",
    "rollout_cost_factor",
    "rollout_loss",
    "sample_key_steps",
    "sampling_scheduler",
    "stale_rollout",
    "trainable_parameter_names",
]


@dataclass(frozen=True)
class RolloutConfig:
    """Options of the rollout term, recorded with every run (``config.json``).

    Attributes:
        lam: weight λ of the term (> 0; a run without the term has no config).
        k: stale steps after the key step (≥ 0; 0 compares two identical key steps: a zero term).
            FD-10 serves 9 per segment, DeepCache-N5 4.
        cache: ``"fd"`` or ``"deepcache"`` (:data:`fcr_train.vocabulary.OC_CACHES`).
        cache_branch_id: DeepCache's cut (``3·block + layer``); only with ``cache="deepcache"``.
        sampler_steps: the DDIM sampler's step count (the experiment's ``num_inference_steps``);
            the key steps and the segment's steps are on its grid.
        target: ``"x0"`` (the predicted x0 at the segment's last step) or ``"state"`` (the latent
            after the segment): :data:`fcr_train.vocabulary.ROLLOUT_TARGETS`.
        distance: one of :data:`fcr_train.loss.DISTANCES` (default ``"relative_mse"``).
        noise_power: key step ``i`` drawn with probability ∝ ``(τ_i / T) ** noise_power``
            (0 = uniform; default 2: toward high noise).
        trainable: ``"recomputed"`` or ``"all"`` (:data:`fcr_train.vocabulary.OC_TRAINABLE`).
        rollout_rows: rows of each micro-batch that run the rollout (``None`` = all).
        guidance_scale: classifier-free guidance of the rollouts (1 = conditional only).
        stride: the cache stride / interval this fine-tune serves (recorded only).

    Example:
        >>> RolloutConfig(lam=0.5, k=4, cache="deepcache").deep_cache_config().cache_branch_id
        0
    """

    lam: float = 0.1
    k: int = ROLLOUT_DEFAULTS["k"]
    cache: str = ROLLOUT_DEFAULTS["cache"]
    cache_branch_id: int = 0
    sampler_steps: int = 20
    target: str = ROLLOUT_DEFAULTS["target"]
    distance: str = "relative_mse"
    noise_power: float = ROLLOUT_DEFAULTS["noise_power"]
    trainable: str = ROLLOUT_DEFAULTS["trainable"]
    rollout_rows: int | None = ROLLOUT_DEFAULTS["rollout_rows"]
    guidance_scale: float = ROLLOUT_DEFAULTS["guidance_scale"]
    stride: int | None = None

    def __post_init__(self):
        name = type(self).__name__
        if not self.lam > 0:
            raise ValueError(f"{name}.lam must be > 0, got {self.lam} (leave rollout unset for a run without the term)")
        if int(self.k) != self.k or self.k < 0:
            raise ValueError(f"{name}.k (stale steps per segment) must be an integer >= 0, got {self.k}")
        if int(self.sampler_steps) != self.sampler_steps or self.sampler_steps < 1:
            raise ValueError(f"{name}.sampler_steps must be an integer >= 1 (the sampler's step count), "
                             f"got {self.sampler_steps}")
        if self.k > self.sampler_steps - 1:
            raise ValueError(f"{name}.k = {self.k} stale steps do not fit after a key step of a "
                             f"{self.sampler_steps}-step run; use k <= {self.sampler_steps - 1}")
        for field, choices in (("cache", OC_CACHES), ("target", ROLLOUT_TARGETS), ("distance", DISTANCES),
                               ("trainable", OC_TRAINABLE)):
            check_choice(name, field, getattr(self, field), choices)
        if not self.noise_power >= 0:
            raise ValueError(f"{name}.noise_power must be >= 0 (0 = uniform over the sampler's steps), "
                             f"got {self.noise_power}")
        if self.rollout_rows is not None and (int(self.rollout_rows) != self.rollout_rows or self.rollout_rows < 1):
            raise ValueError(f"{name}.rollout_rows must be an integer >= 1 or None (every row), got {self.rollout_rows}")
        if not self.guidance_scale > 0:
            raise ValueError(f"{name}.guidance_scale must be > 0 (1 = no guidance), got {self.guidance_scale}")
        if self.stride is not None and int(self.stride) < 1:
            raise ValueError(f"{name}.stride must be >= 1, got {self.stride}")
        if self.cache != "deepcache" and self.cache_branch_id != 0:
            raise ValueError(f"{name}.cache_branch_id is DeepCache's cut; with cache={self.cache!r} leave it at 0")
        self.deep_cache_config()  # DeepCache's own check of the branch id

    def to_dict(self) -> dict:
        return asdict(self)

    def deep_cache_config(self) -> DeepCacheConfig:
        """The :class:`fcr_sample.DeepCacheConfig` whose cut the ``"deepcache"`` variant trains."""
        return DeepCacheConfig(cache_branch_id=self.cache_branch_id)

    def rows(self, batch: int) -> int:
        """Rows of a micro-batch of ``batch`` rows that run the rollout."""
        return batch if self.rollout_rows is None else min(batch, int(self.rollout_rows))


def trainable_parameter_names(unet, config: RolloutConfig) -> list[str]:
    """The parameters (``unet.named_parameters()`` names) the term's gradient may reach: the same
    cut as output consistency's (:func:`fcr_train.output_consistency.cache_trainable_parameter_names`)."""
    return cache_trainable_parameter_names(unet, config.cache, config.trainable, config.deep_cache_config())


def rollout_cost_factor(config: RolloutConfig, batch_size: int, encoder_share: float = 0.3,
                        deepcache_partial_share: float = 0.15) -> float:
    """A fine-tune step's compute with the term, in units of a plain step (forward + backward ≈ 3
    forwards of the batch), for the plan's cost estimate.

    Per rollout row: the key step's forward (1; with ``"all"`` also the backward of the cached
    part), ``k`` fresh forwards and ``k`` stale passes with their backward (3 × the share of a
    forward the cache re-runs: ``1 − encoder_share`` for FD, ``deepcache_partial_share`` for
    DeepCache); guidance doubles every rollout forward. The shares are the model's (the planner's
    ``ModelCost``); the defaults are the embedded UNet's. ``benchmarks/train_step.py`` measures
    the real ratio, which small batches on a CPU make larger (a forward's fixed cost).

    Example:
        >>> round(rollout_cost_factor(RolloutConfig(k=4, rollout_rows=8), 32), 2)
        2.12
    """
    if config.k == 0:  # no segment runs
        return 1.0
    rows = config.rows(batch_size)
    stale_share = (1.0 - encoder_share) if config.cache == "fd" else deepcache_partial_share
    key = 1.0 + (2.0 * (1.0 - stale_share) if config.trainable == "all" else 0.0)
    per_row = key + config.k * (1.0 + 3.0 * stale_share)
    cfg = 2.0 if config.guidance_scale != 1.0 else 1.0
    return 1.0 + cfg * rows * per_row / (3.0 * batch_size)


def check_rollout(unet, scheduler, config: RolloutConfig, *, grad_checkpointing: bool = False) -> None:
    """What ``config`` needs of the UNet and the training scheduler, checked before a run starts.

    Raises:
        ValueError: the training scheduler's prediction type or step count cannot make the
            sampler's grid, the DeepCache branch lies deeper than the UNet, or DeepCache is
            combined with gradient checkpointing.
    """
    T = int(scheduler.config.num_train_timesteps)
    if config.sampler_steps > T:
        raise ValueError(f"rollout: sampler_steps = {config.sampler_steps} exceeds the scheduler's "
                         f"num_train_timesteps = {T}")
    if scheduler.config.prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"rollout: unsupported prediction_type {scheduler.config.prediction_type!r}")
    if config.cache == "deepcache":
        from fcr_sample.deep_cache import cached_module_names

        cached_module_names(unet, config.deep_cache_config())
        if grad_checkpointing:
            # as output consistency: checkpointed resnets recompute after the reuse hooks are gone
            raise ValueError("the rollout term with cache='deepcache' does not support gradient "
                             "checkpointing; turn grad_checkpointing off or use cache='fd'")


def sampling_scheduler(scheduler, config: RolloutConfig):
    """The DDIM sampler (η = 0) on the training scheduler's noise schedule, its timesteps set to
    ``config.sampler_steps``: the grid the experiments sample on.

    ``set_alpha_to_one=False`` as the embedded default's and Stable Diffusion's DDIM configs
    (it only decides the last step's α).
    """
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler.config, set_alpha_to_one=False)
    ddim.set_timesteps(int(config.sampler_steps))
    return ddim


def key_step_probabilities(timesteps: torch.Tensor, num_train_timesteps: int, config: RolloutConfig) -> torch.Tensor:
    """Probability of each sampler step ``i`` being the key step: ∝ ``(τ_i / T) ** noise_power`` on
    ``0 .. n−1−k`` (zero beyond, where the segment would leave the run).

    Example:
        >>> p = key_step_probabilities(torch.tensor([900, 600, 300, 0]), 1000, RolloutConfig(k=1))
        >>> [round(v, 3) for v in p.tolist()]
        [0.6, 0.3, 0.1, 0.0]
    """
    n = len(timesteps)
    last = n - 1 - int(config.k)
    if last < 0:
        raise ValueError(f"k = {config.k} stale steps do not fit in a {n}-step run")
    w = (timesteps.double().clamp(min=0) / float(num_train_timesteps)).pow(float(config.noise_power))
    w[last + 1:] = 0.0
    if not bool((w > 0).any()):  # noise_power > 0 and only τ = 0 left: uniform over what fits
        w[: last + 1] = 1.0
    return (w / w.sum()).float()


def sample_key_steps(rows: int, timesteps: torch.Tensor, num_train_timesteps: int, config: RolloutConfig, *,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Key-step indices (into ``timesteps``) for ``rows`` rollouts, drawn from
    :func:`key_step_probabilities`."""
    p = key_step_probabilities(timesteps.cpu(), num_train_timesteps, config)
    return torch.multinomial(p, rows, replacement=True, generator=generator)


@dataclass
class RolloutSegment:
    """One segment's end: ``state`` (the latent after its last step) and ``x0`` (the predicted x0
    at its last step); ``eps`` holds each step's (guided) output, first step first; ``after_key``
    the state after the first (key) step."""

    state: torch.Tensor
    x0: torch.Tensor
    eps: list[torch.Tensor]
    after_key: torch.Tensor | None = None

    def target(self, kind: str) -> torch.Tensor:
        return self.x0 if kind == "x0" else self.state


def _ddim_step(sampler, eps: torch.Tensor, index: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sampler.step`` for rows at different steps: rows are grouped by step index and each
    group is stepped with the scheduler's own update (DDIM keeps no state between steps)."""
    if bool((index == index[0]).all()):
        out = sampler.step(eps, sampler.timesteps[int(index[0])], x)
        return out.prev_sample, out.pred_original_sample
    prev, x0 = [None] * len(index), [None] * len(index)
    for i in index.unique().tolist():
        rows = (index == i).nonzero().flatten()
        out = sampler.step(eps[rows], sampler.timesteps[i], x[rows])
        for j, r in enumerate(rows.tolist()):
            prev[r], x0[r] = out.prev_sample[j], out.pred_original_sample[j]
    return torch.stack(prev), torch.stack(x0)


class _Guidance:
    """Classifier-free guidance as :func:`fcr_sample.denoise` runs it: one 2B batch,
    unconditional first."""

    def __init__(self, scale: float, text: torch.Tensor, null: torch.Tensor | None):
        if scale != 1.0 and null is None:
            raise ValueError("rollout with guidance_scale != 1 needs the unconditional text states `null_states`")
        self.scale = scale
        self.states = text if scale == 1.0 else torch.cat([null.expand_as(text).to(text), text])

    def inputs(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.scale == 1.0:
            return x, t
        return torch.cat([x, x]), torch.cat([t, t])

    def combine(self, out: torch.Tensor) -> torch.Tensor:
        if self.scale == 1.0:
            return out
        u, c = out.chunk(2)
        return u + self.scale * (c - u)


def _timesteps_at(sampler, index: torch.Tensor, device) -> torch.Tensor:
    return sampler.timesteps[index.cpu()].to(device)


def fresh_rollout(unet, sampler, x: torch.Tensor, start_index: torch.Tensor, text: torch.Tensor, steps: int, *,
                  guidance_scale: float = 1.0, null_states: torch.Tensor | None = None) -> RolloutSegment:
    """``steps`` steps of the uncached sampler from ``x``, row ``r`` starting at step
    ``start_index[r]``, every one a full ``unet(...)`` forward.

    Args:
        sampler: a DDIM scheduler with its timesteps set (:func:`sampling_scheduler`).
        x: the rows' states at their first steps.
        start_index: per row, the first step's index into ``sampler.timesteps``.
        steps: how many steps (≥ 1).
        text / null_states / guidance_scale: conditioning, as :func:`fcr_sample.denoise`.

    Example:
        >>> seg = fresh_rollout(unet, sampling_scheduler(ddpm, cfg), x_key, key, text, cfg.k + 1)
    """
    if steps < 1:
        raise ValueError(f"fresh_rollout: steps must be >= 1, got {steps}")
    g = _Guidance(guidance_scale, text, null_states)
    eps_all = []
    x0 = None
    for j in range(steps):
        index = start_index + j
        inp, t = g.inputs(x, _timesteps_at(sampler, index, x.device))
        eps = g.combine(unet(inp, t, g.states).sample)
        x, x0 = _ddim_step(sampler, eps, index, x)
        eps_all.append(eps)
    return RolloutSegment(x, x0, eps_all)


def stale_rollout(unet, sampler, x: torch.Tensor, key_index: torch.Tensor, text: torch.Tensor, config: RolloutConfig,
                  *, null_states: torch.Tensor | None = None) -> RolloutSegment:
    """Steps ``key_index .. key_index + k`` as ``config.cache`` serves them from ``x``: the key step
    in full, storing what the cache reuses; the next ``k`` steps reuse it.

    FD: the encoder (``conv_in``, down blocks, mid block) runs at the key step only and every step's
    decoder reads its features with the step's own time embedding (:func:`fcr_sample.unet_parts.run_encoder`
    / ``run_decoder``, the split :func:`fcr_sample.apply_encoder_cache` runs, with its default
    parallel decoding: the segment's decoders as one batch). DeepCache: the cache's
    own layer hooks (:func:`fcr_sample.deep_cache.deep_cache_layers`) store at the key step and
    return the stored outputs at the others, where only the shallow path runs.

    The key step's output is detached (the fresh rollout shares it: :attr:`RolloutSegment.after_key`);
    the cached features carry gradient only with ``trainable="all"``.

    Example:
        >>> seg = stale_rollout(unet, sampling_scheduler(ddpm, cfg), x_key, key, text, cfg)
        >>> fresh = fresh_rollout(unet, sampler, seg.after_key, key + 1, text, cfg.k)
    """
    g = _Guidance(config.guidance_scale, text, null_states)
    grad_cached = torch.is_grad_enabled() and config.trainable == "all"
    t_key = _timesteps_at(sampler, key_index, x.device)
    if config.cache == "fd":
        return _stale_fd(unet, sampler, x, key_index, t_key, g, config.k, grad_cached)
    return _stale_deepcache(unet, sampler, x, key_index, t_key, g, config, grad_cached)


def _stale_fd(unet, sampler, x, key_index, t_key, g: _Guidance, k: int, grad_cached: bool) -> RolloutSegment:
    """FD's segment with parallel decoding, as :func:`fcr_sample.apply_encoder_cache` serves it by
    default: a served step's decoder reads only the key step's features and its own time embedding,
    never its latent, so the decoders of the key step and the ``k`` steps after it run as one batch
    (step-major, the hook's layout); the sampler then steps through their outputs in order."""
    inp, t = g.inputs(x, t_key)
    with torch.set_grad_enabled(grad_cached):
        enc = run_encoder(unet, inp, prepare_conditioning(unet, inp, t, g.states))
    steps = k + 1
    t_rows = torch.cat([g.inputs(x, _timesteps_at(sampler, key_index + j, x.device))[1] for j in range(steps)])
    probe = inp.new_empty((steps * inp.shape[0], 1, 1, 1))  # conditioning reads only batch, dtype, device
    cond = prepare_conditioning(unet, probe, t_rows, expand_for_steps(g.states, steps))
    outs = run_decoder(unet, enc.repeat(steps), cond).chunk(steps)
    eps_all = [g.combine(out) for out in outs]
    eps_all[0] = eps_all[0].detach()  # the key step's output: the same in the fresh rollout
    x, x0 = _ddim_step(sampler, eps_all[0], key_index, x)
    after_key = x
    for j in range(1, steps):
        x, x0 = _ddim_step(sampler, eps_all[j], key_index + j, x)
    return RolloutSegment(x, x0, eps_all, after_key)


def _stale_deepcache(unet, sampler, x, key_index, t_key, g: _Guidance, config: RolloutConfig,
                     grad_cached: bool) -> RolloutSegment:
    with deep_cache_layers(unet, config.deep_cache_config()) as st:
        st.refreshing = True
        inp, t = g.inputs(x, t_key)
        with torch.set_grad_enabled(grad_cached):
            eps = g.combine(unet(inp, t, g.states).sample).detach()
        st.refreshing = False
        x, x0 = _ddim_step(sampler, eps, key_index, x)
        eps_all, after_key = [eps], x
        st.reusing = True
        for j in range(1, config.k + 1):
            index = key_index + j
            inp, t = g.inputs(x, _timesteps_at(sampler, index, x.device))
            eps = g.combine(unet(inp, t, g.states).sample)
            x, x0 = _ddim_step(sampler, eps, index, x)
            eps_all.append(eps)
    return RolloutSegment(x, x0, eps_all, after_key)


@dataclass
class RolloutLossOutput:
    """``loss = denoise + lam * rollout``; ``fresh`` / ``stale`` are the compared tensors (the
    fresh one detached), ``key_steps`` the key-step indices of the rollout rows."""

    loss: torch.Tensor
    denoise: torch.Tensor
    rollout: torch.Tensor
    timesteps: torch.Tensor
    key_steps: torch.Tensor
    fresh: torch.Tensor | None = None
    stale: torch.Tensor | None = None


def rollout_loss(
    unet,
    scheduler,
    x0: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    config: RolloutConfig,
    *,
    null_states: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
    key_steps: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    sampler=None,
) -> RolloutLossOutput:
    """Denoising loss plus λ · the rollout term for one batch.

    Args:
        unet: a diffusers ``UNet2DConditionModel``.
        scheduler: the training noise scheduler (``add_noise``, ``config.num_train_timesteps``,
            ``config.prediction_type``); the rollout's DDIM sampler is built on its schedule.
        x0: clean latents / pixels ``(B, C, H, W)``.
        encoder_hidden_states: text states ``(B, L, D)``; ``null_states`` the unconditional ones
            (``(1, L, D)`` or ``(B, L, D)``), needed when ``config.guidance_scale != 1``.
        config: :class:`RolloutConfig`.
        noise, timesteps, key_steps: fixed draws (tests, benchmarks): ``timesteps`` the denoising
            loss's ``t`` per row, ``key_steps`` the key-step indices of the rollout rows (into the
            sampler's timesteps). Drawn from ``generator`` if omitted (ε, then t ~ U(0, T−1), then
            the key steps).
        sampler: the DDIM sampler (:func:`sampling_scheduler`); built from ``scheduler`` if omitted.

    Returns:
        :class:`RolloutLossOutput`.

    Example:
        >>> out = rollout_loss(unet, DDPMScheduler(), x0, text, RolloutConfig(lam=0.5, k=4))
        >>> out.loss.backward()
    """
    B = x0.shape[0]
    T = int(scheduler.config.num_train_timesteps)
    sampler = sampler if sampler is not None else sampling_scheduler(scheduler, config)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
    if timesteps is None:
        timesteps = torch.randint(0, T, (B,), generator=generator)
    m = config.rows(B)
    if key_steps is None:
        key_steps = sample_key_steps(m, sampler.timesteps, T, config, generator=generator)
    key_steps = key_steps.cpu().long()
    if key_steps.shape != (m,) or bool((key_steps < 0).any()) or bool((key_steps + config.k >= len(sampler.timesteps)).any()):
        raise ValueError(f"rollout_loss: key_steps must be {m} indices in [0, {len(sampler.timesteps) - 1 - config.k}] "
                         f"(the segment of k = {config.k} stale steps must fit in the run)")
    timesteps = timesteps.to(x0.device)

    x_t = scheduler.add_noise(x0, noise, timesteps)
    pred = unet(x_t, timesteps, encoder_hidden_states).sample
    denoise = F.mse_loss(pred.float(), denoise_target(scheduler, x0, noise, timesteps).float())

    if config.k == 0:  # the key step alone: both rollouts are the same step, the term is 0
        zero = denoise.new_zeros(())
        return RolloutLossOutput(denoise, denoise, zero, timesteps, key_steps)
    text = encoder_hidden_states[:m]
    null = None if null_states is None else (null_states if null_states.shape[0] == 1 else null_states[:m])
    x_key = scheduler.add_noise(x0[:m], noise[:m], _timesteps_at(sampler, key_steps, x0.device))
    stale_seg = stale_rollout(unet, sampler, x_key, key_steps, text, config, null_states=null)
    with torch.no_grad():  # the same steps fresh, from the state after the shared key step
        fresh_seg = fresh_rollout(unet, sampler, stale_seg.after_key, key_steps + 1, text, config.k,
                                  guidance_scale=config.guidance_scale, null_states=null)
    fresh, stale = fresh_seg.target(config.target), stale_seg.target(config.target)
    term = feature_distance(stale, fresh, config.distance)
    return RolloutLossOutput(denoise + config.lam * term, denoise, term, timesteps, key_steps, fresh, stale)
