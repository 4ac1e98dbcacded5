"""The experiment runner: plan → fine-tune → sample → evaluate → store, resumable.

:func:`run_experiment` executes every variation × seed of an :class:`~fcr_eval.experiment.Experiment`:

1. plans the runs (:mod:`fcr_eval.planner`) and checks that every model can be loaded and every
   local file it needs is there — a real model that is not on disk fails *before* any work with
   the "model not available" error, missing datasets / weights with one list of what is missing;
   the model family (embedded default or Stable Diffusion) is a :mod:`fcr_eval.contexts` context;
2. fine-tunes once per distinct fine-tune (``fcr_train.api.finetune``, run folder
   ``results/runs/<experiment>/finetune/<key>/``, resumed from its newest checkpoint);
3. per run: samples with the variation's cache (FD-k parallel or sequential, DeepCache, none) and
   scheduler (DDIM, DPM-Solver++), under its robustness stress; evaluates quality on labelled
   features against real images (Inception FID via clean-fid, or EfficientNet-Lite0 on the
   embedded default), prompt–class agreement or CLIPScore, CLIP-embedding drift of cached
   samplers, sec/img at the timing batch sizes, forward counters, FLOPs, peak memory, σ²_Δ for
   Δ = 1…Δ_max, the fine-tune compute fraction;
4. writes the run to the store in one transaction with its config, extractor, code version and
   device. Finished runs are skipped, so an interrupted experiment resumes where it stopped;
   a run killed midway leaves only files in its own folder, never rows.

Under ``accelerate launch`` / ``torchrun`` every process samples and evaluates its shard of each
run's prompts (:mod:`fcr_eval.distributed`); the main process gathers, measures cost on its own
device and is the only one that writes the store.

At the end it prints the summary table (mean ± 95 % CI over seeds), the success criteria, and
where the store and the plots are.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .contexts import Prompts, RunContext, make_context, make_sampling_scheduler
from .distributed import Processes
from .experiment import Experiment
from .planner import Plan, PlannedFinetune, PlannedRun, make_plan
from .store import (
    FeatureStat,
    MetricRecord,
    PerPromptScore,
    ResultsStore,
    RunRecord,
    RunResult,
    SampleRecord,
)
from .validation import check_inputs, check_models

__all__ = ["RunnerOptions", "Outcome", "run_experiment", "report", "summary_table",
           "execute_run", "sample_batch", "sample_prompts"]

logger = logging.getLogger(__name__)


@dataclass
class RunnerOptions:
    """Where to store, and how to run.

    Attributes:
        store: the DuckDB file; run folders, samples and plots go next to it.
        threads: torch CPU threads (``None`` = torch's default).
        plots: write the PNG plots at the end.
        device: ``cpu`` / ``cuda`` (``None`` = CUDA when present).
        progress: tqdm bars.
    """

    store: Path = Path("results/fcr.duckdb")
    threads: int | None = None
    plots: bool = True
    device: str | None = None
    progress: bool = True


@dataclass
class Outcome:
    ok: bool
    store: Path
    plots: list[Path] = field(default_factory=list)
    table: str = ""
    criteria: list = field(default_factory=list)
    wall_s: float = 0.0
    runs_done: int = 0
    runs_skipped: int = 0


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def sample_batch(unet, scheduler, x_T: torch.Tensor, cond: torch.Tensor, null: torch.Tensor, steps: int,
                 guidance: float, decode=None) -> torch.Tensor:
    """One sampling run from ``x_T`` (:func:`fcr_sample.denoise`); images in [0, 1]. ``decode`` maps
    the final state to images in [0, 1] (the VAE for latent models; default: pixels in [-1, 1]).
    Differentiable when called under grad."""
    from fcr_sample import denoise

    x = denoise(unet, scheduler, x_T, cond, null, steps=steps, guidance_scale=guidance)
    return decode(x) if decode is not None else (x.clamp(-1, 1) + 1) / 2


def _apply_sampler(unet, v) -> bool:
    from fcr_sample import (
        DeepCacheConfig,
        EncoderCacheConfig,
        apply_deep_cache,
        apply_encoder_cache,
    )

    if v.sampler == "fd":
        apply_encoder_cache(unet, EncoderCacheConfig(stride=v.stride, schedule=v.schedule,
                                                     parallel_decoding=v.parallel_decoding,
                                                     prior_noise_alpha=v.prior_noise_alpha))
        return True
    if v.sampler == "deepcache":
        apply_deep_cache(unet, DeepCacheConfig(cache_interval=v.stride, cache_branch_id=v.cache_branch_id))
        return True
    return False


def _remove_sampler(unet, v) -> None:
    from fcr_sample import remove_deep_cache, remove_encoder_cache

    if v.sampler == "fd":
        remove_encoder_cache(unet)
    elif v.sampler == "deepcache":
        remove_deep_cache(unet)


def _save_png(arr: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(arr).save(path)


def _to_png_arrays(images: torch.Tensor) -> np.ndarray:
    arr = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def sample_prompts(ctx: RunContext, unet, scheduler, prompts: Prompts, x_T: torch.Tensor, indices: range | int,
                   steps: int, guidance: float, batch_size: int, desc: str = "", progress: bool = False
                   ) -> torch.Tensor:
    """Images of prompts ``indices`` (a range, or ``n`` for the first n) from their initial noise,
    in batches (no grad), on the CPU."""
    from tqdm.auto import tqdm

    idx = range(indices) if isinstance(indices, int) else indices
    out = []
    with torch.no_grad():
        for i in tqdm(range(idx.start, idx.stop, batch_size), desc=desc, disable=not progress, leave=False):
            sl = slice(i, min(i + batch_size, idx.stop))
            c, nl = ctx.encode(prompts, sl)
            out.append(sample_batch(unet, scheduler, x_T[sl].to(ctx.device), c, nl, steps, guidance,
                                    decode=ctx.decode).float().cpu())
    if not out:
        return x_T[:0].float()
    return torch.cat(out)


# --------------------------------------------------------------------------------------------
# Fine-tuning
# --------------------------------------------------------------------------------------------


def run_finetune(ctx: RunContext, ft: PlannedFinetune, exp: Experiment, progress: bool = True,
                 procs: Processes | None = None) -> dict:
    """Fine-tune (or resume, or reuse a finished fine-tune); returns the run's summary dict. With
    several processes every one of them calls this (the trainer runs data-parallel on accelerate)."""
    from fcr_train.api import FinetuneConfig, finetune
    from fcr_train.loss import FCRConfig
    from fcr_train.trainer import TrainConfig

    out = Path(ft.output_dir)
    chosen = out / "fcr_eval_weights.json"  # written once the fine-tune is finished: the weights runs use
    if chosen.is_file():
        s = json.loads(chosen.read_text())
        if s.get("final_unet") and Path(s["final_unet"]).is_dir():
            logger.info("fine-tune %s already finished (%d steps), reusing %s", ft.key, s["steps"], s["final_unet"])
            return s
    spec = exp.finetune
    es = spec.early_stopping
    validation_fn = _moving_fd_validation(ctx, exp, es, out) if es is not None else None
    model, data, hflip = ctx.finetune_inputs(ft.data)
    cfg = FinetuneConfig(
        model=model, data=data,
        train=TrainConfig(
            output_dir=str(out), max_steps=ft.steps, batch_size=ft.batch_size, lr=ft.lr,
            weight_decay=spec.weight_decay, warmup_steps=spec.warmup_steps, ema_decay=spec.ema_decay,
            mixed_precision=spec.mixed_precision, checkpoint_every=spec.checkpoint_every, keep_checkpoints=2,
            validate_every=es.every if es else None, early_stopping_patience=es.patience if es else None,
            seed=ft.seed, hflip=hflip, cond_dropout=spec.cond_dropout, resume=True,
            progress=progress, cpu=ctx.device.type == "cpu",
            fcr=FCRConfig(lam=ft.lambda_fcr, delta_max=ft.delta_max, blocks=ft.blocks)),
    )
    logger.info("fine-tuning %s: λ=%g Δmax=%d blocks=%s, %d steps × batch %d (folder %s)", ft.key, ft.lambda_fcr,
                ft.delta_max, ft.blocks, ft.steps, ft.batch_size, out)
    t0 = time.perf_counter()
    result = finetune(cfg, validation_fn=validation_fn)
    s = result.to_dict()
    s["wall_time_s"] = time.perf_counter() - t0
    if result.best_checkpoint is not None:  # early stopping: sample the best weights (if still on disk)
        best = Path(result.best_checkpoint)
        for sub in ("unet_ema", "unet"):
            if (best / sub).is_dir():
                s["final_unet"] = str(best / sub)
                break
    if not s.get("final_unet"):
        raise RuntimeError(f"fine-tune {ft.key} produced no weights (see {out / 'train.log'})")
    if procs is None or procs.is_main:
        chosen.write_text(json.dumps(s, indent=2, default=str))
    if procs is not None:
        procs.barrier()
    return s


def _moving_fd_validation(ctx: RunContext, exp: Experiment, es, output_dir: Path):
    """``fn(unet, step)`` → moving mean (over ``window`` validations) of the Fréchet distance of
    ``mini_val_size`` samples (no cache) against the reference features. The history lives in the
    fine-tune's folder, so a resumed fine-tune continues the same window."""
    from .early_stopping import MovingValidation
    from .frechet import frechet_distance_from_features

    n = es.mini_val_size
    prompts = ctx.prompts(es.mini_val or exp.sampling.eval_prompts, n)
    res = ctx.sampling_resolution()
    x_T = ctx.initial_noise(n, res, 12345)

    def fd(unet, step: int) -> float:
        sched = make_sampling_scheduler(exp.sampling.scheduler, ctx.scheduler_config())
        imgs = sample_prompts(ctx, unet, sched, prompts, x_T, n, exp.sampling.num_inference_steps,
                              exp.sampling.guidance_scale, exp.sampling.batch_size)
        feats = ctx.extractor.extract(ctx.evaluation_images(imgs))
        value = frechet_distance_from_features(ctx.reference.features, feats.features)
        logger.info("step %d: mini-val FD %.3f (%s, %d samples)", step, value, ctx.extractor.name, n)
        return value

    return MovingValidation(fd, es.window, Path(output_dir) / "moving_fd_history.json")


# --------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------


def execute_run(ctx: RunContext, run: PlannedRun, exp: Experiment, store: ResultsStore | Path,
                finetunes: dict[str, dict], caches: dict, progress: bool = True,
                procs: Processes | None = None) -> RunResult | None:
    """Sample and evaluate one variation × seed; returns the store-ready :class:`RunResult` on the
    main process (``None`` on the others; nothing is written to the store here).

    With several processes each one samples and evaluates its shard of the prompts; the main
    process gathers the per-image results, measures cost on its own device and computes the
    metrics. ``store`` is the results store or, on processes that do not write, its folder (samples
    go under it). ``caches`` holds what runs share within one experiment (σ²_Δ per weights × seed,
    uncached reference samples for CLIP drift)."""
    from fcr_sample import get_cache_stats, reset_cache_stats
    from tqdm.auto import tqdm

    from .cost import (
        count_flops,
        describe_device,
        measure_peak_memory,
        time_per_image,
        to_timing_record,
    )
    from .extractors import ExtractedFeatures, metric_name
    from .mechanism import encoder_feature_variance
    from .provenance import code_version
    from .quality import quality_metrics
    from .robustness import RobustnessProtocol, fgsm_initial_latent, perturb_scheduler

    procs = procs or Processes()
    started = _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)
    v, ev = run.variation, exp.evaluation
    run_dir = Path(run.run_dir)
    if procs.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps({"run_id": run.run_id, **run.config}, indent=2, default=str))
    ft = finetunes.get(run.finetune) if run.finetune else None
    weights = Path(ft["final_unet"]) if ft else None
    unet = ctx.unet(weights)
    dev = ctx.device
    weights_key = str(weights) if weights else "base"
    rob = exp.robustness[v.robustness]
    n, bs = run.n_samples, exp.sampling.batch_size
    prompts = ctx.prompts(run.config["sampling"]["eval_prompts"], n, robustness=rob)
    res = run.resolution
    mine = procs.shard(n)

    # σ²_Δ depends on the weights and the seed only: computed once, before any cache is applied.
    feature_stats: list[FeatureStat] = []
    if "sigma2_delta" in ev.metrics and procs.is_main:
        key = ("sigma2", weights_key, run.seed)
        if key not in caches:
            z0, states = ctx.sigma2_inputs(ev.sigma2_samples, run.seed, ctx.sampling_resolution(), prompts.template)
            caches[key] = encoder_feature_variance(
                unet, z0, states, ctx.noise_scheduler, delta_max=ev.sigma2_delta_max,
                blocks=ev.sigma2_blocks, generator=torch.Generator().manual_seed(run.seed))
        feature_stats = caches[key]

    def new_scheduler():
        s = make_sampling_scheduler(run.scheduler, ctx.scheduler_config())
        if rob.kind == "schedule_perturbation":  # keeps DDIM finite when the perturbed ᾱ lose their order
            s = perturb_scheduler(s, std=float(rob.settings.get("std", 0.05)), seed=run.seed)
        return s

    if rob.kind not in ("none", "resolution", "fgsm_latent", "schedule_perturbation", "ood_prompts"):
        raise NotImplementedError(f"robustness protocol {rob.kind!r} is not implemented")
    scheduler = new_scheduler()
    x_T = ctx.initial_noise(n, res, run.seed)  # same x_T per seed across variations: paired
    cached = _apply_sampler(unet, v)
    local: dict = {"index": procs.index, "fgsm": None}
    timings = []
    try:
        if rob.kind == "fgsm_latent":
            k = min(n, int(rob.settings.get("n_images", n)))
            eps_, steps_ = float(rob.settings.get("epsilon", 0.1)), int(rob.settings.get("steps", 10))
            attacked = range(mine.start, min(mine.stop, k))
            mse = 0.0
            for i in tqdm(range(attacked.start, attacked.stop, bs), desc=f"{v.id} s{run.seed} FGSM",
                          disable=not progress, leave=False):
                sl = slice(i, min(i + bs, attacked.stop))
                c, nl = ctx.encode(prompts, sl)
                z = x_T[sl].to(dev)
                with torch.no_grad():
                    clean = sample_batch(unet, scheduler, z, c, nl, run.steps, run.guidance_scale, ctx.decode)

                def loss_fn(zz, c=c, nl=nl, clean=clean):
                    return (sample_batch(unet, scheduler, zz, c, nl, run.steps, run.guidance_scale,
                                         ctx.decode) - clean).pow(2).mean()

                z_adv = fgsm_initial_latent(loss_fn, z, epsilon=eps_, steps=steps_,
                                            generator=torch.Generator().manual_seed(run.seed * 100_003 + i))
                with torch.no_grad():
                    mse += float(loss_fn(z_adv)) * len(z)
                x_T[sl] = z_adv.cpu().to(x_T.dtype)
            local["fgsm"] = {"k": k, "epsilon": eps_, "steps": steps_, "mse_sum": mse}

        t_sample = time.perf_counter()
        images = sample_prompts(ctx, unet, scheduler, prompts, x_T, mine, run.steps, run.guidance_scale, bs,
                                desc=f"{v.id} s{run.seed}", progress=progress)
        local["sample_s"] = time.perf_counter() - t_sample

        # Cost (main process, its own device): timing at each batch size after warm-up, forward
        # counters, FLOPs and peak memory of ONE sampling run of that batch size.
        flops_per_image = None
        do_timing = (ev.timing_seeds == "all" or run.seed == exp.seeds[0]) and procs.is_main
        if do_timing and any(m in ev.metrics for m in ("sec_per_image", "flops", "peak_memory", "unet_forwards")):
            for b in ev.timing_batch_sizes:
                reps = -(-b // min(b, n))
                c, nl = ctx.encode(prompts, slice(0, min(b, n)))
                z = x_T[: min(b, n)].repeat(reps, *([1] * (x_T.ndim - 1)))[:b].to(dev)
                c = c.repeat(reps, 1, 1)[:b]
                nl = nl.repeat(reps, 1, 1)[:b]

                def fn(z=z, c=c, nl=nl):
                    with torch.no_grad():
                        return sample_batch(unet, scheduler, z, c, nl, run.steps, run.guidance_scale,
                                            ctx.decode)

                # The warm-up call doubles as the forward-count and peak-memory run (one sampling
                # run of b images), so timing adds only `timing_repeats` calls.
                if cached:
                    reset_cache_stats(unet)
                peak = measure_peak_memory(fn, dev) if "peak_memory" in ev.metrics else None
                if peak is None:
                    fn()
                counts = get_cache_stats(unet) if cached else {
                    "unet_calls": run.steps, "encoder_forwards": run.steps, "decoder_forwards": run.steps}
                timing = time_per_image(fn, b, warmup=0, repeats=ev.timing_repeats, device=dev)
                timing = dataclasses.replace(timing, warmup=1)
                if "flops" in ev.metrics and flops_per_image is None:  # per image: the same at every batch size
                    flops_per_image = count_flops(fn) / b
                timings.append(to_timing_record(timing, flops_per_image=flops_per_image, peak_memory=peak,
                                                forward_counts=counts))
    finally:
        _remove_sampler(unet, v)

    # Per-image evaluation of this process's shard.
    include = tuple(k for k in ("fd", "kid", "is", "precision_recall") if k in ev.metrics)
    if "fid" in ev.metrics and "fd" not in include:
        include = ("fd", *include)
    local["samples"] = []
    if len(mine):
        eval_imgs = ctx.evaluation_images(images)
        if include and ctx.reference is not None:
            f = ctx.extractor.extract(eval_imgs)
            local["features"], local["logits"] = f.features, f.logits
        local.update(_alignment_per_image(ctx, eval_imgs, images, prompts, mine, ev))
        if "clip_drift" in ev.metrics and ctx.clip is not None and v.sampler != "none":
            local["clip_drift"] = _clip_drift_per_image(ctx, unet, run, prompts, images, mine, weights_key, caches,
                                                        new_scheduler, progress)
        if ev.save_samples:
            root = store.root if isinstance(store, ResultsStore) else Path(store).resolve()
            local["samples"] = _save_samples(root, exp, run, prompts, images, mine)
    if procs.is_main:
        ctx.save_grid(images, _subset(prompts, mine), run_dir / "grid.png",
                      title=f"{exp.id} {v.id} seed {run.seed}")

    parts = procs.gather(local)
    if not procs.is_main:
        return None
    parts.sort(key=lambda p: p["index"])

    def joined(key: str):
        vals = [p[key] for p in parts if p.get(key) is not None and len(p[key])]
        return np.concatenate(vals) if vals else None

    metrics: list[MetricRecord] = []
    per_prompt: list[PerPromptScore] = []
    if include and ctx.reference is not None:
        feats = ExtractedFeatures(joined("features"), joined("logits"), ctx.extractor.name,
                                  ctx.extractor.preprocessing)
        metrics += quality_metrics(ctx.reference, feats, reference=ctx.reference_name,
                                   kid_subset_size=min(ev.kid_subset_size, n), pr_k=ev.pr_k, seed=run.seed,
                                   include=include)
    m_align, pp_align = _alignment_metrics(ctx, joined("class_hits"), joined("clip_scores"), prompts, n, ev)
    metrics += m_align
    per_prompt += pp_align
    drift = joined("clip_drift")
    if drift is not None:
        metrics.append(MetricRecord("clip_drift", float(drift.mean()), ctx.clip.name, ctx.clip.preprocessing,
                                    len(drift),
                                    {"definition": "mean 1 − cos(CLIP(img_cached), CLIP(img_no_cache)), same weights, "
                                                   "prompts and x_T", "model_path": ctx.clip.model_path}))
    # A stressed run's quality is compared with the unstressed variation's in the summary; the
    # protocol itself is stored in runs.params['robustness']. FGSM also records how far the
    # attack moved the images (mean squared difference of the [0, 1] images).
    if rob.kind == "fgsm_latent":
        fg = parts[0]["fgsm"]
        mse = sum(p["fgsm"]["mse_sum"] for p in parts) / max(fg["k"], 1)
        metrics.append(MetricRecord("fgsm_image_mse", mse, "none", "none", fg["k"],
                                    {"protocol": rob.id, "fgsm_images": fg["k"], "epsilon": fg["epsilon"],
                                     "steps": fg["steps"], "random_start": True}))
    if ft is not None and "finetune_compute" in ev.metrics:
        metrics.append(_finetune_fraction(ctx, ft, exp, run))
    wall = max(p["sample_s"] for p in parts)
    metrics.append(MetricRecord("sample_wall_s_per_image", wall / n, "none", "none", n,
                                {"batch_size": bs, "processes": procs.count,
                                 "note": "bulk sampling wall time (slowest process) incl. first-batch warm-up"}))
    shown = (metric_name("fd", ctx.extractor.name), "class_agreement", "clip_score", "clip_drift", "precision",
             "recall")
    logger.info("%s s%d: %s", v.id, run.seed, ", ".join(f"{m.metric}={m.value:.4g}" for m in metrics
                                                          if m.metric in shown))
    samples = [s for p in parts for s in p["samples"]]

    lam = v.lambda_fcr
    params = {**asdict(v), **RobustnessProtocol(rob.kind, dict(rob.settings)).as_params(),
              "robustness_id": rob.id, "n_samples": n, "finetune": ft and {k: ft.get(k) for k in
                                                                           ("run_dir", "steps", "final_unet",
                                                                            "stopped_early", "best_metric")},
              "weights": weights_key, "reference": ctx.reference_name, "prompts": prompts.source,
              "model_family": ctx.family, "dtype": exp.sampling.dtype, **procs.describe()}
    params.pop("process_index")
    record = RunRecord(
        run_id=run.run_id, experiment_id=exp.id, variation_id=v.id, seed=run.seed, model=ctx.source,
        dataset=prompts.source, sampler=v.sampler, scheduler=run.scheduler, resolution=res,
        num_inference_steps=run.steps, guidance_scale=run.guidance_scale, stride=v.stride,
        parallel_decoding=v.parallel_decoding if v.sampler == "fd" else None, lambda_fcr=lam,
        delta_max=(run.config["finetune"] or {}).get("delta_max") if lam is not None else None,
        blocks=(run.config["finetune"] or {}).get("blocks") if lam is not None else None,
        params=params, config=run.config, code_version=code_version(), device=describe_device(dev),
        started_at=started, finished_at=_dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None),
        run_dir=str(run_dir))
    return RunResult(record, metrics=metrics, per_prompt_scores=per_prompt, timings=timings,
                     feature_stats=list(feature_stats), samples=samples)


