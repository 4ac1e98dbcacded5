"""The sampling schedulers an experiment can name, built on a model's noise schedule."""

from __future__ import annotations

from fcr_eval.spec.vocabulary import SCHEDULERS

__all__ = ["make_sampling_scheduler"]


def make_sampling_scheduler(kind: str, config):
    """DDIM (η = 0) or DPM-Solver++ (2nd-order multistep) built on ``config``, a scheduler config
    holding the model's noise schedule and prediction type (ε or v).

    A config that clips the predicted clean sample (``clip_sample``, as the embedded pixel-space
    model's does) gets the same clipping in DPM-Solver++, which has no ``clip_sample``: its
    thresholding with ``sample_max_value = clip_sample_range`` clamps x̂0 to that range. Without
    it, DPM-Solver++ starts at t = 999 where √ᾱ ≈ 5e-5 on that schedule, x̂0 reaches ~10³ and the
    images saturate to 0/1 (docs/mini-exp-2-robustness/results.md). Stable Diffusion configs do not clip and
    are unaffected."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if kind == "ddim":
        return DDIMScheduler.from_config(config)
    if kind == "dpm-solver++":
        extra = {}
        if config.get("clip_sample"):
            extra = {"thresholding": True, "sample_max_value": float(config.get("clip_sample_range", 1.0))}
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2, **extra)
    raise ValueError(f"unknown scheduler {kind!r}; allowed are {SCHEDULERS}")
