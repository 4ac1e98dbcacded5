"""The rows the results store holds, as typed records (the contract is ``docs/results-store.md``).

A finished run is one :class:`RunResult`: its :class:`RunRecord` plus metrics, per-prompt scores,
timings, encoder-feature statistics and sample references. :func:`make_run_id` gives the stable
id a run is stored (and skipped) under.

Example:
    >>> run = RunRecord(run_id=make_run_id("exp", "fd-10", 0, cfg), experiment_id="exp",
    ...                 variation_id="fd-10", seed=0, model="embedded", dataset="fashion-mnist",
    ...                 sampler="fd", stride=10, scheduler="ddim", resolution=32,
    ...                 num_inference_steps=50, guidance_scale=3.0, config=cfg)
    >>> RunResult(run, metrics=[MetricRecord("fd_efficientnet_lite0", 12.3, "efficientnet_lite0",
    ...                                      "resize_bilinear_224_imagenet_norm", 500)])
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "SAMPLERS",
    "MEMORY_KINDS",
    "RunRecord",
    "MetricRecord",
    "PerPromptScore",
    "TimingRecord",
    "FeatureStat",
    "SampleRecord",
    "CriterionResult",
    "RunResult",
    "make_run_id",
]

SAMPLERS = ("none", "fd", "deepcache")
MEMORY_KINDS = ("cuda_peak", "process_rss")


@dataclass(frozen=True)
class RunRecord:
    """One row of ``runs``: a variation × seed of an experiment, finished.

    ``params`` holds every run parameter without a column of its own (robustness protocol,
    prompt set, checkpoint path, ...); ``config`` the full resolved config. ``code_version`` and
    ``device`` say what produced every number of the run (see :func:`fcr_eval.provenance`).
    """

    run_id: str
    experiment_id: str
    variation_id: str
    seed: int
    model: str
    dataset: str
    sampler: str
    scheduler: str
    resolution: int
    num_inference_steps: int
    guidance_scale: float
    stride: int | None = None
    parallel_decoding: bool | None = None
    lambda_fcr: float | None = None
    delta_max: int | None = None
    blocks: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    config: Mapping[str, Any] = field(default_factory=dict)
    code_version: str = ""
    device: str = ""
    started_at: _dt.datetime | None = None
    finished_at: _dt.datetime | None = None
    status: str = "finished"
    run_dir: str | None = None  # added by migration 2

    def __post_init__(self) -> None:
        if not self.run_id:
            raise ValueError("RunRecord.run_id is empty; build it with make_run_id(...)")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"RunRecord.sampler is {self.sampler!r}; use one of {SAMPLERS}")
        if self.status != "finished":
            raise ValueError(
                f"RunRecord.status is {self.status!r}; the store holds finished runs only "
                "(a crashed run leaves nothing but its own folder)"
            )


@dataclass(frozen=True)
class MetricRecord:
    """One row of ``metrics``. ``feature_extractor``/``preprocessing`` say what produced it
    (``"none"`` for metrics without features, e.g. ``unet_calls``)."""

    metric: str
    value: float
    feature_extractor: str
    preprocessing: str
    n_samples: int
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PerPromptScore:
    """One row of ``per_prompt_scores`` (paired tests and bootstrap across variations)."""

    metric: str
    prompt_id: str
    value: float


@dataclass(frozen=True)
class TimingRecord:
    """One row of ``timings``. ``sec_per_image`` is device-synchronised, after ``warmup``
    untimed calls, averaged over ``n_images`` images."""

    batch_size: int
    sec_per_image: float
    unet_calls: int | None = None
    encoder_forwards: int | None = None
    decoder_forwards: int | None = None
    flops_per_image: float | None = None
    peak_memory_bytes: int | None = None
    memory_kind: str | None = None
    device: str = ""
    n_images: int | None = None  # added by migration 2
    warmup: int | None = None  # added by migration 2

    def __post_init__(self) -> None:
        if self.memory_kind is not None and self.memory_kind not in MEMORY_KINDS:
            raise ValueError(f"TimingRecord.memory_kind is {self.memory_kind!r}; use one of {MEMORY_KINDS}")


@dataclass(frozen=True)
class FeatureStat:
    """One row of ``feature_stats``: σ²_Δ of one encoder feature (or ``'all'``) at one Δ."""

    block: str
    delta: int
    variance: float
    n: int


@dataclass(frozen=True)
class SampleRecord:
    """One row of ``samples``. ``image_path`` is relative to the store's folder."""

    prompt_id: str
    prompt: str
    seed: int
    image_path: str
    width: int
    height: int
    class_label: str | None = None


@dataclass(frozen=True)
class CriterionResult:
    """One row of ``criteria``: a success criterion of design.md §1, evaluated.
    ``passed`` is ``None`` when the criterion could not be evaluated (reason in ``details``)."""

    experiment_id: str
    criterion: str
    passed: bool | None
    value: float | None
    threshold: float
    details: Mapping[str, Any] = field(default_factory=dict)
    code_version: str = ""
    evaluated_at: _dt.datetime | None = None
    verdict: str | None = None  # PASS / FAIL / INCONCLUSIVE (fcr_eval.criteria.VERDICTS); None = not evaluated
    ci_low: float | None = None  # the value's confidence interval, when it has one
    ci_high: float | None = None


@dataclass
class RunResult:
    """Everything a finished run writes, in one transaction (:meth:`ResultsStore.write_run`)."""

    run: RunRecord
    metrics: list[MetricRecord] = field(default_factory=list)
    per_prompt_scores: list[PerPromptScore] = field(default_factory=list)
    timings: list[TimingRecord] = field(default_factory=list)
    feature_stats: list[FeatureStat] = field(default_factory=list)
    samples: list[SampleRecord] = field(default_factory=list)


def make_run_id(experiment_id: str, variation_id: str, seed: int, config: Mapping[str, Any]) -> str:
    """Stable run id: a hash of experiment, variation, seed and the resolved config.

    Key order in ``config`` does not matter; any changed value gives a new id, so a changed
    config is never mistaken for a finished run.

    Example:
        >>> make_run_id("exp-1", "fd-10", 0, {"stride": 10}) == make_run_id("exp-1", "fd-10", 0, {"stride": 10})
        True
    """
    payload = json.dumps(
        {"experiment_id": experiment_id, "variation_id": variation_id, "seed": int(seed), "config": config},
        sort_keys=True,
        default=str,
        separators=(",", ":"),
    )
    digest = hashlib.sha256(payload.encode()).hexdigest()[:16]
    return f"{experiment_id}/{variation_id}/s{int(seed)}/{digest}"

