"""Evaluating a run's samples: per-image values of one batch (quality features, prompt–class
hits, CLIPScores, CLIP drift against the same weights' uncached samples), then — on the main
process, from every finished batch — the run's metrics and store records.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from fcr_eval.plan.planner import PlannedRun
from fcr_eval.run.contexts import Prompts, RunContext
from fcr_eval.spec.experiment import Experiment
from fcr_eval.spec.names import safe_child
from fcr_eval.store import MetricRecord, PerPromptScore, SampleMetrics, SampleRecord

__all__ = ["QUALITY_METRICS", "quality_metric_names", "evaluate_batch", "alignment_metrics", "merge_batches",
           "run_metrics", "sample_metrics", "save_samples", "shard_prompts", "PER_SAMPLE"]

#: Set-level quality metrics computed from extracted features (the Fréchet distance is "fd"; an
#: experiment asking for "fid" gets it under its extractor's name).
QUALITY_METRICS = ("fd", "kid", "is", "precision_recall")


def quality_metric_names(metrics) -> tuple[str, ...]:
    """The set-level quality metrics an evaluation list asks for."""
    include = tuple(k for k in QUALITY_METRICS if k in metrics)
    if "fid" in metrics and "fd" not in include:
        include = ("fd", *include)
    return include


def shard_prompts(prompts: Prompts, idx: range) -> Prompts:
    """The prompts of one batch of a run."""
    sl = slice(idx.start, idx.stop)
    return dataclasses.replace(prompts, texts=prompts.texts[sl], ids=prompts.ids[sl],
                               labels=prompts.labels[sl] if prompts.labels is not None else None,
                               entries=prompts.entries[sl] if prompts.entries is not None else None)


def _to_png_arrays(images: torch.Tensor) -> np.ndarray:
    arr = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def save_samples(root: Path, exp: Experiment, run: PlannedRun, prompts: Prompts, images: torch.Tensor,
                 idx: range) -> list[SampleRecord]:
    """PNGs under results/samples/<experiment>/<variation>/s<seed>/, paths relative to the store."""
    from PIL import Image

    sdir = safe_child(root, "samples", exp.id, run.variation.id, f"s{run.seed}")  # ids never leave the root
    sdir.mkdir(parents=True, exist_ok=True)
    arr = _to_png_arrays(images)
    out = []
    for j, i in enumerate(idx):
        p = sdir / f"{i:05d}.png"
        Image.fromarray(arr[j]).save(p)
        label = prompts.classes[int(prompts.labels[i])] if prompts.labels is not None else None
        out.append(SampleRecord(prompt_id=prompts.ids[i], prompt=prompts.texts[i], seed=run.seed,
                                image_path=str(p.relative_to(root)), width=images.shape[-1],
                                height=images.shape[-2], class_label=label))
    return out


def evaluate_batch(ctx: RunContext, run: PlannedRun, prompts: Prompts, images: torch.Tensor, mine: range,
                   reference: torch.Tensor, reference_features=None) -> dict:
    """Per-image values of one batch, the samples ``mine`` of the run: quality features and logits, the
    prompted class's correctness and log-probability, CLIPScores, and the paired values against
    ``reference`` — the same weights' uncached samples of the batch from the same x_T and prompts
    (an uncached run passes its own images): cache error (pixel MSE, PSNR, distance in the quality
    extractor's space given ``reference_features``) and, for cached runs, CLIP drift of the first
    ``clip_drift_samples``."""
    from fcr_eval.metrics.paired import cache_error
    from fcr_eval.spec.vocabulary import CACHE_FEATURE_L2

    ev = ctx.exp.evaluation
    out: dict = {}
    if not len(mine):
        return out
    eval_imgs = ctx.evaluation_images(images)
    if quality_metric_names(ev.metrics) and ctx.reference is not None:
        f = ctx.extractor.extract(eval_imgs)
        out["features"], out["logits"] = f.features, f.logits
        if reference_features is None and reference is images:  # an uncached run: its own reference
            reference_features = f.features
    sl = slice(mine.start, mine.stop)
    if ctx.classifier is not None and prompts.labels is not None:
        from fcr_eval.metrics.class_agreement import CLASS_CORRECT, CLASS_LOGPROB, class_scores

        scores = class_scores(eval_imgs, prompts.labels[sl], ctx.classifier)
        out["class_hits"] = scores[CLASS_CORRECT].numpy()
        out[PER_SAMPLE + CLASS_LOGPROB] = scores[CLASS_LOGPROB].numpy()
    if ctx.clip is not None and "clip_score" in ev.metrics:
        out["clip_scores"] = ctx.clip.score(images, prompts.texts[sl])[1].numpy()
    errors = cache_error(images.numpy(), reference.numpy(), cached_features=out.get("features"),
                         reference_features=reference_features if out.get("features") is not None else None)
    out.update({PER_SAMPLE + k: v for k, v in errors.items() if k != CACHE_FEATURE_L2 or "features" in out})
    drift = clip_drift_range(run, mine, ev.clip_drift_samples)
    if run.sampler.cached and len(drift) and "clip_drift" in ev.metrics and ctx.clip is not None:
        from fcr_eval.metrics.clip_score import clip_embedding_drift

        out["clip_drift"] = clip_embedding_drift(ctx.clip, images[: len(drift)], reference[: len(drift)])[1].numpy()
    return out


#: Key prefix of the per-sample arrays a batch hands back for ``sample_metrics``.
PER_SAMPLE = "per_sample:"


def clip_drift_range(run: PlannedRun, mine: range, clip_drift_samples: int) -> range:
    """The images of batch ``mine`` that CLIP drift compares: the run's first ``clip_drift_samples``."""
    k = min(run.n_samples, int(clip_drift_samples))
    return range(mine.start, min(mine.stop, k))


def alignment_metrics(ctx: RunContext, hits, clip_scores, prompts: Prompts, n: int, ev
                       ) -> tuple[list[MetricRecord], list[PerPromptScore]]:
    """Prompt–class agreement and CLIPScore from the gathered per-image values."""
    metrics: list[MetricRecord] = []
    per_prompt: list[PerPromptScore] = []
    if hits is not None:
        metrics.append(MetricRecord("class_agreement", float(hits.mean()), ctx.classifier_name,
                                    ctx.classifier_preprocessing, n,
                                    {"classifier": ctx.classifier_description,
                                     "classifier_metadata": dict(getattr(ctx.classifier, "metadata", {}))}))
        per_prompt += [PerPromptScore("class_agreement", pid, float(h)) for pid, h in zip(prompts.ids, hits.tolist(),
                                                                                        strict=True)]
    if clip_scores is not None:
        metrics.append(MetricRecord("clip_score", float(clip_scores.mean()), ctx.clip.name, ctx.clip.preprocessing, n,
                                    {"model_path": ctx.clip.model_path,
                                     "formula": "mean over images of 100·max(cos(E_img, E_txt), 0)"}))
        per_prompt += [PerPromptScore("clip_score", pid, float(s)) for pid, s in zip(prompts.ids, clip_scores.tolist(),
                                                                                   strict=True)]
    return metrics, per_prompt


def merge_batches(records: list[dict]) -> dict:
    """One run's per-sample values from its finished batches' records (in batch order): each
    per-sample array concatenated in sample order; the FGSM records summed."""
    out: dict = {}
    keys = sorted({k for r in records for k in r["values"]})
    for key in keys:
        vals = [r["values"][key] for r in records if r["values"].get(key) is not None and len(r["values"][key])]
        if vals:
            out[key] = np.concatenate(vals)
    return out


def run_metrics(ctx: RunContext, run: PlannedRun, prompts: Prompts, values: dict, features=None, logits=None,
                fgsm_mse_sum: float = 0.0) -> tuple[list[MetricRecord], list[PerPromptScore]]:
    """The run's metrics from its per-sample ``values`` (:func:`merge_batches`) and its feature
    and logit spills (``(n, D)``, memory-mapped: the set-level metrics read them in chunks)."""
    from fcr_eval.metrics.extractors import ExtractedFeatures
    from fcr_eval.metrics.quality import quality_metrics
    from fcr_eval.run.sampling import attack_settings

    ev = ctx.exp.evaluation
    n = run.n_samples
    metrics: list[MetricRecord] = []
    include = quality_metric_names(ev.metrics)
    if include and ctx.reference is not None and features is not None:
        feats = ExtractedFeatures(features, logits, ctx.extractor.name, ctx.extractor.preprocessing)
        metrics += quality_metrics(ctx.reference, feats, reference=ctx.reference_name,
                                   kid_subset_size=min(ev.kid_subset_size, n), pr_k=ev.pr_k, seed=run.seed,
                                   include=include)
    m_align, per_prompt = alignment_metrics(ctx, values.get("class_hits"), values.get("clip_scores"), prompts, n, ev)
    metrics += m_align
    drift = values.get("clip_drift")
    if drift is not None:
        metrics.append(MetricRecord("clip_drift", float(drift.mean()), ctx.clip.name, ctx.clip.preprocessing,
                                    len(drift),
                                    {"definition": "mean 1 − cos(CLIP(img_cached), CLIP(img_no_cache)), same weights, "
                                                   "prompts and x_T", "model_path": ctx.clip.model_path}))
    # A stressed run's quality is compared with the unstressed variation's in the summary; the
    # protocol itself is stored in runs.params['robustness']. FGSM also records how far the
    # attack moved the images (mean squared difference of the [0, 1] images).
    if run.robustness.kind == "fgsm_latent":
        fg = attack_settings(run)
        metrics.append(MetricRecord("fgsm_image_mse", fgsm_mse_sum / max(fg["k"], 1), "none", "none", fg["k"],
                                    {"protocol": run.robustness.id, "fgsm_images": fg["k"], "epsilon": fg["epsilon"],
                                     "steps": fg["steps"], "random_start": True}))
    return metrics, per_prompt


def sample_metrics(ctx: RunContext, run: PlannedRun, prompts: Prompts, values: dict, reference: str
                   ) -> list[SampleMetrics]:
    """The run's per-sample values (``sample_metrics`` rows) from :func:`merge_batches`: cache error
    against ``reference`` (what the uncached twins were), the prompted class's correctness and
    log-probability, CLIPScore and CLIP drift. Rows pair across variations by (seed, sample index):
    every variation of one seed starts sample i from the same x_T and prompt."""
    from fcr_eval.metrics.class_agreement import CLASS_CORRECT
    from fcr_eval.spec.vocabulary import CACHE_FEATURE_L2, SAMPLE_METRICS

    per_sample: dict[str, np.ndarray] = {}
    for key in sorted(k for k in values if k.startswith(PER_SAMPLE)):
        per_sample[key[len(PER_SAMPLE):]] = values[key]
    for name, key in ((CLASS_CORRECT, "class_hits"), ("clip_score", "clip_scores"), ("clip_drift", "clip_drift")):
        if values.get(key) is not None:
            per_sample[name] = values[key]
    out = []
    for name, vals in per_sample.items():
        spec = SAMPLE_METRICS[name]
        if name == CACHE_FEATURE_L2:
            ext, prep = ctx.extractor.name, ctx.extractor.preprocessing
        elif name in ("clip_score", "clip_drift"):
            ext, prep = ctx.clip.name, ctx.clip.preprocessing
        elif name.startswith("class_"):
            ext, prep = ctx.classifier_name, ctx.classifier_preprocessing
        else:
            ext, prep = "none", "none"
        n = len(vals)
        out.append(SampleMetrics(name, vals, prompts.ids[:n], seeds=run.seed, sample_index=np.arange(n),
                                 reference=reference if spec.needs_reference else None, feature_extractor=ext,
                                 preprocessing=prep, details={"definition": spec.description}))
    return out
