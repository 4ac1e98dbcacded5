"""The experiment runner: plan → fine-tune → sample → evaluate → store, resumable.

:func:`run_experiment` executes every variation × seed of an :class:`~fcr_eval.experiment.Experiment`:

1. plans the runs (:mod:`fcr_eval.planner`) and checks that every model can be loaded — a real
   model that is not on disk fails *before* any work with the "model not available" error;
2. fine-tunes once per distinct fine-tune (``fcr_train.api.finetune``, run folder
   ``results/runs/<experiment>/finetune/<key>/``, resumed from its newest checkpoint);
3. per run: samples with the variation's cache (FD-k parallel or sequential, DeepCache, none) and
   scheduler (DDIM, DPM-Solver++), under its robustness stress; evaluates quality on labelled
   features against real images, prompt–class agreement, sec/img at the timing batch sizes,
   forward counters, FLOPs, peak memory, σ²_Δ for Δ = 1…Δ_max, the fine-tune compute fraction;
4. writes the run to the store in one transaction with its config, extractor, code version and
   device. Finished runs are skipped, so an interrupted experiment resumes where it stopped;
   a run killed midway leaves only files in its own folder, never rows.

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

__all__ = ["RunnerOptions", "Outcome", "run_experiment", "report", "summary_table", "check_models"]

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
# Models
# --------------------------------------------------------------------------------------------


def check_models(exp: Experiment) -> None:
    """Fail early, naming the model and how to point at a local copy, when a real (non-embedded)
    model of ``exp`` cannot be loaded here.

    Raises:
        fcr_train.models.ModelNotAvailableError
    """
    from fcr_train.models import ModelNotAvailableError, load_sd_components

    for m in exp.models.values():
        if m.embedded:
            continue
        try:
            load_sd_components(m.source)
        except ModelNotAvailableError as e:
            raise ModelNotAvailableError(
                f"experiment {exp.id}: model {m.id!r} ({m.source}) is not available. {e} "
                f"To use a local copy, set `source = \"/path/to/folder\"` for [[models]] id = {m.id!r} in {exp.path}."
            ) from e
    if not exp.embedded:
        raise NotImplementedError(
            f"{exp.id}: the models are available, but sampling Stable Diffusion pipelines in the runner "
            "(COCO / Flickr30k prompts, Inception FID, CLIPScore) is not implemented yet; the embedded "
            "experiments (mini-exp-1, mini-exp-2) run end to end")


class _Embedded:
    """Everything shared by the runs of an embedded experiment: base model, text states,
    feature extractor and reference features, classifier."""

    def __init__(self, exp: Experiment, results_dir: Path, device: torch.device):
        from fcr_train.api import TINY_EMBEDDED_UNET_CONFIG
        from fcr_train.embedded import build_unet, load_embedded_base

        self.exp, self.results_dir, self.device = exp, results_dir, device
        sources = {m.source for m in exp.models.values()}
        if len(sources) != 1:
            raise ValueError(f"{exp.id}: one embedded model per experiment, got {sorted(sources)}")
        self.source = sources.pop()
        self.base = load_embedded_base(random_init=self.source != "embedded")
        if self.source == "embedded-tiny":
            self.base.unet = build_unet(TINY_EMBEDDED_UNET_CONFIG)
        self.base_state = {k: v.detach().clone() for k, v in self.base.unet.state_dict().items()}
        self.unet_config = dict(self.base.unet.config)
        self._unet_key: str | None = None
        self._unet = None
        ev = exp.evaluation
        from .extractors import get_extractor

        kwargs = {"image_size": ev.feature_image_size} if ev.feature_extractor == "efficientnet_lite0" else {}
        self.extractor = get_extractor(ev.feature_extractor, device=device, weights_path=ev.inception_weights,
                                       **kwargs)
        self.classifier = None
        if "class_agreement" in ev.metrics:
            from .class_agreement import load_fashion_mnist_classifier

            self.classifier = load_fashion_mnist_classifier(device=device)
        self.reference = self._reference_features()

    # -- data ------------------------------------------------------------------------------------
    def real_images(self, split: str, n: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        from fcr_train.embedded import load_fashion_mnist

        imgs, labels = load_fashion_mnist(split)
        idx = (np.arange(n) + offset) % len(imgs)
        x = torch.from_numpy(imgs[idx]).float().div(255).unsqueeze(1)
        return x, torch.from_numpy(labels[idx])

    def _reference_features(self):
        from .quality import load_features, save_features

        ev = self.exp.evaluation
        ref = self.exp.datasets.get(ev.reference) if ev.reference else None
        split = (ref.split if ref and ref.split else "test")
        name = f"fashion-mnist-{split}-n{ev.n_reference}-{self.extractor.name}-{self.extractor.preprocessing}.npz"
        path = self.results_dir / "reference" / name
        feats = load_features(path, self.extractor)
        if feats is None:
            logger.info("extracting %s features of %d real Fashion-MNIST %s images (cached at %s)",
                        self.extractor.name, ev.n_reference, split, path)
            x, _ = self.real_images(split, ev.n_reference)
            feats = self.extractor.extract(x)
            save_features(path, feats, reference=f"fashion-mnist-{split}", n=ev.n_reference)
        self.reference_name = f"fashion-mnist-{split} (first {ev.n_reference} real images)"
        return feats

    # -- weights ---------------------------------------------------------------------------------
    def unet(self, weights: Path | None):
        """A fresh UNet (no hooks) with the base weights or a fine-tune's ``final_unet``."""
        from diffusers import UNet2DConditionModel

        key = str(weights) if weights else "base"
        if self._unet_key != key:
            if weights is None:
                from fcr_train.embedded import build_unet

                unet = build_unet(self.unet_config)
                unet.load_state_dict(self.base_state)
            else:
                unet = UNet2DConditionModel.from_pretrained(weights)
            self._unet, self._unet_key = unet.eval().to(self.device), key
        return self._unet


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def make_sampling_scheduler(kind: str):
    """DDIM (η = 0) or DPM-Solver++ (2nd order multistep) with the embedded noise schedule."""
    from fcr_train.embedded import make_scheduler

    ddim = make_scheduler("ddim")
    if kind == "ddim":
        return ddim
    if kind == "dpm-solver++":
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler.from_config(ddim.config, algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"unknown scheduler {kind!r}")


