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

Example:
    >>> stats = encoder_feature_variance(unet, z0, text_states, DDPMScheduler(), delta_max=10)
    >>> [(s.block, s.delta, s.variance) for s in stats if s.block == "all"]
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from fcr_sample.features import encoder_features

from .store import FeatureStat

__all__ = ["encoder_feature_variance", "mean_variance"]

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


def _add_noise(scheduler, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    if hasattr(scheduler, "add_noise"):
        return scheduler.add_noise(z0, noise, t)
    ac = scheduler.alphas_cumprod.to(z0.device)[t].to(z0.dtype).view(-1, *([1] * (z0.ndim - 1)))
    return ac.sqrt() * z0 + (1 - ac).sqrt() * noise


@torch.no_grad()
def encoder_feature_variance(
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
    **unet_kwargs,
) -> list[FeatureStat]:
    """σ²_Δ of the UNet's encoder features for Δ in ``deltas`` (default 1…``delta_max``).

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (eval mode is the caller's choice).
        z0: clean latents / images ``(N, C, H, W)`` (the model's training-space inputs).
        encoder_hidden_states: text states ``(N, L, D)`` or ``None``.
        noise_scheduler: anything with ``add_noise`` or ``alphas_cumprod`` (e.g. ``DDPMScheduler``)
            and ``config.num_train_timesteps``.
        blocks: the feature selector of :func:`fcr_sample.features.encoder_features`.
        per_block: also return one row per feature (else only ``block='all'``).
        generator: seeds ε and t.
        timesteps: ``(N,)`` integer t (must be ≥ max Δ); drawn from U(Δ_max, T−1) if ``None``.

    Returns:
        :class:`~fcr_eval.store.FeatureStat` rows ``(block, delta, variance, n)``; ``n`` is the
        number of samples.

    Example:
        >>> rows = encoder_feature_variance(unet, z0, states, DDPMScheduler(), delta_max=3)
        >>> {r.delta for r in rows}
        {1, 2, 3}
    """
    deltas = sorted(set(deltas)) if deltas is not None else list(range(1, delta_max + 1))
    if not deltas or deltas[0] < 1:
        raise ValueError(f"deltas must be positive integers, got {deltas}")
    dmax = deltas[-1]
    T = int(noise_scheduler.config.num_train_timesteps)
    if dmax >= T:
        raise ValueError(f"Δ={dmax} does not fit in {T} training timesteps")
    n = z0.shape[0]
    device = z0.device
    if timesteps is None:
        timesteps = torch.randint(dmax, T, (n,), generator=generator, device="cpu")
    timesteps = torch.as_tensor(timesteps).long().cpu()
    if timesteps.shape != (n,) or int(timesteps.min()) < dmax or int(timesteps.max()) >= T:
        raise ValueError(f"timesteps must be (N,) integers in [{dmax}, {T - 1}], got {timesteps.tolist()[:8]}...")
    noise = torch.randn(z0.shape, generator=generator, device="cpu", dtype=torch.float32).to(device, z0.dtype)

    moments: dict[tuple[str, int], _Moments] = {}
    for i in range(0, n, batch_size):
        sl = slice(i, i + batch_size)
        z, eps, t = z0[sl], noise[sl], timesteps[sl].to(device)
        ehs = encoder_hidden_states[sl] if encoder_hidden_states is not None else None
        f_t = encoder_features(unet, _add_noise(noise_scheduler, z, eps, t), t, ehs, blocks=blocks, **unet_kwargs)
        for d in deltas:
            f_s = encoder_features(unet, _add_noise(noise_scheduler, z, eps, t - d), t - d, ehs, blocks=blocks,
                                   **unet_kwargs)
            all_m = moments.setdefault(("all", d), _Moments())
            for name, a in f_t.items():
                diff = a - f_s[name]
                all_m.add(diff)
                if per_block:
                    moments.setdefault((name, d), _Moments()).add(diff)
    rows = [FeatureStat(block, d, m.variance, n) for (block, d), m in moments.items()]
    rows.sort(key=lambda r: (r.block != "all", r.block, r.delta))
    logger.info("σ²_Δ over %d samples, Δ=%s: all-features %s", n, deltas,
                [round(r.variance, 6) for r in rows if r.block == "all"])
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
