"""The words an experiment file may use: sampler kinds, scheduler names, robustness protocols and
their settings, the directions of a threshold, and the per-sample metrics a contrast may name.

Each vocabulary is defined here once; the modules that act on a word (``plan.samplers`` builds a
sampler, ``run.schedulers`` a scheduler, ``metrics.robustness`` a perturbation) import it. This
module imports nothing, so the experiment schema loads without torch or DuckDB. Vocabularies owned
by the lower packages (fcr-sample's block groups and schedule names, fcr-train's distances, Δ
units and embedded model names) stay with them, in their torch-free ``vocabulary`` modules.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SAMPLERS", "CACHED_SAMPLERS", "SCHEDULERS", "ROBUSTNESS_PROTOCOLS", "PROTOCOL_SETTINGS",
           "DIRECTIONS", "METRICS", "REFERENCE_METRICS", "EXTRACTORS", "DATASET_KINDS", "DATASET_ROLES",
           "PACKAGED_DATASET_KINDS", "SD_PROMPT_KINDS", "SD_IMAGE_KINDS", "SAMPLING_DTYPES", "OPTIMIZERS",
           "MIXED_PRECISIONS", "EARLY_STOPPING_METRICS", "TIMING_SEEDS",
           "SampleMetricSpec", "SAMPLE_METRICS", "CACHE_MSE", "CACHE_PSNR", "CACHE_FEATURE_L2", "CLASS_CORRECT",
           "CLASS_LOGPROB", "SAME_WEIGHTS", "FIXED_WEIGHTS", "INDEPENDENT_FINETUNES", "SHARED_FINETUNE",
           "REPLICATIONS"]

#: Sampler kinds of an experiment variation: no cache, encoder caching (Faster Diffusion), DeepCache.
SAMPLERS = ("none", "fd", "deepcache")
#: The kinds that attach a cache hook to the UNet.
CACHED_SAMPLERS = ("fd", "deepcache")

#: Scheduler names of experiment files: DDIM (η = 0) and DPM-Solver++ (2nd-order multistep).
SCHEDULERS = ("ddim", "dpm-solver++")

#: Robustness protocols of exp-2 (``[variations.robustness] kind = ...``).
ROBUSTNESS_PROTOCOLS = ("none", "resolution", "schedule_perturbation", "fgsm_latent", "ood_prompts")
#: The settings each protocol takes in an experiment file.
PROTOCOL_SETTINGS: dict[str, frozenset[str]] = {
    "none": frozenset(), "resolution": frozenset({"resolution"}), "schedule_perturbation": frozenset({"std"}),
    "fgsm_latent": frozenset({"epsilon", "steps", "n_images"}), "ood_prompts": frozenset({"prompts"}),
}

#: What ``[evaluation] metrics = [...]`` may ask every run to compute.
METRICS = (
    "fd", "fid", "kid", "is", "precision_recall", "class_agreement", "clip_score", "sec_per_image",
    "unet_forwards", "flops", "peak_memory", "sigma2_delta", "finetune_compute", "robustness", "clip_drift",
    "cache_attribution",
)
#: The requested metrics that compare the samples with real reference images.
REFERENCE_METRICS = ("fd", "fid", "kid", "precision_recall", "sigma2_delta")
#: Feature extractors of the set-level quality metrics (``evaluation.feature_extractor``).
EXTRACTORS = ("efficientnet_lite0", "inception")
#: When the runs time themselves (``evaluation.timing_seeds``): every seed, or the first only.
TIMING_SEEDS = ("all", "first")

#: Data-set kinds of ``[[datasets]]`` and the roles a data set plays.
DATASET_KINDS = ("fashion-mnist", "emoji", "laion", "webdataset", "artbench", "coco", "flickr30k", "imagenet-classes")
DATASET_ROLES = ("finetune", "eval", "mini_val", "reference")
#: Data-set kinds that ship with a package: the runner reads the installed files, never ``path``.
PACKAGED_DATASET_KINDS = ("fashion-mnist", "emoji", "imagenet-classes")
#: What a Stable Diffusion run can read (fcr_eval.run.contexts): prompts from these kinds, real
#: reference images from these.
SD_PROMPT_KINDS = ("coco", "flickr30k", "imagenet-classes")
SD_IMAGE_KINDS = ("coco", "flickr30k", "laion", "artbench")

#: Sampling precisions (``sampling.dtype``).
SAMPLING_DTYPES = ("float32", "float16", "bfloat16")
#: Fine-tuning optimisers, mixed-precision modes and early-stopping metrics of ``[finetune]``.
OPTIMIZERS = ("adamw",)
MIXED_PRECISIONS = ("no", "fp16", "bf16")
EARLY_STOPPING_METRICS = ("fd_moving", "fid_moving")

#: ``at_least``: the value must be ≥ the threshold (speed-up, ΔCLIPScore); ``at_most``: ≤ (ΔFID, memory).
DIRECTIONS = ("at_least", "at_most")

#: Per-sample metric names (computed in :mod:`fcr_eval.metrics.paired` and
#: :mod:`fcr_eval.metrics.class_agreement`, stored in ``sample_metrics``).
CACHE_MSE = "cache_mse"
CACHE_PSNR = "cache_psnr"
CACHE_FEATURE_L2 = "cache_feature_l2"
# The classifier's per-sample scores (computed in :mod:`fcr_eval.metrics.class_agreement`).
CLASS_CORRECT = "class_correct"
CLASS_LOGPROB = "class_logprob"


@dataclass(frozen=True)
class SampleMetricSpec:
    """A per-sample metric: its name, what it is, and which way is better."""

    name: str
    description: str
    higher_is_better: bool
    needs_reference: bool = False  # compared against the same weights' uncached sample


#: The per-sample metric vocabulary (the names a ``[[contrasts]]`` entry may use).
SAMPLE_METRICS: dict[str, SampleMetricSpec] = {s.name: s for s in (
    SampleMetricSpec(CACHE_MSE, "pixel MSE to the same weights' uncached sample (images in [0, 1])", False, True),
    SampleMetricSpec(CACHE_PSNR, "PSNR in dB to the same weights' uncached sample (+inf when identical)", True, True),
    SampleMetricSpec(CACHE_FEATURE_L2, "L2 distance to the same weights' uncached sample in the quality "
                     "extractor's feature space", False, True),
    SampleMetricSpec(CLASS_CORRECT, "1 if the Fashion-MNIST classifier assigns the prompted class", True),
    SampleMetricSpec(CLASS_LOGPROB, "log-probability of the prompted class under the Fashion-MNIST classifier", True),
    SampleMetricSpec("clip_score", "CLIPScore of the sample against its prompt", True),
    SampleMetricSpec("clip_drift", "CLIP-embedding distance to the same weights' uncached sample", False, True),
)}

#: How the two sides of a contrast were replicated (decided by the plan, read by the analysis):
#: the same weights on both sides (a claim about the cache); different weights none of which were
#: fine-tuned (fixed models); fine-tuned weights with one independent fine-tune per seed (the seeds
#: are the unit of replication); or a fine-tune shared by every seed (its interval holds sampling
#: noise only and cannot decide a claim about the training method).
SAME_WEIGHTS = "same weights"
FIXED_WEIGHTS = "fixed weights"
INDEPENDENT_FINETUNES = "independent fine-tunes"
SHARED_FINETUNE = "shared fine-tune"
REPLICATIONS = (SAME_WEIGHTS, FIXED_WEIGHTS, INDEPENDENT_FINETUNES, SHARED_FINETUNE)
