"""Mechanism metric: encoder-feature variance σ²_Δ = Var(Enc(x_t) − Enc(x_{t−Δ})).

FCR's claim is that it makes encoder features nearly time-invariant, so caching them over a
stride costs little. σ²_Δ measures exactly that, with the same definition of "encoder features"
the cache and the FCR loss use (:func:`fcr_sample.features.encoder_features`):

* x_t and x_{t−Δ} are noised from the *same* clean z0 with the *same* ε (DDPM indexing: x_{t−Δ}
  is the less noisy one), as in the FCR loss;
* t is drawn once per sample from U(Δ_max, T−1) and reused for every Δ, so the curve over Δ is
  not blurred by different timestep draws;
* σ²_Δ is the variance of all entries of the difference (over samples and feature positions),
  per feature (``block`` = feature name, e.g. ``down_blocks.1.resnets.0``) and over all selected
  features together (``block='all'``).

**Scale and units** (design.md §5). σ²_Δ has the units of the features squared, so an encoder
that merely *shrinks* its features lowers it without becoming more consistent. Each row of
:func:`encoder_feature_consistency` therefore carries the feature **energy** (mean squared
feature, ½(E f_t² + E f_{t−Δ}²), the same normaliser as FCR's relative MSE) and the scale-free
``σ²_Δ / energy``. Δ is counted in DDPM timesteps or in sampler steps (one sampler step =
``T // steps`` timesteps, :func:`fcr_train.loss.sampler_step_timesteps`):
:func:`cache_range_consistency` measures both the range the cache reuses features over
(Δ = 1…stride sampler steps) and the paper's literal 1…Δ_max timesteps.

Example:
    >>> stats = encoder_feature_variance(unet, z0, text_states, DDPMScheduler(), delta_max=10)
    >>> [(s.block, s.delta, s.variance) for s in stats if s.block == "all"]
    >>> rows = cache_range_consistency(unet, z0, text_states, DDPMScheduler(), stride=10, sampler_steps=20)
    >>> [(r.unit, r.delta, r.delta_timesteps, r.scale_free) for r in rows if r.block == "all"]
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from fcr_sample.features import encoder_features
from fcr_train.loss import DELTA_UNITS, sampler_step_timesteps

from fcr_eval.records import FeatureStat

__all__ = [
    "FeatureConsistency",
    "encoder_feature_consistency",
    "encoder_feature_variance",
    "cache_range_consistency",
    "mean_variance",
]

logger = logging.getLogger(__name__)


class _Moments:
    """Running count, sum and sum of squares in float64 (variance without holding features)."""

    def __init__(self) -> None:
        self.n = 0
        self.s = 0.0
        self.ss = 0.0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().double()
        self.n += x.numel()
        self.s += float(x.sum())
        self.ss += float((x * x).sum())

    @property
    def variance(self) -> float:
        mean = self.s / self.n
        return max(self.ss / self.n - mean * mean, 0.0)

    @property
    def mean_square(self) -> float:
        return self.ss / self.n


@dataclass(frozen=True)
class FeatureConsistency:
    """σ²_Δ of one feature (or ``'all'``) at one Δ, next to the feature's energy.

    Attributes:
        block: feature name (``conv_in``, ``down_blocks.0.resnets.0``, …, ``mid_block``) or ``"all"``.
        delta: Δ in ``unit``; delta_timesteps: the DDPM offset it is (= delta for timesteps).
        unit: ``"timesteps"`` or ``"sampler_steps"``.
        variance: σ²_Δ = Var(Enc(x_t) − Enc(x_{t−Δ})) over samples and positions.
        energy: ½(E[Enc(x_t)²] + E[Enc(x_{t−Δ})²]), the mean squared feature.
        n: number of samples.
    """

    block: str
    delta: int
    delta_timesteps: int
    unit: str
    variance: float
    energy: float
    n: int

    @property
    def scale_free(self) -> float:
        """σ²_Δ / energy: unchanged when the features are rescaled (NaN for all-zero features)."""
        return self.variance / self.energy if self.energy > 0 else float("nan")

    def to_feature_stat(self) -> FeatureStat:
        """The store's ``feature_stats`` row; its ``delta`` is in DDPM timesteps (unambiguous)."""
        return FeatureStat(self.block, self.delta_timesteps, self.variance, self.n, self.energy, self.unit)


