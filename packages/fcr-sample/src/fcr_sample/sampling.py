"""The plain denoising loop for a bare UNet: the one the project's own samplers share.

Diffusers pipelines run their own loop; this is for code that drives a UNet and a scheduler
directly (the embedded default, the experiment runner, the benchmarks). It calls ``unet(...)``
once per step (classifier-free guidance as one 2B batch, unconditional first, as the pipelines
do), so the caches of this package apply, and it announces a new sampling run to them when any
are attached.

Example:
    >>> apply_encoder_cache(unet, EncoderCacheConfig(stride=10))
    >>> x0 = denoise(unet, DDIMScheduler(), x_T, text, null_text, steps=50, guidance_scale=7.5)
"""

from __future__ import annotations

import torch

from .hooks import find_cache_hooks
from .run_state import start_sampling_run

__all__ = ["denoise"]


def denoise(unet, scheduler, x_T: torch.Tensor, cond: torch.Tensor, null: torch.Tensor | None = None, *,
            steps: int, guidance_scale: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Run ``steps`` scheduler steps from ``x_T`` and return the final state (not decoded).

    Args:
        x_T: initial noise at unit scale (multiplied by ``scheduler.init_noise_sigma`` here).
        cond / null: conditional and unconditional encoder states, ``(B, L, D)``; ``null`` is
            needed when ``guidance_scale != 1``.
        generator: passed to ``scheduler.step`` (stochastic schedulers).

    Differentiable when called under grad (the FGSM robustness protocol relies on it).
    """
    if guidance_scale != 1.0 and null is None:
        raise ValueError("classifier-free guidance (guidance_scale != 1) needs the unconditional states `null`")
    scheduler.set_timesteps(steps, device=x_T.device)
    if find_cache_hooks(unet):
        start_sampling_run(unet, scheduler.timesteps)
    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        if guidance_scale != 1.0:
            u, c = unet(torch.cat([inp, inp]), t, torch.cat([null, cond])).sample.chunk(2)
            eps = u + guidance_scale * (c - u)
        else:
            eps = unet(inp, t, cond).sample
        x = scheduler.step(eps, t, x, generator=generator).prev_sample
    return x
