"""Faster Diffusion's prior noise injection, ``z_t += α·z_T`` for ``t / T < τ``, for sampling loops.

Li et al., 2023 (https://arxiv.org/abs/2312.09608) add a little of the initial noise back in the
late steps. It changes the latents *between* steps, so it is a step callback, never a patch of
the scheduler: :func:`prior_noise_callback` for :func:`fcr_sample.denoise`, and the encoder
cache's own hook methods (``loop_callback``, ``prior_noise_step_end``) when it is configured with
``EncoderCacheConfig(prior_noise_alpha=...)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["inject_prior_noise", "prior_noise_callback"]


def inject_prior_noise(
    latents: torch.Tensor,
    initial_latents: torch.Tensor,
    timestep,
    *,
    alpha: float = 0.003,
    tau: float = 0.5,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """Faster Diffusion's prior noise injection for hand-written loops: ``z_t + α·z_T`` if ``t/T < τ``.

    Example:
        >>> x = inject_prior_noise(x, x_T, t, alpha=0.003)  # before the UNet call at timestep t
    """
    if float(timestep) / num_train_timesteps < tau:
        return latents + alpha * initial_latents
    return latents


def prior_noise_callback(
    alpha: float = 0.003,
    tau: float = 0.5,
    x_T: torch.Tensor | None = None,
    *,
    num_train_timesteps: int = 1000,
) -> Callable[[dict[str, Any]], torch.Tensor]:
    """Prior noise injection as a :func:`fcr_sample.denoise` step callback.

    After step ``i`` the latent the next step starts from becomes ``x + α·z_T`` when that next
    timestep ``t_next`` has ``t_next / T < τ`` — the same as adding ``α·z_T`` before the UNet call
    at ``t_next``. ``z_T`` is ``x_T`` if given, else the loop's initial state (``info["x_T"]``).

    Args:
        alpha: the injection strength α (Faster Diffusion: 0.003).
        tau: threshold on ``t / num_train_timesteps`` (Faster Diffusion: 0.5).
        x_T: the initial state to inject; default: the one ``denoise`` reports.
        num_train_timesteps: T of the scheduler.

    Example:
        >>> x0 = denoise(unet, sched, x_T, cond, null, steps=50, guidance_scale=7.5,
        ...              callback=prior_noise_callback(0.003, 0.5))
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")

    def callback(info: dict[str, Any]) -> torch.Tensor:
        t_next = info.get("t_next")
        if t_next is None:
            return info["x"]
        z_T = x_T if x_T is not None else info["x_T"]
        return inject_prior_noise(
            info["x"], z_T, t_next, alpha=alpha, tau=tau, num_train_timesteps=num_train_timesteps
        )

    return callback
