"""The plain denoising loop for a bare UNet: the one the project's own samplers share.

Diffusers pipelines run their own loop; this is for code that drives a UNet and a scheduler
directly (the embedded default, the experiment runner, the benchmarks). It calls ``unet(...)``
once per step (classifier-free guidance as one 2B batch, unconditional first, as the pipelines
do), so the caches of this package apply, and it announces a new sampling run to them when any
are attached. Observation and intervention go through one k-diffusion-style ``callback``.

Example:
    >>> apply_encoder_cache(unet, EncoderCacheConfig(stride=10))
    >>> x0 = denoise(unet, DDIMScheduler(), x_T, text, null_text, steps=50, guidance_scale=7.5)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from .hooks import find_cache_hooks, start_sampling_run

__all__ = ["denoise", "StepCallback"]

#: ``callback(info) -> Tensor | None``; see :func:`denoise` for the keys of ``info``.
StepCallback = Callable[[dict[str, Any]], "torch.Tensor | None"]


def denoise(unet, scheduler, x_T: torch.Tensor, cond: torch.Tensor, null: torch.Tensor | None = None, *,
            steps: int, guidance_scale: float = 1.0, generator: torch.Generator | None = None,
            callback: StepCallback | None = None) -> torch.Tensor:
    """Run ``steps`` scheduler steps from ``x_T`` and return the final state (not decoded).

    Args:
        x_T: initial noise at unit scale (multiplied by ``scheduler.init_noise_sigma`` here).
        cond / null: conditional and unconditional encoder states, ``(B, L, D)``; ``null`` is
            needed when ``guidance_scale != 1``.
        generator: passed to ``scheduler.step`` where it takes one (the stochastic schedulers:
            Euler-ancestral, LCM, DDPM; PNDM and UniPC take none), as the pipelines do.
        callback: called after every scheduler step with one dict (k-diffusion style):
            ``i`` (step index), ``t`` (its timestep), ``t_next`` (the next step's timestep, ``None``
            after the last), ``x`` (the state after the step: what step ``i + 1`` starts from),
            ``x_T`` (the initial state, ``x_T * init_noise_sigma``), ``noise_pred`` (the guided
            UNet output) and ``denoised`` (the scheduler's x̂0 where it reports one, else ``None``).
            To change the state, **return** the replacement tensor (same shape); ``None`` keeps it.
            Do not modify ``info["x"]`` in place: it may be the scheduler's own buffer and
            in-place edits break autograd. Callbacks the attached caches need (prior noise
            injection, :meth:`~fcr_sample.hooks.CacheHook.loop_callback`) run first.

    Differentiable when called under grad (the FGSM robustness protocol relies on it).

    Example:
        >>> from fcr_sample import prior_noise_callback
        >>> x0 = denoise(unet, sched, x_T, cond, null, steps=20, guidance_scale=7.5,
        ...              callback=prior_noise_callback(alpha=0.003, tau=0.5))
    """
    if guidance_scale != 1.0 and null is None:
        raise ValueError("classifier-free guidance (guidance_scale != 1) needs the unconditional states `null`")
    scheduler.set_timesteps(steps, device=x_T.device)
    hooks = find_cache_hooks(unet)
    if hooks:
        start_sampling_run(unet, scheduler.timesteps)
    callbacks = [cb for hook in hooks if (cb := hook.loop_callback(scheduler)) is not None]
    if callback is not None:
        callbacks.append(callback)
    x = x_T * scheduler.init_noise_sigma
    x_init = x
    timesteps = scheduler.timesteps
    guided = guidance_scale != 1.0
    states = torch.cat([null, cond]) if guided else cond  # the same every step: built once
    step_kwargs = _step_kwargs(scheduler, generator)
    for i, t in enumerate(timesteps):
        inp = scheduler.scale_model_input(x, t)
        if guided:
            u, c = unet(torch.cat([inp, inp]), t, states).sample.chunk(2)
            eps = u + guidance_scale * (c - u)
        else:
            eps = unet(inp, t, states).sample
        out = scheduler.step(eps, t, x, **step_kwargs)
        x = out.prev_sample
        if callbacks:
            x = _run_callbacks(callbacks, {
                "i": i, "t": t, "t_next": timesteps[i + 1] if i + 1 < len(timesteps) else None,
                "x": x, "x_T": x_init, "noise_pred": eps,
                "denoised": getattr(out, "pred_original_sample", None),
            })
    return x


def _step_kwargs(scheduler, generator: torch.Generator | None) -> dict[str, Any]:
    """``generator`` for a ``scheduler.step`` that accepts one (diffusers' pipelines decide the same
    way, by the signature: PNDM's and UniPC's ``step`` have no such argument)."""
    if "generator" in inspect.signature(scheduler.step).parameters:
        return {"generator": generator}
    return {}


def _run_callbacks(callbacks: list[StepCallback], info: dict[str, Any]) -> torch.Tensor:
    for cb in callbacks:
        new = cb(info)
        if new is None:
            continue
        if not torch.is_tensor(new) or new.shape != info["x"].shape:
            raise ValueError(
                f"a denoise callback must return None or a tensor of the state's shape "
                f"{tuple(info['x'].shape)}, got {getattr(new, 'shape', type(new).__name__)}"
            )
        info["x"] = new
    return info["x"]
