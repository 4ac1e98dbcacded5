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

__all__ = ["SamplerKind", "SAMPLER_KINDS", "SAMPLERS", "CACHED_SAMPLERS", "INTERVAL_SAMPLERS", "ADAPTIVE_SAMPLERS", "SCHEDULERS", "ROBUSTNESS_PROTOCOLS", "PROTOCOL_SETTINGS",
           "DIRECTIONS", "METRICS", "REFERENCE_METRICS", "EXTRACTORS", "DATASET_KINDS", "DATASET_ROLES",
           "PACKAGED_DATASET_KINDS", "SD_PROMPT_KINDS", "SD_IMAGE_KINDS", "SAMPLING_DTYPES", "OPTIMIZERS",
           "MIXED_PRECISIONS", "EARLY_STOPPING_METRICS", "TIMING_SEEDS",
           "MetricSpec", "METRIC_REGISTRY", "metric_spec", "SAMPLE_METRICS", "CACHE_MSE", "CACHE_PSNR", "CACHE_FEATURE_L2", "CLASS_CORRECT",
           "CLASS_LOGPROB", "SAME_WEIGHTS", "FIXED_WEIGHTS", "INDEPENDENT_FINETUNES", "SHARED_FINETUNE",
           "REPLICATIONS"]

@dataclass(frozen=True)
class SamplerKind:
    """A sampler kind a variation may name (``sampler = "..."``): the registry's row.

    Attributes:
        name: the word in the experiment file.
        description: what it is, in a line.
        module: the module under :mod:`fcr_eval.plan.caches` that builds, attaches and counts it
            (``None``: no cache).
        interval: whether it takes a uniform ``stride`` (its key-step stride / cache interval).
        threshold: whether it takes a ``threshold`` (an adaptive cache's refresh threshold).
    """

    name: str
    description: str
    module: str | None = None
    interval: bool = True
    threshold: bool = False


#: The sampler kinds, one row each; a new cache kind is one row here and one module in
#: :mod:`fcr_eval.plan.caches`.
SAMPLER_KINDS: dict[str, SamplerKind] = {k.name: k for k in (
    SamplerKind("none", "no cache: every step runs the whole UNet", interval=False),
    SamplerKind("fd", "Faster Diffusion: the encoder runs at key steps only, its features reused in between", "fd"),
    SamplerKind("deepcache", "DeepCache: a deep up-block feature reused, only the shallow path rerun in between",
                "deepcache"),
    SamplerKind("adaptive-deepcache", "DeepCache refreshed when conv_in's accumulated relative change reaches "
                "`threshold`", "adaptive_deepcache", interval=False, threshold=True),
    SamplerKind("adaptive-fd", "Faster Diffusion's encoder refreshed when conv_in's accumulated relative change "
                "reaches `threshold` (sequential decoding)", "adaptive_fd", interval=False, threshold=True),
)}
#: Sampler kinds of an experiment variation: no cache, encoder caching (Faster Diffusion), DeepCache, and
#: their adaptive forms.
SAMPLERS = tuple(SAMPLER_KINDS)
#: The kinds that attach a cache hook to the UNet.
CACHED_SAMPLERS = tuple(name for name, k in SAMPLER_KINDS.items() if k.module is not None)
#: The cached kinds that take a uniform ``stride``.
INTERVAL_SAMPLERS = tuple(name for name in CACHED_SAMPLERS if SAMPLER_KINDS[name].interval)
#: The cached kinds that take a ``threshold`` (adaptive caches).
ADAPTIVE_SAMPLERS = tuple(name for name in CACHED_SAMPLERS if SAMPLER_KINDS[name].threshold)

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
#: The prompt-adherence classifier of each embedded backbone (``ModelSpec.backbone``), as reports name it.
CLASSIFIERS = {"fashion-mnist": "shipped Fashion-MNIST classifier (10 classes)",
               "emoji": "shipped emoji-group classifier (9 Unicode groups, fcr_eval.metrics.emoji_groups)"}


@dataclass(frozen=True)
class MetricSpec:
    """A stored metric: the registry's row, which the report, the criteria board and the explorer
    read for its title, its direction and what it compares with.

    Attributes:
        name: the name it is stored under (``metrics.metric``, ``sample_metrics.metric`` or a
            ``timings`` column).
        label: what it is, as charts and the explorer title it.
        higher_is_better: its direction.
        needs_reference: it compares the samples with something else — real reference images
            (set-level) or the same weights' uncached sample (per sample).
        per_sample: one value per generated sample (``sample_metrics``; a contrast may name it).
        short: a table column's title (default: ``label``).
        description: what a value means, in a line.
        per_sample_form: the per-sample metric a set-level one is the mean of (paired criteria use it).
    """

    name: str
    label: str
    higher_is_better: bool
    needs_reference: bool = False
    per_sample: bool = False
    short: str = ""
    description: str = ""
    per_sample_form: str | None = None

    @property
    def title(self) -> str:
        """The table column's title."""
        return self.short or self.label

    @property
    def direction(self) -> str:
        """``"higher"`` or ``"lower"`` (is better)."""
        return "higher" if self.higher_is_better else "lower"