def _subset(prompts: Prompts, idx: range) -> Prompts:
    sl = slice(idx.start, idx.stop)
    return dataclasses.replace(prompts, texts=prompts.texts[sl], ids=prompts.ids[sl],
                               labels=prompts.labels[sl] if prompts.labels is not None else None)


def _save_samples(root: Path, exp: Experiment, run: PlannedRun, prompts: Prompts, images: torch.Tensor,
                  idx: range) -> list[SampleRecord]:
    """PNGs under results/samples/<experiment>/<variation>/s<seed>/, paths relative to the store."""
    sdir = root / "samples" / exp.id / run.variation.id / f"s{run.seed}"
    sdir.mkdir(parents=True, exist_ok=True)
    arr = _to_png_arrays(images)
    out = []
    for j, i in enumerate(idx):
        p = sdir / f"{i:05d}.png"
        _save_png(arr[j], p)
        label = prompts.classes[int(prompts.labels[i])] if prompts.labels is not None else None
        out.append(SampleRecord(prompt_id=prompts.ids[i], prompt=prompts.texts[i], seed=run.seed,
                                image_path=str(p.relative_to(root)), width=images.shape[-1],
                                height=images.shape[-2], class_label=label))
    return out


def _alignment_per_image(ctx: RunContext, eval_imgs: torch.Tensor, images: torch.Tensor, prompts: Prompts,
                         idx: range, ev) -> dict:
    """Per-image prompt–class hits (shipped classifier) and CLIPScores (local CLIP) of a shard."""
    out: dict = {}
    sl = slice(idx.start, idx.stop)
    if ctx.classifier is not None and prompts.labels is not None:
        from .class_agreement import class_agreement

        out["class_hits"] = class_agreement(eval_imgs, prompts.labels[sl], ctx.classifier)[1].numpy()
    if ctx.clip is not None and "clip_score" in ev.metrics:
        out["clip_scores"] = ctx.clip.score(images, prompts.texts[sl])[1].numpy()
    return out