def _add_noise(scheduler, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    if hasattr(scheduler, "add_noise"):
        return scheduler.add_noise(z0, noise, t)
    ac = scheduler.alphas_cumprod.to(z0.device)[t].to(z0.dtype).view(-1, *([1] * (z0.ndim - 1)))
    return ac.sqrt() * z0 + (1 - ac).sqrt() * noise


def encoder_feature_variance(unet, z0: torch.Tensor, encoder_hidden_states: torch.Tensor | None, noise_scheduler,
                             **kwargs) -> list[FeatureStat]:
    """σ²_Δ of the UNet's encoder features for Δ in ``deltas`` (default 1…``delta_max``).

    The store's form of :func:`encoder_feature_consistency` (same arguments): rows
    ``(block, delta, variance, n)`` with ``delta`` in DDPM timesteps. With the default
    ``delta_unit="timesteps"`` the results are exactly those of earlier versions.

    Example:
        >>> rows = encoder_feature_variance(unet, z0, states, DDPMScheduler(), delta_max=3)
        >>> {r.delta for r in rows}
        {1, 2, 3}
    """
    rows = encoder_feature_consistency(unet, z0, encoder_hidden_states, noise_scheduler, **kwargs)
    return [r.to_feature_stat() for r in rows]


@torch.no_grad()
def encoder_feature_consistency(
    unet,
    z0: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
    noise_scheduler,
    *,
    delta_max: int = 10,
    deltas: Iterable[int] | None = None,
    blocks: str | Iterable[str] = "all",
    per_block: bool = True,
    generator: torch.Generator | None = None,
    timesteps: torch.Tensor | None = None,
    batch_size: int = 32,
    delta_unit: str = "timesteps",
    sampler_steps: int | None = None,
    **unet_kwargs,
) -> list[FeatureConsistency]:
    """σ²_Δ and feature energy of the UNet's encoder features for Δ in ``deltas`` (default 1…``delta_max``).

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (eval mode is the caller's choice).
        z0: clean latents / images ``(N, C, H, W)`` (the model's training-space inputs).
        encoder_hidden_states: text states ``(N, L, D)`` or ``None``.
        noise_scheduler: anything with ``add_noise`` or ``alphas_cumprod`` (e.g. ``DDPMScheduler``)
            and ``config.num_train_timesteps``.
        blocks: the feature selector of :func:`fcr_sample.features.encoder_features`.
        per_block: also return one row per feature (else only ``block='all'``).
        generator: seeds ε and t.
        timesteps: ``(N,)`` integer t (must be ≥ the largest Δ in timesteps); drawn from
            U(Δ_max, T−1) (Δ_max in timesteps) if ``None``.
        delta_unit: ``"timesteps"`` (Δ = DDPM timesteps) or ``"sampler_steps"`` (Δ = k sampler
            steps = k · (T // sampler_steps) timesteps).
        sampler_steps: the sampler's step count; required with ``"sampler_steps"``.

    Returns:
        :class:`FeatureConsistency` rows; ``n`` is the number of samples.

    Example:
        >>> rows = encoder_feature_consistency(unet, z0, states, DDPMScheduler(), delta_max=10,
        ...                                    delta_unit="sampler_steps", sampler_steps=20)
        >>> sorted({r.delta_timesteps for r in rows})[:3]
        [50, 100, 150]
    """
    deltas = sorted(set(deltas)) if deltas is not None else list(range(1, delta_max + 1))
    if not deltas or deltas[0] < 1:
        raise ValueError(f"deltas must be positive integers, got {deltas}")
    if delta_unit not in DELTA_UNITS:
        raise ValueError(f"delta_unit must be one of {DELTA_UNITS}, got {delta_unit!r}")
    T = int(noise_scheduler.config.num_train_timesteps)
    if delta_unit == "sampler_steps":
        if sampler_steps is None:
            raise ValueError("delta_unit='sampler_steps' needs sampler_steps (the sampler's step count)")
        scale = sampler_step_timesteps(T, sampler_steps)
    else:
        scale = 1
    offsets = {d: d * scale for d in deltas}
    dmax = offsets[deltas[-1]]
    if dmax >= T:
        raise ValueError(f"Δ={deltas[-1]} {delta_unit} = {dmax} timesteps does not fit in {T} training timesteps")
    n = z0.shape[0]
    device = z0.device
    if timesteps is None:
        timesteps = torch.randint(dmax, T, (n,), generator=generator, device="cpu")
    timesteps = torch.as_tensor(timesteps).long().cpu()
    if timesteps.shape != (n,) or int(timesteps.min()) < dmax or int(timesteps.max()) >= T:
        raise ValueError(f"timesteps must be (N,) integers in [{dmax}, {T - 1}], got {timesteps.tolist()[:8]}...")
    noise = torch.randn(z0.shape, generator=generator, device="cpu", dtype=torch.float32).to(device, z0.dtype)

    moments: dict[tuple[str, int], _Moments] = {}
    # Energy: E f_t² per block (shared by every Δ) and E f_{t−Δ}² per (block, Δ).
    energy_t: dict[str, _Moments] = {}
    energy_s: dict[tuple[str, int], _Moments] = {}
    for i in range(0, n, batch_size):
        sl = slice(i, i + batch_size)
        z, eps, t = z0[sl], noise[sl], timesteps[sl].to(device)
        ehs = encoder_hidden_states[sl] if encoder_hidden_states is not None else None
        f_t = encoder_features(unet, _add_noise(noise_scheduler, z, eps, t), t, ehs, blocks=blocks, **unet_kwargs)
        for name, a in f_t.items():
            energy_t.setdefault("all", _Moments()).add(a)
            if per_block:
                energy_t.setdefault(name, _Moments()).add(a)
        for d in deltas:
            off = offsets[d]
            f_s = encoder_features(unet, _add_noise(noise_scheduler, z, eps, t - off), t - off, ehs, blocks=blocks,
                                   **unet_kwargs)
            all_m = moments.setdefault(("all", d), _Moments())
            for name, a in f_t.items():
                diff = a - f_s[name]
                all_m.add(diff)
                energy_s.setdefault(("all", d), _Moments()).add(f_s[name])
                if per_block:
                    moments.setdefault((name, d), _Moments()).add(diff)
                    energy_s.setdefault((name, d), _Moments()).add(f_s[name])
    rows = [FeatureConsistency(block, d, offsets[d], delta_unit, m.variance,
                               0.5 * (energy_t[block].mean_square + energy_s[(block, d)].mean_square), n)
            for (block, d), m in moments.items()]
    rows.sort(key=lambda r: (r.block != "all", r.block, r.delta))
    logger.info("σ²_Δ over %d samples, Δ=%s %s: all-features %s (σ²_Δ/energy %s)", n, deltas, delta_unit,
                [round(r.variance, 6) for r in rows if r.block == "all"],
                [round(r.scale_free, 6) for r in rows if r.block == "all"])
    return rows


def cache_range_consistency(
    unet,
    z0: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
    noise_scheduler,
    *,
    stride: int,
    sampler_steps: int,
    literal_delta_max: int | None = 10,
    **kwargs,
) -> list[FeatureConsistency]:
    """σ²_Δ over the range an encoder cache reuses features, and over the paper's literal range.

    Rows for Δ = 1…``stride`` sampler steps (``unit="sampler_steps"``: what FD-``stride``
    actually spans) followed, unless ``literal_delta_max`` is ``None``, by Δ = 1…``literal_delta_max``
    DDPM timesteps (``unit="timesteps"``). Both carry energy and the scale-free ratio. The two
    ranges draw their own t (each from U(its Δ_max in timesteps, T−1)) from ``generator``.

    Args:
        stride: the cache's key-step stride; sampler_steps: the sampler's step count.
        literal_delta_max: Δ_max of the literal, timestep-unit measurement.
        **kwargs: the other arguments of :func:`encoder_feature_consistency` (blocks, generator, ...).

    Example:
        >>> rows = cache_range_consistency(unet, z0, states, DDPMScheduler(), stride=10, sampler_steps=20)
        >>> {(r.unit, r.delta_timesteps) for r in rows if r.block == "all"} >= {("sampler_steps", 500), ("timesteps", 10)}
        True
    """
    if "deltas" in kwargs or "delta_max" in kwargs or "delta_unit" in kwargs:
        raise ValueError("cache_range_consistency sets Δ from stride / literal_delta_max; do not pass deltas, "
                         "delta_max or delta_unit")
    rows = encoder_feature_consistency(unet, z0, encoder_hidden_states, noise_scheduler, delta_max=stride,
                                       delta_unit="sampler_steps", sampler_steps=sampler_steps, **kwargs)
    if literal_delta_max is not None:
        rows += encoder_feature_consistency(unet, z0, encoder_hidden_states, noise_scheduler,
                                            delta_max=literal_delta_max, delta_unit="timesteps", **kwargs)
    return rows


def mean_variance(rows: Iterable[FeatureStat], block: str = "all") -> float:
    """Mean σ²_Δ over Δ for one block — the single number compared across variations.

    Example:
        >>> mean_variance([FeatureStat("all", 1, 0.1, 8), FeatureStat("all", 2, 0.3, 8)])
        0.2
    """
    vals = [r.variance for r in rows if r.block == block]
    if not vals:
        raise ValueError(f"no σ²_Δ rows for block {block!r}")
    return float(sum(vals) / len(vals))
