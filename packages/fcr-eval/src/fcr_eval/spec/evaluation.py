"""The ``[evaluation]`` table: which metrics every run computes and how (feature extractor,
reference images, timing, σ²_Δ, CLIP drift, the cache-error attribution).

Example::

    evaluation = load_evaluation(chk, raw.get("evaluation", {}), datasets)
    check_attribution_variations(chk, evaluation, {v.id: v.sampler for v in variations})
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fcr_sample.vocabulary import BLOCK_GROUPS as BLOCKS

from fcr_eval.spec.checker import Checker
from fcr_eval.spec.datasets import DatasetSpec, dataset_ref
from fcr_eval.spec.vocabulary import (
    ADAPTIVE_SAMPLERS,
    CACHED_SAMPLERS,
    EXTRACTORS,
    METRICS,
    TIMING_SEEDS,
)

__all__ = ["EvaluationSpec", "SAVE_SAMPLES_WORDS", "saved_sample_count", "load_evaluation",
           "check_attribution_variations"]

#: The words ``evaluation.save_samples`` takes besides a count.
SAVE_SAMPLES_WORDS = ("all", "none")


def saved_sample_count(save_samples: bool | int | str, n_samples: int) -> int:
    """How many of a run's first ``n_samples`` samples ``save_samples`` writes as PNGs.

    Example:
        >>> saved_sample_count("all", 100), saved_sample_count(16, 100), saved_sample_count(False, 100)
        (100, 16, 0)
    """
    if save_samples is True or save_samples == "all":
        return n_samples
    if save_samples is False or save_samples == "none":
        return 0
    return min(int(save_samples), n_samples)


@dataclass(frozen=True)
class EvaluationSpec:
    metrics: tuple[str, ...] = ("fd", "kid", "precision_recall", "sec_per_image", "unet_forwards", "flops",
                                "peak_memory", "sigma2_delta")
    feature_extractor: str = "efficientnet_lite0"
    feature_image_size: int = 224
    inception_weights: str | None = None
    clip_model: str | None = None
    reference: str | None = None
    n_reference: int = 10_000
    timing_batch_sizes: tuple[int, ...] = (1, 8)
    timing_repeats: int = 3
    timing_seeds: str = "all"
    # Rounds of the experiment's interleaved timing session (every variation timed back to back in
    # each round; speed-up criteria with a CI). 0 = none. An experiment-level setting, not a run's.
    timing_rounds: int = 0
    sigma2_delta_max: int = 10
    sigma2_samples: int = 256
    sigma2_blocks: str = "all"
    clip_drift_samples: int = 256
    # "cache_attribution" in metrics: fcr_sample.attribute_cache_error on each cached run's first
    # attribution_samples samples (its own weights, x_T and prompts); propagation = also the final
    # sample's error when only one step is served from the cache (one partial trajectory per step).
    attribution_samples: int = 32
    attribution_propagation: bool = True
    # The cached variations to attribute (None: every cached variation of the profile).
    attribution_variations: tuple[str, ...] | None = None
    kid_subset_size: int = 1000
    pr_k: int = 3
    # Which of a run's samples are written as PNGs: "all", "none", or the first N (an integer);
    # true / false are "all" / "none". The paired and set-level metrics never read the PNGs.
    save_samples: bool | int | str = "all"
    grid_per_class: int = 8


def load_evaluation(chk: Checker, raw: Any, datasets: dict[str, DatasetSpec]) -> EvaluationSpec:
    """``[evaluation]`` → :class:`EvaluationSpec`, checked."""
    evaluation = chk.build(EvaluationSpec, raw, "evaluation")
    for m in evaluation.metrics:
        chk.one_of(m, METRICS, "evaluation.metrics[]", "evaluation", "metrics")
    chk.one_of(evaluation.feature_extractor, EXTRACTORS, "evaluation.feature_extractor", "evaluation",
               "feature_extractor")
    chk.one_of(evaluation.timing_seeds, TIMING_SEEDS, "evaluation.timing_seeds", "evaluation", "timing_seeds")
    if any(b < 1 for b in evaluation.timing_batch_sizes):
        chk.fail("evaluation.timing_batch_sizes must be >= 1", "evaluation", "timing_batch_sizes")
    if evaluation.sigma2_delta_max < 1 or evaluation.sigma2_samples < 1 or evaluation.n_reference < 2:
        chk.fail("evaluation.sigma2_delta_max, sigma2_samples must be >= 1 and n_reference >= 2", "evaluation")
    chk.one_of(evaluation.sigma2_blocks, BLOCKS, "evaluation.sigma2_blocks", "evaluation", "sigma2_blocks")
    clip_metrics = [m for m in evaluation.metrics if m in ("clip_score", "clip_drift")]
    if clip_metrics and not evaluation.clip_model:
        chk.fail(f"evaluation.metrics has {clip_metrics}, which need evaluation.clip_model = a local CLIP folder "
                 "(transformers layout, e.g. a copy of openai/clip-vit-large-patch14)", "evaluation", "metrics")
    if evaluation.timing_rounds < 0:
        chk.fail(f"evaluation.timing_rounds = {evaluation.timing_rounds} must be >= 0 (0 = no interleaved timing)",
                 "evaluation", "timing_rounds")
    if evaluation.clip_drift_samples < 1:
        chk.fail("evaluation.clip_drift_samples must be >= 1", "evaluation", "clip_drift_samples")
    if evaluation.attribution_samples < 1:
        chk.fail(f"evaluation.attribution_samples = {evaluation.attribution_samples} must be >= 1 (the "
                 "samples of each cached run that the cache-error attribution walks)", "evaluation",
                 "attribution_samples")
    _check_save_samples(chk, evaluation.save_samples)
    dataset_ref(chk, datasets, evaluation.reference, "evaluation.reference", "evaluation", "reference",
                roles=("reference", "eval"))
    return evaluation


def _check_save_samples(chk: Checker, value) -> None:
    ok = isinstance(value, bool) or value in SAVE_SAMPLES_WORDS or (isinstance(value, int) and value >= 0)
    if not ok:
        chk.fail(f"evaluation.save_samples = {value!r} is not allowed; use \"all\", \"none\" or a count N >= 0 "
                 "(the first N samples of each run are written as PNGs)", "evaluation", "save_samples")


def check_attribution_variations(chk: Checker, evaluation: EvaluationSpec, samplers: Mapping[str, str]) -> None:
    """The cache-error attribution is asked of cached variations of this profile: its
    ``attribution_variations`` name variations, only with ``cache_attribution``, none of them
    uncached (there is no cache error to attribute), and not an empty list; with
    ``cache_attribution`` the experiment has a cached variation at all.

    Args:
        samplers: variation id → its sampler kind (``"none"`` = uncached).
    """
    named = evaluation.attribution_variations
    for val in named or ():
        chk.one_of(val, list(samplers), "evaluation.attribution_variations[]", "evaluation", "attribution_variations")
        if "cache_attribution" not in evaluation.metrics:
            chk.fail("evaluation.attribution_variations names the variations to attribute, but "
                     "\"cache_attribution\" is not in evaluation.metrics", "evaluation", "attribution_variations")
        if samplers[val] in ADAPTIVE_SAMPLERS:
            chk.fail(f"evaluation.attribution_variations names {val!r}, an adaptive cache (sampler = "
                     f"{samplers[val]!r}): its refresh steps are decided at run time, and the attribution needs the "
                     "schedule ahead. Name variations with a fixed schedule (fd, deepcache)",
                     "evaluation", "attribution_variations")
        elif samplers[val] not in CACHED_SAMPLERS:
            chk.fail(f"evaluation.attribution_variations names {val!r}, which samples without a cache (sampler = "
                     f"{samplers[val]!r}): there is no cache error to attribute. Name cached variations only",
                     "evaluation", "attribution_variations")
    if named is not None and not named:
        chk.fail("evaluation.attribution_variations = [] names no variation; leave it out to attribute every cached "
                 "variation, or name the ones to attribute", "evaluation", "attribution_variations")
    if "cache_attribution" in evaluation.metrics and not any(s in CACHED_SAMPLERS for s in samplers.values()):
        chk.fail("evaluation.metrics has \"cache_attribution\", but no variation of this profile uses a cache "
                 "(every sampler is 'none'): there is nothing to attribute", "evaluation", "metrics")
