"""Output consistency: a fine-tuning objective aimed at what an encoder cache reuses.

FCR asks the cached *features* to stay put across Δ; the probe of issue 18 (design.md §5) found
that they then do, yet the decoder's response to what difference remains grows and the cache
error barely moves. This objective trains the quantity the cache actually gets wrong: the UNet's
*output* when its cached features are stale.

    L_total = L_denoise + λ · d(F_stale(x_t; x_{t+Δ}), sg[F(x_t)]),   Δ ~ U(1, Δ_max),  t ~ U(0, T−1−Δ)

* ``F(x_t)`` is the ordinary forward at ``x_t`` (the denoising prediction itself, so the target
  costs no extra pass); ``sg`` is a stop-gradient: the target is a constant.
* ``F_stale(x_t; x_{t+Δ})`` is the forward at ``x_t`` that a cache serves at a reused step whose
  key step was ``t + Δ`` (the earlier, noisier one; same ``x0`` and ε for both):

  - ``cache="fd"`` (Faster Diffusion): the encoder (``conv_in``, down-block residuals, mid block)
    runs on ``x_{t+Δ}`` at ``t + Δ``; the decoder runs on those features with ``x_t``'s time
    embedding — :func:`fcr_sample.unet_parts.run_encoder` / ``run_decoder``, the split the
    encoder cache itself runs.
  - ``cache="deepcache"``: a full forward at ``x_{t+Δ}`` stores the modules DeepCache reuses, and
    the forward at ``x_t`` runs only the shallow path on them —
    :func:`fcr_sample.deep_cache.deep_cache_layers`, the layer hooks of the DeepCache comparator.
* ``d`` is a :func:`fcr_train.loss.feature_distance` (relative MSE by default); Δ counts sampler
  steps by default (design.md §5), as FCR's ``delta_unit="sampler_steps"``.

``trainable`` says which parameters the term's gradient may reach:

* ``"recomputed"``: only those of the modules the cache re-runs at a reused step (FD: the time
  embedding, the up blocks and the output head; DeepCache: the time embedding and the shallow
  path). The stale pass runs under ``no_grad``: the decoder learns to tolerate stale features.
* ``"all"``: also through the stale features into the modules that computed them at ``t + Δ``
  (the encoder for FD, the deep path for DeepCache), so the encoder may also learn features that
  serve the later step.

:func:`trainable_parameter_names` lists the names for a UNet; the tests check that the gradient
reaches exactly those.

Cost of a step (benchmarks/train_step.py): one ordinary forward + backward, plus the stale pass
at ``t + Δ`` (FD: an encoder pass; DeepCache: a full forward) and one stale-path forward +
backward at ``t`` (FD: a decoder; DeepCache: the shallow path).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from fcr_sample.deep_cache import DeepCacheConfig, cached_module_names, deep_cache_layers
from fcr_sample.unet_parts import prepare_conditioning, run_decoder, run_encoder

from .loss import (
    DELTA_UNITS,
    DISTANCES,
    denoise_target,
    feature_distance,
    sample_timesteps,
    sampler_step_timesteps,
)

__all__ = [
    "OC_CACHES",
    "OC_TRAINABLE",
    "OutputConsistencyConfig",
    "OutputConsistencyLossOutput",
    "cache_trainable_parameter_names",
    "check_output_consistency",
    "output_consistency_loss",
    "sample_oc_timesteps",
    "stale_output",
    "trainable_parameter_names",
]

from .vocabulary import OC_CACHES, OC_TRAINABLE  # noqa: E402  (defined torch-free, re-exported)

#: The modules Faster Diffusion's encoder cache reuses (their outputs) at a non-key step.
_FD_CACHED_MODULES = ("conv_in", "down_blocks", "mid_block")


@dataclass(frozen=True)
class OutputConsistencyConfig:
    """Options of the output-consistency term, recorded with every run (``config.json``).

    Attributes:
        lam: weight λ of the term (> 0; a run without the term has no config).
        delta_max: Δ ~ U(1, delta_max) between the key step and the reused step, in
            ``delta_unit``. ``None`` means "the stride it serves": Δ_max = ``stride``.
        delta_unit: ``"sampler_steps"`` (default: one unit = ``T // sampler_steps`` timesteps,
            :func:`fcr_train.loss.sampler_step_timesteps`) or ``"timesteps"`` (DDPM timesteps).
        sampler_steps: the sampler's step count (default 20: the study's DDIM-20).
        stride: the cache stride / interval this fine-tune serves (recorded; Δ_max's default).
        distance: one of :data:`fcr_train.loss.DISTANCES` between the stale-path output and the
            fresh target (default ``"relative_mse"``: scale-free).
        cache: ``"fd"`` or ``"deepcache"`` (:data:`OC_CACHES`): whose stale features.
        cache_branch_id: DeepCache's cut (``3·block + layer``, as
            :class:`fcr_sample.DeepCacheConfig`); only with ``cache="deepcache"``.
        trainable: ``"recomputed"`` or ``"all"`` (:data:`OC_TRAINABLE`): which parameters the
            term's gradient may reach (:func:`trainable_parameter_names`).

    Example:
        >>> OutputConsistencyConfig(lam=0.1, delta_max=10).timesteps_per_delta(1000)
        50
        >>> OutputConsistencyConfig(lam=0.1, cache="deepcache", delta_max=None, stride=5).delta_max
        5
    """

    lam: float = 0.1
    delta_max: int | None = 10
    delta_unit: str = "sampler_steps"
    sampler_steps: int | None = 20
    stride: int | None = None
    distance: str = "relative_mse"
    cache: str = "fd"
    cache_branch_id: int = 0
    trainable: str = "recomputed"

    def __post_init__(self):
        name = type(self).__name__
        if not self.lam > 0:
            raise ValueError(f"{name}.lam must be > 0, got {self.lam} (leave output_consistency unset "
                             "for a run without the term)")
        if self.delta_unit not in DELTA_UNITS:
            raise ValueError(f"{name}.delta_unit must be one of {DELTA_UNITS}, got {self.delta_unit!r}")
        if self.stride is not None and int(self.stride) < 1:
            raise ValueError(f"{name}.stride must be >= 1, got {self.stride}")
        if self.delta_max is None:
            if self.stride is None:
                raise ValueError(f"{name}.delta_max = None means 'the stride it serves'; set stride too "
                                 "(e.g. stride=10 for FD-10), or give delta_max")
            object.__setattr__(self, "delta_max", int(self.stride))
        if int(self.delta_max) < 1:
            raise ValueError(f"{name}.delta_max must be >= 1, got {self.delta_max}")
        if self.delta_unit == "sampler_steps" and (self.sampler_steps is None or int(self.sampler_steps) < 1):
            raise ValueError(f"{name}.delta_unit = 'sampler_steps' needs sampler_steps = the sampler's step "
                             f"count (the experiment's num_inference_steps), got {self.sampler_steps}")
        if self.distance not in DISTANCES:
            raise ValueError(f"{name}.distance must be one of {DISTANCES}, got {self.distance!r}")
        if self.cache not in OC_CACHES:
            raise ValueError(f"{name}.cache must be one of {OC_CACHES}, got {self.cache!r}")
        if self.trainable not in OC_TRAINABLE:
            raise ValueError(f"{name}.trainable must be one of {OC_TRAINABLE}, got {self.trainable!r}")
        if self.cache != "deepcache" and self.cache_branch_id != 0:
            raise ValueError(f"{name}.cache_branch_id is DeepCache's cut; with cache={self.cache!r} leave it at 0")
        self.deep_cache_config()  # DeepCache's own check of the branch id

    def to_dict(self) -> dict:
        return asdict(self)

    def timesteps_per_delta(self, num_train_timesteps: int) -> int:
        """Training timesteps per unit of Δ (``T // sampler_steps``, or 1 for ``"timesteps"``)."""
        if self.delta_unit == "sampler_steps":
            return sampler_step_timesteps(num_train_timesteps, self.sampler_steps)
        return 1

    def deep_cache_config(self) -> DeepCacheConfig:
        """The :class:`fcr_sample.DeepCacheConfig` whose cut the ``"deepcache"`` variant trains."""
        return DeepCacheConfig(cache_branch_id=self.cache_branch_id)


@dataclass
class OutputConsistencyLossOutput:
    """``loss = denoise + lam * oc``; ``target`` is the fresh output (detached), ``stale`` the
    stale-path output (with its graph)."""

    loss: torch.Tensor
    denoise: torch.Tensor
    oc: torch.Tensor
    timesteps: torch.Tensor
    deltas: torch.Tensor
    target: torch.Tensor | None = None
    stale: torch.Tensor | None = None


def _reused_modules(unet, cache: str, deep_cache_config: DeepCacheConfig) -> list[str]:
    """Names of the modules whose outputs the cache reuses (their parameters are what
    ``trainable="recomputed"`` keeps the term's gradient away from)."""
    if cache == "fd":
        return [n for n in _FD_CACHED_MODULES if getattr(unet, n, None) is not None]
    return cached_module_names(unet, deep_cache_config)


def cache_trainable_parameter_names(unet, cache: str, trainable: str, deep_cache_config: DeepCacheConfig) -> list[str]:
    """The parameters a term on ``cache``'s stale path may train: every one (``trainable="all"``),
    or those outside the modules whose outputs the cache reuses (``"recomputed"``; FD: ``conv_in``,
    ``down_blocks``, ``mid_block``; DeepCache: :func:`fcr_sample.deep_cache.cached_module_names`).
    The one definition of that cut for output consistency and the rollout objective.
    """
    names = [n for n, _ in unet.named_parameters()]
    if trainable == "all":
        return names
    cached = _reused_modules(unet, cache, deep_cache_config)
    return [n for n in names if not any(n.startswith(m + ".") for m in cached)]


def trainable_parameter_names(unet, config: OutputConsistencyConfig) -> list[str]:
    """The parameters (``unet.named_parameters()`` names) the term's gradient may reach.

    ``"all"``: every parameter. ``"recomputed"``: every parameter outside the modules whose outputs
    the cache reuses (:func:`cache_trainable_parameter_names`).

    Example:
        >>> names = trainable_parameter_names(unet, OutputConsistencyConfig(lam=0.1))
        >>> any(n.startswith("down_blocks") for n in names), any(n.startswith("up_blocks") for n in names)
        (False, True)
    """
    return cache_trainable_parameter_names(unet, config.cache, config.trainable, config.deep_cache_config())


def check_output_consistency(unet, num_train_timesteps: int, config: OutputConsistencyConfig, *,
                             grad_checkpointing: bool = False) -> None:
    """What ``config`` needs of the UNet and the scheduler, checked before a run starts.

    Raises:
        ValueError: Δ_max does not fit in the scheduler's timesteps, the DeepCache branch lies
            deeper than the UNet, or DeepCache is combined with gradient checkpointing.
    """
    span = int(config.delta_max) * config.timesteps_per_delta(num_train_timesteps)
    if span >= num_train_timesteps:
        raise ValueError(f"output consistency: delta_max = {config.delta_max} {config.delta_unit} spans {span} "
                         f"timesteps, which must be fewer than num_train_timesteps = {num_train_timesteps}; "
                         "lower delta_max")
    if config.cache == "deepcache":
        cached_module_names(unet, config.deep_cache_config())
        if grad_checkpointing:
            # Checkpointed resnets recompute in backward, after the reuse hooks are gone; a cached
            # layer would then be recomputed on x_t instead of returning its stale output.
            raise ValueError("output consistency with cache='deepcache' does not support gradient "
                             "checkpointing; turn grad_checkpointing off or use cache='fd'")


def sample_oc_timesteps(
    batch: int,
    num_train_timesteps: int,
    config: OutputConsistencyConfig,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t, Δ)`` per sample: Δ ~ U(1, Δ_max) units (in timesteps), t ~ U(0, T−1−Δ).

    The draw is FCR's (:func:`fcr_train.loss.sample_timesteps` gives the pair's noisier step
    ``t + Δ ~ U(Δ, T−1)``); the reused step is the less noisy one, ``t``.

    Example:
        >>> t, d = sample_oc_timesteps(4, 1000, OutputConsistencyConfig(lam=0.1, delta_max=10))
        >>> bool(((d % 50 == 0) & (t + d <= 999)).all())
        True
    """
    key, delta = sample_timesteps(batch, num_train_timesteps, int(config.delta_max), generator=generator,
                                  device=device, delta_scale=config.timesteps_per_delta(num_train_timesteps))
    return key - delta, delta


def _stale_fd(unet, x_key, t_key, x_t, t, encoder_hidden_states, grad: bool) -> torch.Tensor:
    with torch.set_grad_enabled(grad):
        enc = run_encoder(unet, x_key, prepare_conditioning(unet, x_key, t_key, encoder_hidden_states))
    return run_decoder(unet, enc, prepare_conditioning(unet, x_t, t, encoder_hidden_states))


def _stale_deepcache(unet, x_key, t_key, x_t, t, encoder_hidden_states, grad: bool,
                     config: OutputConsistencyConfig) -> torch.Tensor:
    with deep_cache_layers(unet, config.deep_cache_config()) as st:
        st.refreshing = True
        with torch.set_grad_enabled(grad):
            unet(x_key, t_key, encoder_hidden_states)
        st.refreshing, st.reusing = False, True
        return unet(x_t, t, encoder_hidden_states).sample


def stale_output(unet, x_key: torch.Tensor, t_key: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None, config: OutputConsistencyConfig) -> torch.Tensor:
    """The UNet's output at ``(x_t, t)`` as ``config.cache`` serves it from features of ``(x_key, t_key)``.

    With ``trainable="recomputed"`` the key-step pass runs under ``no_grad``.

    Example:
        >>> eps_stale = stale_output(unet, x_key, t + d, x_t, t, text, OutputConsistencyConfig(lam=0.1))
    """
    grad = torch.is_grad_enabled() and config.trainable == "all"
    if config.cache == "fd":
        return _stale_fd(unet, x_key, t_key, x_t, t, encoder_hidden_states, grad)
    return _stale_deepcache(unet, x_key, t_key, x_t, t, encoder_hidden_states, grad, config)


def output_consistency_loss(
    unet,
    scheduler,
    x0: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
    config: OutputConsistencyConfig,
    *,
    noise: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
    deltas: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> OutputConsistencyLossOutput:
    """Denoising loss plus λ · output consistency for one batch.

    Args:
        unet: a diffusers ``UNet2DConditionModel``.
        scheduler: a diffusers noise scheduler (``add_noise``, ``config.num_train_timesteps``,
            ``config.prediction_type``).
        x0: clean latents / pixels ``(B, C, H, W)``.
        encoder_hidden_states: text states ``(B, L, D)``.
        config: :class:`OutputConsistencyConfig`.
        noise, timesteps, deltas: fixed draws (tests, benchmarks): ``timesteps`` is the reused
            step ``t``, ``deltas`` Δ in timesteps (the key step is ``t + Δ``; Δ = 0 is allowed and
            gives a zero term). Drawn with :func:`sample_oc_timesteps` from ``generator`` if omitted.
        generator: CPU generator for t, Δ and ε.

    Returns:
        :class:`OutputConsistencyLossOutput`.

    Example:
        >>> out = output_consistency_loss(unet, DDPMScheduler(), x0, text, OutputConsistencyConfig(lam=0.1))
        >>> out.loss.backward()
    """
    T = scheduler.config.num_train_timesteps
    if timesteps is None:
        timesteps, drawn = sample_oc_timesteps(x0.shape[0], T, config, generator=generator)
        deltas = drawn if deltas is None else deltas
    if deltas is None:
        raise ValueError("output_consistency_loss: pass `deltas` together with `timesteps`")
    timesteps, deltas = timesteps.to(x0.device), deltas.to(x0.device)
    key = timesteps + deltas
    if bool((deltas < 0).any()) or bool((key > T - 1).any()):
        raise ValueError(f"output_consistency_loss: every delta must be >= 0 and t + delta <= {T - 1}")
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
    x_t = scheduler.add_noise(x0, noise, timesteps)
    x_key = scheduler.add_noise(x0, noise, key)  # the same ε: the pair a sampler's cache sees

    pred = unet(x_t, timesteps, encoder_hidden_states).sample
    denoise = F.mse_loss(pred.float(), denoise_target(scheduler, x0, noise, timesteps).float())
    target = pred.detach()  # the fresh output, as a constant: the stale path moves towards it
    stale = stale_output(unet, x_key, key, x_t, timesteps, encoder_hidden_states, config)
    oc = feature_distance(stale, target, config.distance)
    return OutputConsistencyLossOutput(denoise + config.lam * oc, denoise, oc, timesteps, deltas, target, stale)
