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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fcr_eval.spec.vocabulary import SAMPLERS

__all__ = [
    "SAMPLERS",
    "MEMORY_KINDS",
    "VERDICTS",
    "RunRecord",
    "MetricRecord",
    "PerPromptScore",
    "TimingRecord",
    "FeatureStat",
    "AttributionValue",
    "SampleRecord",
    "CriterionResult",
    "SampleMetrics",
    "RunResult",
    "make_run_id",
    "unestimable_fd",
]

MEMORY_KINDS = ("cuda_peak", "process_rss")
#: Verdicts of a criterion or a contrast with a threshold (fcr_eval.analysis.criteria decides them).
VERDICTS = ("PASS", "FAIL", "INCONCLUSIVE")


@dataclass(frozen=True)
class RunRecord:
    """One row of ``runs``: a variation × seed of an experiment, finished.

    ``params`` holds every run parameter without a column of its own (robustness protocol,
    prompt set, checkpoint path, ...); ``config`` the full resolved config. ``code_version`` and
    ``device`` say what produced every number of the run (see :func:`fcr_common.provenance`).

    The effective cache schedule (added by migration 3) is what the sampler really ran, read off
    the built sampler config (:meth:`fcr_eval.plan.samplers.SamplerSettings.describe`):
    ``cache_label`` (``"FD-10"``, ``"FD-published"``, ``"DeepCache-N5-b0"``, ``"none"``),
    ``cache_key_steps`` (the step indices that run the full encoder / full UNet at this run's
    step count; ``None`` without a cache) and ``cache_interval`` (the uniform stride or DeepCache
    interval actually used; ``None`` for a non-uniform schedule or no cache).
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
    cache_label: str | None = None  # added by migration 3
    cache_key_steps: Sequence[int] | None = None
    cache_interval: int | None = None
    lambda_oc: float | None = None  # added by migration 8: the output-consistency fine-tune's λ

    def __post_init__(self) -> None:
        if self.cache_key_steps is not None:
            object.__setattr__(self, "cache_key_steps", tuple(int(s) for s in self.cache_key_steps))
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
    untimed calls, averaged over ``n_images`` images; ``None`` when the experiment's interleaved
    timing session timed the sampler instead (``timing_rounds``)."""

    batch_size: int
    sec_per_image: float | None
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
    """One row of ``feature_stats``: σ²_Δ of one encoder feature (or ``'all'``) at one Δ.

    ``delta`` is in DDPM timesteps; ``unit`` says which range the measurement drew Δ from
    (``"timesteps"``: the paper's literal 1…Δ_max; ``"sampler_steps"``: the cache's range, k·T/steps);
    ``energy`` is the feature's mean square (σ²_Δ / energy is scale-free)."""

    block: str
    delta: int
    variance: float
    n: int
    energy: float | None = None  # migration 5
    unit: str = "timesteps"


@dataclass(frozen=True)
class AttributionValue:
    """One row of ``cache_attribution`` (migration 7): one quantity of the cache-error attribution
    (:func:`fcr_sample.attribute_cache_error`) at one served step, for one cached feature or for
    the step as a whole (``feature == "all"``).

    ``quantity`` is one of fcr-sample's ``STEP_QUANTITIES`` (feature ``"all"``) or
    ``FEATURE_QUANTITIES``; errors are relative squared errors pooled over the run's first
    ``n_samples`` samples (a ratio of sums), so they are not averaged over samples again."""

    step: int
    timestep: float
    feature: str
    quantity: str
    value: float
    n_samples: int

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[str, Any]], n_samples: int) -> list[AttributionValue]:
        """Records from :meth:`fcr_sample.CacheAttribution.to_rows` of a batch of ``n_samples``."""
        return [cls(int(r["step"]), float(r["timestep"]), str(r["feature"]), str(r["quantity"]),
                    float(r["value"]), int(n_samples)) for r in rows]


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
    verdict: str | None = None  # PASS / FAIL / INCONCLUSIVE (VERDICTS); None = not evaluated
    ci_low: float | None = None  # the value's confidence interval, when it has one (migration 4)
    ci_high: float | None = None

    def __post_init__(self) -> None:
        if self.verdict is not None and self.verdict not in VERDICTS:
            raise ValueError(f"CriterionResult.verdict is {self.verdict!r}; use one of {VERDICTS} or None")