def sample_batch(unet, scheduler, x_T: torch.Tensor, cond: torch.Tensor, null: torch.Tensor, steps: int,
                 guidance: float, cached: bool) -> torch.Tensor:
    """One sampling run from ``x_T``; images in [0, 1]. A plain loop calling ``unet(...)`` once per
    step (CFG as one 2B batch), so fcr-sample caches on the UNet apply; ``cached`` starts a new
    cache run (required for caches on a bare UNet). Differentiable when called under grad."""
    from fcr_sample import start_sampling_run

    scheduler.set_timesteps(steps, device=x_T.device)
    if cached:
        start_sampling_run(unet, scheduler.timesteps)
    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        if guidance != 1.0:
            out = unet(torch.cat([inp, inp]), t, torch.cat([null, cond])).sample
            u, c = out.chunk(2)
            eps = u + guidance * (c - u)
        else:
            eps = unet(inp, t, cond).sample
        x = scheduler.step(eps, t, x).prev_sample
    return (x.clamp(-1, 1) + 1) / 2


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


def save_grid(images: torch.Tensor, labels: torch.Tensor, classes, path: Path, per_class: int = 8,
              title: str | None = None) -> Path:
    """A labelled grid: one row per class, ``per_class`` samples each (PNG, 3× nearest upscaling)."""
    from PIL import Image, ImageDraw

    arr = (images[:, 0].clamp(0, 1).numpy() * 255).round().astype("uint8")
    scale, pad, label_w, top = 3, 2, 84, 18 if title else 0
    h, w = arr.shape[1] * scale, arr.shape[2] * scale
    grid = Image.new("L", (label_w + per_class * (w + pad), top + len(classes) * (h + pad)), 255)
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((4, 3), title, fill=0)
    for c, name in enumerate(classes):
        idx = (labels == c).nonzero().flatten()[:per_class].tolist()
        y = top + c * (h + pad)
        draw.text((4, y + h // 2 - 6), name, fill=0)
        for j, i in enumerate(idx):
            grid.paste(Image.fromarray(arr[i]).resize((w, h), Image.NEAREST), (label_w + j * (w + pad), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


# --------------------------------------------------------------------------------------------
# Fine-tuning
# --------------------------------------------------------------------------------------------


def run_finetune(ctx: _Embedded, ft: PlannedFinetune, exp: Experiment, progress: bool = True) -> dict:
    """Fine-tune (or resume, or reuse a finished fine-tune); returns the run's summary dict."""
    from fcr_train.api import DataConfig, FinetuneConfig, finetune
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
    data = exp.datasets.get(ft.data) if ft.data else None
    es = spec.early_stopping
    validation_fn = None
    if es is not None:
        validation_fn = _moving_fd_validation(ctx, exp, es)
    cfg = FinetuneConfig(
        model=ctx.source,
        data=DataConfig(kind="fashion-mnist", split=(data.split if data and data.split else "train"),
                        limit=data.limit if data else None),
        train=TrainConfig(
            output_dir=str(out), max_steps=ft.steps, batch_size=ft.batch_size, lr=ft.lr,
            weight_decay=spec.weight_decay, warmup_steps=spec.warmup_steps, ema_decay=spec.ema_decay,
            mixed_precision=spec.mixed_precision, checkpoint_every=spec.checkpoint_every, keep_checkpoints=2,
            validate_every=es.every if es else None, early_stopping_patience=es.patience if es else None,
            seed=ft.seed, hflip=bool(data and data.hflip > 0), cond_dropout=spec.cond_dropout, resume=True,
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
    chosen.write_text(json.dumps(s, indent=2, default=str))
    return s


def _moving_fd_validation(ctx: _Embedded, exp: Experiment, es):
    """``fn(unet, step)`` → moving mean (over ``window`` validations) of the Fréchet distance of
    ``mini_val_size`` samples (no cache) against the reference features."""
    from .frechet import frechet_distance_from_features

    history: list[float] = []
    n = es.mini_val_size

    def fn(unet, step: int) -> float:
        labels = torch.arange(n) % len(ctx.base.classes)
        g = torch.Generator().manual_seed(12345)
        x_T = torch.randn((n, 1, ctx.unet_config["sample_size"], ctx.unet_config["sample_size"]), generator=g)
        sched = make_sampling_scheduler(exp.sampling.scheduler)
        imgs = []
        with torch.no_grad():
            for i in range(0, n, exp.sampling.batch_size):
                sl = slice(i, i + exp.sampling.batch_size)
                cond = ctx.base.class_states(labels[sl]).to(ctx.device)
                null = ctx.base.null_states.expand(len(cond), -1, -1).to(ctx.device)
                imgs.append(sample_batch(unet, sched, x_T[sl].to(ctx.device), cond, null,
                                         exp.sampling.num_inference_steps, exp.sampling.guidance_scale, False).cpu())
        feats = ctx.extractor.extract(torch.cat(imgs))
        history.append(frechet_distance_from_features(ctx.reference.features, feats.features))
        moving = float(np.mean(history[-es.window:]))
        logger.info("step %d: mini-val FD %.3f, moving FD (window %d) %.3f", step, history[-1], es.window, moving)
        return moving

    return fn


# --------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------


def _prompt_template_index(exp: Experiment, run: PlannedRun, ctx: _Embedded) -> int:
    ds_id = run.config["sampling"]["eval_prompts"]
    tpl = exp.datasets[ds_id].prompt_template if ds_id else None
    if tpl is None:
        return 0
    if tpl not in ctx.base.templates:
        raise ValueError(f"prompt template {tpl!r} has no precomputed text states; use one of {ctx.base.templates}")
    return ctx.base.templates.index(tpl)


def execute_run(ctx: _Embedded, run: PlannedRun, exp: Experiment, store: ResultsStore,
                finetunes: dict[str, dict], sigma_cache: dict, progress: bool = True) -> RunResult:
    """Sample and evaluate one variation × seed; returns the store-ready :class:`RunResult`
    (nothing is written to the store here)."""
    from fcr_sample import get_cache_stats, reset_cache_stats
    from tqdm.auto import tqdm

    from .class_agreement import FEATURE_EXTRACTOR_NAME, PREPROCESSING, class_agreement
    from .cost import (
        count_flops,
        describe_device,
        measure_peak_memory,
        time_per_image,
        to_timing_record,
    )
    from .extractors import metric_name
    from .mechanism import encoder_feature_variance
    from .provenance import code_version
    from .quality import quality_metrics
    from .robustness import (
        RobustnessProtocol,
        fgsm_initial_latent,
        perturb_scheduler,
        resize_images,
    )

    started = _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)
    v, ev = run.variation, exp.evaluation
    run_dir = Path(run.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps({"run_id": run.run_id, **run.config}, indent=2, default=str))
    ft = finetunes.get(run.finetune) if run.finetune else None
    weights = Path(ft["final_unet"]) if ft else None
    unet = ctx.unet(weights)
    dev = ctx.device
    weights_key = str(weights) if weights else "base"
    rob = exp.robustness[v.robustness]
    n, bs = run.n_samples, exp.sampling.batch_size
    classes = ctx.base.classes
    tpl = _prompt_template_index(exp, run, ctx)
    labels = torch.arange(n) % len(classes)

    # σ²_Δ depends on the weights and the seed only: computed once, before any cache is applied.
    feature_stats: list[FeatureStat] = []
    if "sigma2_delta" in ev.metrics:
        key = (weights_key, run.seed)
        if key not in sigma_cache:
            z0, zl = ctx.real_images("train", ev.sigma2_samples, offset=run.seed * ev.sigma2_samples)
            states = ctx.base.class_states(zl, template=tpl).to(dev)
            sigma_cache[key] = encoder_feature_variance(
                unet, (z0 * 2 - 1).to(dev), states, ctx.base.scheduler, delta_max=ev.sigma2_delta_max,
                blocks=ev.sigma2_blocks, generator=torch.Generator().manual_seed(run.seed))
        feature_stats = sigma_cache[key]

    scheduler = make_sampling_scheduler(run.scheduler)
    if rob.kind == "schedule_perturbation":
        # perturb_scheduler keeps DDIM finite when the perturbed ᾱ lose their order
        scheduler = perturb_scheduler(scheduler, std=float(rob.settings.get("std", 0.05)), seed=run.seed)
    elif rob.kind not in ("none", "resolution", "fgsm_latent"):
        raise NotImplementedError(f"robustness protocol {rob.kind!r} is not implemented for the embedded model")
    res = run.resolution
    gen = torch.Generator().manual_seed(run.seed)
    x_T = torch.randn((n, 1, res, res), generator=gen)  # same x_T per seed across variations: paired
    null_all = ctx.base.null_states
    cached = _apply_sampler(unet, v)
    details_rob: dict = {}
    try:
        def cond_of(sl):
            c = ctx.base.class_states(labels[sl], template=tpl).to(dev)
            return c, null_all.expand(len(c), -1, -1).to(dev)

        if rob.kind == "fgsm_latent":
            k = min(n, int(rob.settings.get("n_images", n)))
            eps_, steps_ = float(rob.settings.get("epsilon", 0.1)), int(rob.settings.get("steps", 10))
            adv, dev_mse = [], []
            for i in tqdm(range(0, k, bs), desc=f"{v.id} s{run.seed} FGSM", disable=not progress, leave=False):
                sl = slice(i, min(i + bs, k))
                c, nl = cond_of(sl)
                z = x_T[sl].to(dev)
                with torch.no_grad():
                    clean = sample_batch(unet, scheduler, z, c, nl, run.steps, run.guidance_scale, cached)

                def loss_fn(zz, c=c, nl=nl, clean=clean):
                    return (sample_batch(unet, scheduler, zz, c, nl, run.steps, run.guidance_scale, cached)
                            - clean).pow(2).mean()

                z_adv = fgsm_initial_latent(loss_fn, z, epsilon=eps_, steps=steps_)
                with torch.no_grad():
                    dev_mse.append(float(loss_fn(z_adv)) * len(z))
                adv.append(z_adv.cpu())
            x_T = torch.cat([torch.cat(adv), x_T[k:]]) if adv else x_T
            details_rob = {"fgsm_images": k, "epsilon": eps_, "steps": steps_,
                           "image_mse_vs_clean": sum(dev_mse) / max(k, 1)}

        images = []
        t_sample = time.perf_counter()
        with torch.no_grad():
            for i in tqdm(range(0, n, bs), desc=f"{v.id} s{run.seed}", disable=not progress, leave=False):
                sl = slice(i, i + bs)
                c, nl = cond_of(sl)
                images.append(sample_batch(unet, scheduler, x_T[sl].to(dev), c, nl, run.steps, run.guidance_scale,
                                           cached).cpu())
        sample_s = time.perf_counter() - t_sample
        images = torch.cat(images)

        # Cost: timing at each batch size after warm-up, forward counters, FLOPs and peak memory
        # of ONE sampling run of that batch size.
        timings = []
        flops_per_image = None
        do_timing = ev.timing_seeds == "all" or run.seed == exp.seeds[0]
        if do_timing and any(m in ev.metrics for m in ("sec_per_image", "flops", "peak_memory", "unet_forwards")):
            for b in ev.timing_batch_sizes:
                sl = slice(0, b)
                c, nl = cond_of(sl)
                z = x_T[sl].repeat(max(1, -(-b // max(1, len(x_T[sl])))), 1, 1, 1)[:b].to(dev)
                c = c.repeat(-(-b // len(c)), 1, 1)[:b]
                nl = nl.repeat(-(-b // len(nl)), 1, 1)[:b]

                def fn(z=z, c=c, nl=nl):
                    with torch.no_grad():
                        return sample_batch(unet, scheduler, z, c, nl, run.steps, run.guidance_scale, cached)

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
                flops = flops_per_image
                timings.append(to_timing_record(timing, flops_per_image=flops, peak_memory=peak,
                                                forward_counts=counts))
    finally:
        _remove_sampler(unet, v)

    # Quality on labelled features of 28² images (higher-resolution samples are resized first).
    eval_imgs = resize_images(images, ctx.unet_config["sample_size"]) if res != ctx.unet_config["sample_size"] \
        else images
    metrics: list[MetricRecord] = []
    per_prompt: list[PerPromptScore] = []
    include = tuple(k for k, m in (("fd", "fd"), ("kid", "kid"), ("is", "is"), ("precision_recall",
                                                                                 "precision_recall"))
                    if m in ev.metrics)
    if include:
        feats = ctx.extractor.extract(eval_imgs)
        metrics += quality_metrics(ctx.reference, feats, reference=ctx.reference_name,
                                   kid_subset_size=min(ev.kid_subset_size, n), pr_k=ev.pr_k, seed=run.seed,
                                   include=include)
    if ctx.classifier is not None:
        value, hits = class_agreement(eval_imgs, labels, ctx.classifier)
        metrics.append(MetricRecord("class_agreement", value, FEATURE_EXTRACTOR_NAME, PREPROCESSING, n,
                                    {"classifier": "shipped Fashion-MNIST CNN (fcr_eval/weights)",
                                     "classifier_metadata": dict(getattr(ctx.classifier, "metadata", {}))}))
        per_prompt += [PerPromptScore("class_agreement", f"{i:05d}", float(h)) for i, h in enumerate(hits.tolist())]
    # A stressed run's quality is compared with the unstressed variation's in the summary; the
    # protocol itself is stored in runs.params['robustness']. FGSM also records how far the
    # attack moved the images (mean squared difference of the [0, 1] images).
    if rob.kind == "fgsm_latent":
        metrics.append(MetricRecord("fgsm_image_mse", details_rob["image_mse_vs_clean"], "none", "none",
                                    details_rob["fgsm_images"], {"protocol": rob.id, **details_rob}))
    if ft is not None and "finetune_compute" in ev.metrics:
        metrics.append(_finetune_fraction(ctx, ft, exp, run))
    metrics.append(MetricRecord("sample_wall_s_per_image", sample_s / n, "none", "none", n,
                                {"batch_size": bs, "note": "bulk sampling incl. first-batch warm-up"}))
    fd_name = metric_name("fd", ctx.extractor.name)
    logger.info("%s s%d: %s", v.id, run.seed, ", ".join(f"{m.metric}={m.value:.4g}" for m in metrics
                                                          if m.metric in (fd_name, "class_agreement", "precision",
                                                                          "recall")))

    # Samples: PNGs under results/samples/<experiment>/<variation>/s<seed>/, paths relative to the store.
    samples: list[SampleRecord] = []
    if ev.save_samples:
        sdir = store.root / "samples" / exp.id / v.id / f"s{run.seed}"
        sdir.mkdir(parents=True, exist_ok=True)
        arr = (images[:, 0].numpy() * 255).round().astype("uint8")
        for i in range(n):
            p = sdir / f"{i:05d}.png"
            _save_png(arr[i], p)
            samples.append(SampleRecord(prompt_id=f"{i:05d}", prompt=ctx.base.templates[tpl].format(classes[labels[i]]),
                                        seed=run.seed, image_path=str(p.relative_to(store.root)),
                                        width=res, height=res, class_label=classes[labels[i]]))
    save_grid(images, labels, classes, run_dir / "grid.png", per_class=ev.grid_per_class,
              title=f"{exp.id} {v.id} seed {run.seed}")

    lam = v.lambda_fcr
    params = {**asdict(v), **RobustnessProtocol(rob.kind, dict(rob.settings)).as_params(),
              "robustness_id": rob.id, "n_samples": n, "finetune": ft and {k: ft.get(k) for k in
                                                                           ("run_dir", "steps", "final_unet",
                                                                            "stopped_early", "best_metric")},
              "weights": weights_key, "reference": ctx.reference_name}
    record = RunRecord(
        run_id=run.run_id, experiment_id=exp.id, variation_id=v.id, seed=run.seed, model=exp.models[v.model].source,
        dataset="fashion-mnist", sampler=v.sampler, scheduler=run.scheduler, resolution=res,
        num_inference_steps=run.steps, guidance_scale=run.guidance_scale, stride=v.stride,
        parallel_decoding=v.parallel_decoding if v.sampler == "fd" else None, lambda_fcr=lam,
        delta_max=(run.config["finetune"] or {}).get("delta_max") if lam is not None else None,
        blocks=(run.config["finetune"] or {}).get("blocks") if lam is not None else None,
        params=params, config=run.config, code_version=code_version(), device=describe_device(dev),
        started_at=started, finished_at=_dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None),
        run_dir=str(run_dir))
    return RunResult(record, metrics=metrics, per_prompt_scores=per_prompt, timings=timings,
                     feature_stats=list(feature_stats), samples=samples)


def _finetune_fraction(ctx: _Embedded, ft: dict, exp: Experiment, run: PlannedRun) -> MetricRecord:
    """Fine-tune compute ÷ the base model's pre-training compute, both as training FLOPs."""
    from .cost import finetune_compute_fraction, training_flops
    from .planner import model_cost

    cost = model_cost(exp, run.variation.model)
    fcfg = run.config["finetune"]
    steps = int(ft.get("steps") or fcfg["steps"])
    extra = cost.encoder_share * cost.flops_per_forward if fcfg["lambda_fcr"] > 0 else 0.0
    ft_flops = training_flops(cost.flops_per_forward, steps * fcfg["batch_size"],
                              extra_forward_flops_per_sample=extra)
    prov = ctx.base.provenance or {}
    pre = (prov.get("pretrain_config") or {}).get("train") or {}
    pre_steps = prov.get("steps") or pre.get("max_steps")
    pre_batch = pre.get("batch_size")
    details = {"finetune_flops": ft_flops, "finetune_samples": steps * fcfg["batch_size"]}
    if pre_steps and pre_batch:
        pre_flops = training_flops(cost.flops_per_forward, pre_steps * pre_batch)
        value = finetune_compute_fraction(ft_flops, pre_flops)
        details.update(pretrain_flops=pre_flops, pretrain_samples=pre_steps * pre_batch,
                       pretrain_from="base weights' command.json")
    else:
        value = float("nan")
        details["reason"] = "base weights carry no pre-training record (command.json)"
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
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    store_path = Path(opts.store)
    results_dir = store_path.parent
    plan = make_plan(exp, results_dir=results_dir, calibrate=False)
    check_models(exp)  # real models: fail before any work
    store = ResultsStore(store_path)
    done = store.finished_run_ids(exp.id)
    todo = [r for r in plan.runs if r.run_id not in done]
    skipped = len(plan.runs) - len(todo)
    print(f"{exp.id}{f' (profile {exp.profile})' if exp.profile else ''}: {len(plan.runs)} runs, "
          f"{skipped} already in {store_path}, {len(todo)} to do; {len(plan.finetunes)} fine-tune(s)", flush=True)
    if todo:
        ctx = _Embedded(exp, results_dir, device)
        needed = []
        for r in todo:
            if r.finetune and r.finetune not in needed:
                needed.append(r.finetune)
        finetunes: dict[str, dict] = {}
        for key in needed:
            finetunes[key] = run_finetune(ctx, plan.finetunes[key], exp, progress=opts.progress)
        sigma_cache: dict = {}
        for r in tqdm(todo, desc=f"{exp.id} runs", disable=not opts.progress):
            t_run = time.perf_counter()
            result = execute_run(ctx, r, exp, store, finetunes, sigma_cache, progress=opts.progress)
            written = store.write_run(result)  # one transaction: the whole run or nothing
            logger.info("stored %s (%s) in %.0f s", r.run_id, "written" if written else "already there",
                        time.perf_counter() - t_run)
    outcome = report(exp, store_path, plots=opts.plots, plan=plan)
    outcome.wall_s = time.perf_counter() - t0
    outcome.runs_done, outcome.runs_skipped = len(todo), skipped
    print(f"\nwall time {outcome.wall_s / 60:.1f} min ({len(todo)} runs executed, {skipped} skipped); "
          f"device {_device_text(device)}", flush=True)
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
    cols = [
        ("FD (" + ext + ")", metric_name("fd", ext)), ("KID", metric_name("kid", ext)),
        ("precision", "precision"), ("recall", "recall"), ("class agr.", "class_agreement"),
    ]
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
    print("\nFD/KID/precision/recall: EfficientNet-Lite0 features vs real Fashion-MNIST test images "
          f"({exp.evaluation.feature_extractor}, {exp.evaluation.feature_image_size}²) — not Inception FID; "
          "class agr.: shipped Fashion-MNIST classifier; s/img: device-synchronised after warm-up; "
          "peak MB: process RSS on CPU.")
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
