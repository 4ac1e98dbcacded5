"""The ``[sampling]`` table: scheduler, steps, guidance, resolution, batch size, sample count,
evaluation prompts and precision of every run (a variation may override some of them).

Example::

    sampling = load_sampling(chk, raw.get("sampling", {}), datasets)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fcr_eval.spec.checker import Checker
from fcr_eval.spec.datasets import DatasetSpec, dataset_ref
from fcr_eval.spec.vocabulary import SAMPLING_DTYPES, SCHEDULERS

__all__ = ["SamplingSpec", "load_sampling", "check_guidance"]


@dataclass(frozen=True)
class SamplingSpec:
    scheduler: str = "ddim"
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    resolution: int | None = None
    batch_size: int = 64
    n_samples: int = 1000
    eval_prompts: str | None = None
    dtype: str = "float32"


def load_sampling(chk: Checker, raw: Any, datasets: dict[str, DatasetSpec]) -> SamplingSpec:
    """``[sampling]`` → :class:`SamplingSpec`, checked."""
    sampling = chk.build(SamplingSpec, raw, "sampling")
    chk.one_of(sampling.scheduler, SCHEDULERS, "sampling.scheduler", "sampling", "scheduler")
    for k in ("num_inference_steps", "batch_size", "n_samples"):
        if getattr(sampling, k) < 1:
            chk.fail(f"sampling.{k} = {getattr(sampling, k)} must be >= 1", "sampling", k)
    check_guidance(chk, sampling.guidance_scale, "sampling.guidance_scale", "sampling", None)
    if sampling.resolution is not None and sampling.resolution < 8:
        chk.fail(f"sampling.resolution = {sampling.resolution} must be >= 8 pixels (or left out: the model's own)",
                 "sampling", "resolution")
    dataset_ref(chk, datasets, sampling.eval_prompts, "sampling.eval_prompts", "sampling", "eval_prompts",
                roles=("eval",))
    chk.one_of(sampling.dtype, SAMPLING_DTYPES, "sampling.dtype", "sampling", "dtype")
    return sampling


def check_guidance(chk: Checker, g: float, name: str, section: str, index: int | None) -> None:
    if g < 0:
        chk.fail(f"{name} = {g} must be >= 0 (1 = no classifier-free guidance; the designed studies use 2-7.5)",
                 section, "guidance_scale", index)
    if g < 1 or g > 30:
        chk.warn(f"{name} = {g} is unusual (1 = no guidance, typical 2-7.5; below 1 weakens the prompt, above ~30 "
                 "saturates the images)", section, "guidance_scale", index)