_M = MetricSpec
#: Every metric the toolkit stores, one row each: the one place its title, direction and
#: reference are stated (a set-level metric of another feature extractor resolves by its family:
#: :func:`metric_spec`).
METRIC_REGISTRY: dict[str, MetricSpec] = {m.name: m for m in (
    # per sample (sample_metrics; fcr_eval.metrics.paired and .class_agreement compute them)
    _M(CACHE_MSE, "cache error (pixel MSE to the uncached sample)", False, True, True, "cache MSE",
       "pixel MSE to the same weights' uncached sample (images in [0, 1])"),
    _M(CACHE_PSNR, "cache PSNR (dB, to the uncached sample)", True, True, True, "cache PSNR dB",
       "PSNR in dB to the same weights' uncached sample (+inf when identical)"),
    _M(CACHE_FEATURE_L2, "cache error in feature space (L2 to the uncached sample)", False, True, True,
       "cache feat. L2", "L2 distance to the same weights' uncached sample in the quality extractor's feature space"),
    _M(CLASS_CORRECT, "prompted class recognised (per sample)", True, False, True, "class correct",
       "1 if the backbone's shipped classifier assigns the prompted class"),
    _M(CLASS_LOGPROB, "log p(prompted class)", True, False, True, "class log-prob",
       "log-probability of the prompted class under the backbone's shipped classifier"),
    _M("clip_score", "CLIPScore", True, False, True, "CLIPScore", "CLIPScore of the sample against its prompt",
       per_sample_form="clip_score"),
    _M("clip_drift", "CLIP drift (1 − cos, cached vs no cache)", False, True, True, "CLIP drift",
       "CLIP-embedding distance to the same weights' uncached sample"),
    # set level (metrics)
    _M("fd_efficientnet_lite0", "FD (EfficientNet-Lite0 features)", False, True, short="FD (efficientnet_lite0)"),
    _M("kid_efficientnet_lite0", "KID (EfficientNet-Lite0 features)", False, True, short="KID"),
    _M("is_efficientnet_lite0", "IS (EfficientNet-Lite0 logits)", True, short="IS"),
    _M("fid_inception", "FID (Inception)", False, True, short="FID"),
    _M("kid_inception", "KID (Inception)", False, True, short="KID"),
    _M("inception_score", "Inception Score", True, short="IS"),
    _M("precision", "precision (k-NN manifold of the reference)", True, True, short="precision"),
    _M("recall", "recall (k-NN manifold of the samples)", True, True, short="recall"),
    _M("class_agreement", "class agreement", True, short="class agr.", per_sample_form=CLASS_CORRECT),
    _M("fgsm_image_mse", "FGSM image MSE vs clean", False, True),
    _M("finetune_compute_fraction", "fine-tune compute / pre-training compute", False),
    _M("sample_wall_s_per_image", "bulk sampling wall time / image", False),
    _M("feature_variance", "σ²_Δ (mean over Δ)", False, short="σ²_Δ mean"),
    # timings (a run's timings rows; the interleaved session's mean)
    _M("sec_per_image", "seconds / image", False, short="s/img"),
    _M("sec_per_image_interleaved", "seconds / image (interleaved session)", False, short="s/img"),
    _M("peak_memory_bytes", "peak memory (bytes)", False, short="peak MB"),
    _M("flops_per_image", "FLOPs / image", False, short="GFLOPs/img"),
    _M("unet_calls", "UNet calls", False),
    _M("encoder_forwards", "encoder forwards", False),
    _M("decoder_forwards", "decoder forwards", False),
)}

#: Families of set-level metrics named ``<family>_<extractor>`` (any feature extractor).
_FAMILIES = {"fd_": ("FD", False, True), "fid_": ("FID", False, True), "kid_": ("KID", False, True),
             "is_": ("IS", True, False)}


def metric_spec(name: str) -> MetricSpec | None:
    """The registry's row for a stored metric name; ``<family>_<extractor>`` names of another
    extractor resolve by their family (FD, FID, KID, IS); ``None`` for a name it does not know."""
    if name in METRIC_REGISTRY:
        return METRIC_REGISTRY[name]
    for prefix, (family, higher, reference) in _FAMILIES.items():
        if name.startswith(prefix):
            extractor = name[len(prefix):]
            return MetricSpec(name, f"{family} ({extractor} features)", higher, reference, short=f"{family} ({extractor})")
    return None


#: The per-sample metric vocabulary (the names a ``[[contrasts]]`` entry may use).
SAMPLE_METRICS: dict[str, MetricSpec] = {n: m for n, m in METRIC_REGISTRY.items() if m.per_sample}

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