def _alignment_metrics(ctx: RunContext, hits, clip_scores, prompts: Prompts, n: int, ev
                       ) -> tuple[list[MetricRecord], list[PerPromptScore]]:
    """Prompt–class agreement and CLIPScore from the gathered per-image values."""
    metrics: list[MetricRecord] = []
    per_prompt: list[PerPromptScore] = []
    if hits is not None:
        from .class_agreement import FEATURE_EXTRACTOR_NAME, PREPROCESSING

        metrics.append(MetricRecord("class_agreement", float(hits.mean()), FEATURE_EXTRACTOR_NAME, PREPROCESSING, n,
                                    {"classifier": "shipped Fashion-MNIST CNN (fcr_eval/weights)",
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


def _clip_drift_per_image(ctx: RunContext, unet, run: PlannedRun, prompts: Prompts, images: torch.Tensor,
                          idx: range, weights_key: str, caches: dict, new_scheduler, progress: bool) -> np.ndarray:
    """CLIP-embedding drift of a cached sampler for this shard's images among the first
    ``clip_drift_samples``: 1 − cos between CLIP image embeddings of its samples and of the same
    weights' samples without a cache (same prompts, same x_T)."""
    from .clip_score import clip_embedding_drift

    k = min(run.n_samples, int(run.config["evaluation"]["clip_drift_samples"]))
    mine = range(idx.start, min(idx.stop, k))
    if len(mine) == 0:
        return np.zeros(0)
    key = ("uncached", weights_key, run.seed, run.scheduler, run.steps, run.guidance_scale, run.resolution,
           run.variation.robustness, prompts.source, mine.start, mine.stop)
    if key not in caches:  # the no-cache samples of these weights, computed once per experiment
        x_T = ctx.initial_noise(len(prompts), run.resolution, run.seed)
        caches[key] = sample_prompts(ctx, unet, new_scheduler(), prompts, x_T, mine, run.steps, run.guidance_scale,
                                     ctx.exp.sampling.batch_size, desc=f"{run.variation.id} no-cache ref",
                                     progress=progress)
    return clip_embedding_drift(ctx.clip, images[: len(mine)], caches[key])[1].numpy()


def _finetune_fraction(ctx: RunContext, ft: dict, exp: Experiment, run: PlannedRun) -> MetricRecord:
    """Fine-tune compute ÷ the base model's pre-training compute, both as training FLOPs."""
    from .cost import finetune_compute_fraction, training_flops
    from .planner import model_cost

    cost = model_cost(exp, run.variation.model)
    fcfg = run.config["finetune"]
    steps = int(ft.get("steps") or fcfg["steps"])
    extra = cost.encoder_share * cost.flops_per_forward if fcfg["lambda_fcr"] > 0 else 0.0
    ft_flops = training_flops(cost.flops_per_forward, steps * fcfg["batch_size"],
                              extra_forward_flops_per_sample=extra)
    details = {"finetune_flops": ft_flops, "finetune_samples": steps * fcfg["batch_size"],
               "flops_per_forward_from": cost.source}
    pre_flops, how = ctx.pretrain_flops(cost.flops_per_forward)
    details.update(how)
    if pre_flops:
        details["pretrain_flops"] = pre_flops
        value = finetune_compute_fraction(ft_flops, pre_flops)
    else:
        value = float("nan")
    return MetricRecord("finetune_compute_fraction", value, "none", "none", 0, details)


# --------------------------------------------------------------------------------------------
# The whole experiment
# --------------------------------------------------------------------------------------------


def run_experiment(exp: Experiment, opts: RunnerOptions | None = None) -> Outcome:
    """Plan, fine-tune, sample, evaluate and store every variation × seed of ``exp``; resumable.

    Example:
        >>> run_experiment(load_experiment("experiments/mini-exp-1.toml", "quick"))
    """
    from tqdm.auto import tqdm

    opts = opts or RunnerOptions()
    t0 = time.perf_counter()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    want_cpu = opts.device == "cpu" or (opts.device is None and not torch.cuda.is_available())
    procs = Processes.from_environment(cpu=want_cpu)
    if procs.count > 1 and opts.device in (None, "cuda"):
        device = procs.device  # one device per process (accelerate / torchrun)
    else:
        device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    show = opts.progress and procs.is_main
    store_path = Path(opts.store)
    results_dir = store_path.parent
    plan = make_plan(exp, results_dir=results_dir, calibrate=False)
    check_models(exp)  # real models and local files: fail before any work
    check_inputs(exp, plan)
    store = ResultsStore(store_path) if procs.is_main else None  # the only writer
    done = procs.broadcast(store.finished_run_ids(exp.id) if store is not None else None)
    todo = [r for r in plan.runs if r.run_id not in done]
    skipped = len(plan.runs) - len(todo)
    if procs.is_main:
        print(f"{exp.id}{f' (profile {exp.profile})' if exp.profile else ''}: {len(plan.runs)} runs, "
              f"{skipped} already in {store_path}, {len(todo)} to do; {len(plan.finetunes)} fine-tune(s)"
              + (f"; {procs.count} processes" if procs.count > 1 else ""), flush=True)
    # One model at a time (exp-2 has two): its context holds the weights, text encoder and reference.
    by_model: dict[str, list[PlannedRun]] = {}
    for r in todo:
        by_model.setdefault(r.variation.model, []).append(r)
    bar = tqdm(total=len(todo), desc=f"{exp.id} runs", disable=not show)
    for model_id, runs in by_model.items():
        # The main process extracts and caches the reference features; the others then read them.
        if procs.is_main:
            ctx = make_context(exp, results_dir, device, model_id)
            procs.barrier()
        else:
            procs.barrier()
            ctx = make_context(exp, results_dir, device, model_id)
        finetunes: dict[str, dict] = {}
        for r in runs:
            if r.finetune and r.finetune not in finetunes:
                finetunes[r.finetune] = run_finetune(ctx, plan.finetunes[r.finetune], exp, progress=show,
                                                     procs=procs)
        caches: dict = {}
        for r in runs:
            t_run = time.perf_counter()
            result = execute_run(ctx, r, exp, store if store is not None else results_dir, finetunes, caches,
                                 progress=show, procs=procs)
            if procs.is_main:
                written = store.write_run(result)  # one transaction: the whole run or nothing
                logger.info("stored %s (%s) in %.0f s", r.run_id, "written" if written else "already there",
                            time.perf_counter() - t_run)
            procs.barrier()
            bar.update(1)
        del ctx, caches
    bar.close()
    if not procs.is_main:
        return Outcome(ok=True, store=store_path, runs_done=len(todo), runs_skipped=skipped)
    outcome = report(exp, store_path, plots=opts.plots, plan=plan)
    outcome.wall_s = time.perf_counter() - t0
    outcome.runs_done, outcome.runs_skipped = len(todo), skipped
    print(f"\nwall time {outcome.wall_s / 60:.1f} min ({len(todo)} runs executed, {skipped} skipped); "
          f"device {_device_text(device)}" + (f" × {procs.count} processes" if procs.count > 1 else ""), flush=True)
    return outcome


def _device_text(device: torch.device) -> str:
    from .cost import describe_device

    return describe_device(device)


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def _ci_text(values: list[float], digits: int = 3) -> str:
    from .stats import mean_ci

    vals = [float(x) for x in values if x is not None and np.isfinite(x)]
    if not vals:
        return "–"
    if len(vals) < 2:
        return f"{vals[0]:.{digits}g}"
    ci = mean_ci(vals)
    return f"{ci.mean:.{digits}g} ± {ci.half_width:.2g}"


def summary_table(exp: Experiment, store: ResultsStore) -> str:
    """Markdown table: one row per variation, mean ± 95 % CI half-width over seeds."""
    import polars as pl

    from .extractors import metric_name

    metrics = store.metrics(experiment_id=exp.id)
    timings = store.timings(experiment_id=exp.id)
    fstats = store.feature_stats(experiment_id=exp.id)
    ext = exp.evaluation.feature_extractor
    ms = exp.evaluation.metrics
    cols = [
        ("FID" if ext == "inception" else "FD (" + ext + ")", metric_name("fd", ext)),
        ("KID", metric_name("kid", ext)), ("precision", "precision"), ("recall", "recall"),
    ]
    if "class_agreement" in ms:
        cols.append(("class agr.", "class_agreement"))
    if "clip_score" in ms:
        cols.append(("CLIPScore", "clip_score"))
    if "clip_drift" in ms:
        cols.append(("CLIP drift", "clip_drift"))
    tb_sizes = list(exp.evaluation.timing_batch_sizes)
    head = ["variation", "seeds"] + [c for c, _ in cols] + [f"s/img b{b}" for b in tb_sizes] + [
        "UNet calls/enc/dec", "GFLOPs/img", "peak MB", "σ²_Δ mean"]
    rows = []
    for v in exp.variations:
        m = metrics.filter(pl.col("variation_id") == v.id) if metrics.height else metrics
        if m.height == 0:
            rows.append([v.id, "0"] + ["–"] * (len(head) - 2))
            continue
        seeds = sorted(set(m["seed"].to_list()))
        row = [v.id, str(len(seeds))]
        for _, name in cols:
            row.append(_ci_text(m.filter(pl.col("metric") == name)["value"].to_list()))
        t = timings.filter(pl.col("variation_id") == v.id) if timings.height else timings
        for b in tb_sizes:
            tb = t.filter(pl.col("batch_size") == b) if t.height else t
            row.append(_ci_text(tb["sec_per_image"].to_list()) if tb.height else "–")
        t1 = t.filter(pl.col("batch_size") == min(exp.evaluation.timing_batch_sizes)) if t.height else t
        if t1.height:
            r0 = t1.row(0, named=True)
            full = r0["encoder_forwards"]
            row.append(f"{r0['unet_calls']}/{full}/{r0['decoder_forwards']}")
            row.append(f"{r0['flops_per_image'] / 1e9:.2f}" if r0["flops_per_image"] else "–")
            row.append(f"{r0['peak_memory_bytes'] / 2**20:.0f}" if r0["peak_memory_bytes"] else "–")
        else:
            row += ["–", "–", "–"]
        f = fstats.filter((pl.col("variation_id") == v.id) & (pl.col("block") == "all")) if fstats.height else fstats
        if f.height:
            per_seed = f.group_by("seed").agg(pl.col("variance").mean())["variance"].to_list()
            row.append(_ci_text(per_seed))
        else:
            row.append("–")
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=False)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + " |" for r in rows]
    return "\n".join(lines)


def _table_notes(exp: Experiment) -> str:
    """What produced the table's numbers, in one paragraph under it."""
    ev = exp.evaluation
    ref = exp.datasets.get(ev.reference) if ev.reference else None
    ref_text = ref.description or ref.id if ref else ("real Fashion-MNIST test images" if exp.embedded else "–")
    if ev.feature_extractor == "inception":
        q = f"FID/KID/precision/recall: clean-fid Inception features ({ev.inception_weights}) vs {ref_text}"
    else:
        q = (f"FD/KID/precision/recall: EfficientNet-Lite0 features ({ev.feature_extractor}, "
             f"{ev.feature_image_size}²) vs {ref_text} — not Inception FID")
    parts = [q]
    if "class_agreement" in ev.metrics:
        parts.append("class agr.: shipped Fashion-MNIST classifier")
    if "clip_score" in ev.metrics:
        parts.append(f"CLIPScore: torchmetrics with the local CLIP {ev.clip_model}")
    if "clip_drift" in ev.metrics:
        parts.append("CLIP drift: mean 1 − cos of CLIP image embeddings, cached sampler vs no cache on the same "
                     "weights, prompts and noise")
    parts.append("s/img: device-synchronised after warm-up")
    parts.append("peak MB: CUDA peak allocated on GPU, process RSS on CPU")
    return "; ".join(parts) + "."


def criteria_table(results) -> str:
    lines = ["| criterion | verdict | value | threshold | note |", "|---|---|---|---|---|"]
    for r in results:
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[r.passed]
        value = "–" if r.value is None else f"{r.value:.4g}"
        note = r.details.get("reason", "") if isinstance(r.details, dict) else ""
        if not note and isinstance(r.details, dict):
            b, c = r.details.get("baseline_variation"), r.details.get("candidate_variation")
            note = f"{c} vs {b}" if b and c else ", ".join(r.details.get("variations", []) or [])
        lines.append(f"| {r.criterion} | {verdict} | {value} | {r.threshold:g} | {note} |")
    return "\n".join(lines)


def report(exp: Experiment, store_path: Path, *, plots: bool = True, plan: Plan | None = None) -> Outcome:
    """Print the summary table and the success criteria, write the plots; no sampling."""
    from .criteria import evaluate_store_criteria

    store = ResultsStore(store_path)
    table = summary_table(exp, store)
    print(f"\n## {exp.id}{f' (profile {exp.profile})' if exp.profile else ''}: mean ± 95% CI half-width over seeds\n")
    print(table)
    print("\n" + _table_notes(exp))
    crit = []
    if exp.criteria is not None:
        crit = evaluate_store_criteria(store, exp.id, exp.criteria)
        print("\n### success criteria (design.md §1)\n")
        print(criteria_table(crit))
    files: list[Path] = []
    if plots:
        from .plots import make_plots

        files = make_plots(exp, store, store.root / "plots" / exp.id)
    print(f"\nstore: {store_path}")
    if files:
        print(f"plots ({store.root / 'plots' / exp.id}):")
        for f in files:
            print(f"  {f}")
    ok = True
    return Outcome(ok=ok, store=store_path, plots=files, table=table, criteria=crit)