@dataclass(frozen=True)
class SampleMetrics:
    """One metric's per-sample values for one run, columnar: rows of ``sample_metrics``.

    Columnar because a run has one value per sample per metric (exp-1 in full: millions of
    rows); the store inserts them in bulk. The metric's definition (extractor, preprocessing,
    anything else in ``details``) is stored once per (run, metric) in
    ``sample_metric_definitions``.

    Attributes:
        metric: a per-sample metric name (:data:`fcr_eval.spec.vocabulary.SAMPLE_METRICS`).
        values: ``(N,)`` values (NaN is stored as NULL; ±inf is kept, e.g. PSNR of identical images).
        prompt_ids: ``N`` prompt ids, as in ``samples.prompt_id``.
        seeds: the x_T seed of each sample (one int for all, or ``N`` ints).
        sample_index: each sample's index in the run (default ``0..N-1``); with ``seed`` the
            key that pairs samples across variations.
        reference: what each value was compared against, e.g. the run id of the uncached
            reference sample (one for all, ``N`` values, or ``None``).
        feature_extractor / preprocessing: as for :class:`MetricRecord` (``"none"`` without features).
        details: the rest of the definition (e.g. PSNR's data range).

    Example:
        >>> SampleMetrics("cache_mse", errs["cache_mse"], prompts.ids, seeds=0,
        ...               reference=reference_run_id)
    """

    metric: str
    values: Any
    prompt_ids: Sequence[str]
    seeds: Any
    sample_index: Any = None
    reference: str | Sequence[str | None] | None = None
    feature_extractor: str = "none"
    preprocessing: str = "none"
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.metric:
            raise ValueError("SampleMetrics.metric is empty; name the per-sample metric")
        values = np.asarray(self.values, dtype=np.float64).reshape(-1)
        n = values.shape[0]

        def column(name: str, x: Any, dtype) -> np.ndarray:
            arr = np.asarray(x, dtype=dtype)
            if arr.ndim == 0:
                return np.full(n, arr.item(), dtype=dtype)
            arr = arr.reshape(-1)
            if arr.shape[0] != n:
                raise ValueError(f"SampleMetrics({self.metric!r}).{name} has {arr.shape[0]} entries for "
                                 f"{n} values; give one per sample")
            return arr

        object.__setattr__(self, "values", values)
        object.__setattr__(self, "prompt_ids", column("prompt_ids", [str(p) for p in self.prompt_ids], object))
        object.__setattr__(self, "seeds", column("seeds", self.seeds, np.int64))
        index = np.arange(n) if self.sample_index is None else self.sample_index
        object.__setattr__(self, "sample_index", column("sample_index", index, np.int64))
        if self.reference is not None and not isinstance(self.reference, str):
            object.__setattr__(self, "reference", column("reference", list(self.reference), object))

    def __len__(self) -> int:
        return int(self.values.shape[0])


@dataclass
class RunResult:
    """Everything a finished run writes, in one transaction (:meth:`ResultsStore.write_run`)."""

    run: RunRecord
    metrics: list[MetricRecord] = field(default_factory=list)
    per_prompt_scores: list[PerPromptScore] = field(default_factory=list)
    timings: list[TimingRecord] = field(default_factory=list)
    feature_stats: list[FeatureStat] = field(default_factory=list)
    samples: list[SampleRecord] = field(default_factory=list)
    sample_metrics: list[SampleMetrics] = field(default_factory=list)  # migration 4
    cache_attribution: list[AttributionValue] = field(default_factory=list)  # migration 7


def unestimable_fd(metrics) -> tuple[int, int] | None:
    """Read the stored estimability of Fréchet-distance rows (``details["estimable"]``, written
    with each FD record by :func:`fcr_eval.metrics.quality.quality_metrics`): ``(fewest samples,
    feature dimension)`` when any row is not estimable, else ``None``. Rows stored before the flag
    existed carry no answer and are not judged here.

    Args:
        metrics: a frame of FD rows as :meth:`fcr_eval.store.ResultsStore.metrics` returns it
            (columns ``n_samples`` and ``details``, the latter a JSON string or a dict).
    """
    worst = None
    for n, details in zip(metrics["n_samples"].to_list(), metrics["details"].to_list(), strict=True):
        d = json.loads(details) if isinstance(details, str) else (details or {})
        if d.get("estimable") is False:
            dim = int(d.get("feature_dim", 0))
            worst = (int(n), dim) if worst is None or int(n) < worst[0] else worst
    return worst


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

