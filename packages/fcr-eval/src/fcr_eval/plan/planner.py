"""The plan of an experiment: which fine-tunes and which runs (variation × seed), their run ids
and folders, resolved once into the typed objects the runner executes, with their estimated compute.

Fine-tunes are shared: every variation that needs the same weights (model, λ, Δ_max, blocks,
data, steps, and the seed when ``finetune.per_seed``) points at one :class:`PlannedFinetune`, so
a stride sweep fine-tunes once.

The plan's other concerns have their own modules: what enters a run id and a fine-tune key is
:mod:`~fcr_eval.plan.identity`, FLOPs per forward and the machine's throughput
:mod:`~fcr_eval.plan.costs`, the printed and JSON forms :mod:`~fcr_eval.plan.output`, the samplers
:mod:`~fcr_eval.plan.samplers`.

Example::

    plan = make_plan(load_experiment("experiments/mini-exp-1.toml", "quick"))
    plan.runs[0].run_id, plan.runs[0].sampler.label, plan.total_seconds
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fcr_eval.analysis.replication import RunWeights, contrast_replication
from fcr_eval.plan.costs import (
    ASSUMED_GPU_TFLOPS,
    DEFAULT_CPU_GFLOPS,
    EFFICIENTNET_LITE0_FLOPS_224,
    EMBEDDED_RESOLUTION,
    ModelCost,
    calibrate_throughput,
    model_cost,
    stated_cost_notes,
)
from fcr_eval.plan.identity import finetune_key, finetune_record, run_config
from fcr_eval.plan.samplers import SamplerSettings, sampler_for
from fcr_eval.records import make_run_id
from fcr_eval.spec.evaluation import saved_sample_count
from fcr_eval.spec.experiment import EarlyStoppingSpec, Experiment, RobustnessSpec, VariationSpec
from fcr_eval.spec.names import safe_child
from fcr_eval.spec.vocabulary import ADAPTIVE_SAMPLERS

__all__ = [
    "PlannedFinetune",
    "PlannedRun",
    "ModelCost",
    "Plan",
    "make_plan",
    "model_cost",
    "calibrate_throughput",
    "planned_weights",
    "reference_key",
    "uncached_flops",
    "DEFAULT_CPU_GFLOPS",
    "ASSUMED_GPU_TFLOPS",
    "LONG_PLAN_SECONDS",
]

logger = logging.getLogger(__name__)

#: A plan whose wall-time estimate is past this (a week) says so in its first line.
LONG_PLAN_SECONDS = 7 * 86400


@dataclass
class PlannedFinetune:
    key: str
    model: str
    model_source: str
    lambda_fcr: float
    delta_max: int
    blocks: str
    data: str | None
    steps: int
    batch_size: int
    lr: float
    seed: int
    output_dir: str
    cost: ModelCost | None = None  # of one forward at the model's own resolution (training images)
    delta_unit: str = "timesteps"  # "sampler_steps": Δ counts steps of a `sampler_steps`-step sampler
    sampler_steps: int | None = None
    distance: str = "mse"
    # How the trainer runs (what enters the key and the record: fcr_eval.plan.identity.DECISIONS).
    weight_decay: float = 1e-2
    warmup_steps: int = 0
    ema_decay: float | None = None
    mixed_precision: str = "no"
    checkpoint_every: int = 500
    cond_dropout: float = 0.1
    early_stopping: EarlyStoppingSpec | None = None
    # The output-consistency objective (fcr_train.output_consistency) instead of FCR: lambda_fcr is
    # then 0 and these name the term (recorded only when set, like the later FCR options).
    lambda_oc: float | None = None
    oc_cache: str = "fd"
    oc_trainable: str = "recomputed"
    # The rollout objective (fcr_train.rollout) instead: lambda_fcr is then 0 (the control's fine-tune
    # plus the term) and this holds its resolved options with the sampler's step count.
    rollout: dict | None = None
    variations: list[str] = field(default_factory=list)
    est_flops: float = 0.0
    est_seconds: float = 0.0

    def config(self) -> dict:
        """The settings that define the weights, as a run's config records them
        (:func:`fcr_eval.plan.identity.finetune_record`)."""
        return finetune_record(self)

    @property
    def objective(self) -> str:
        """``"rollout"``, ``"output_consistency"`` or ``"fcr"`` (λ = 0: the plain fine-tuning control)."""
        if self.rollout is not None:
            return "rollout"
        return "output_consistency" if self.lambda_oc is not None else "fcr"

    @property
    def label(self) -> str:
        """The objective in a line: ``FCR λ=0.15`` / ``λ=0 control`` / ``output consistency (fd) λ=0.5`` /
        ``rollout (deepcache, k=4, x0) λ=0.5``."""
        if self.rollout is not None:
            r = self.rollout
            return f"rollout ({r['cache']}, k={r['k']}, {r['target']}) λ={r['lam']:g}"
        if self.lambda_oc is not None:
            return f"output consistency ({self.oc_cache}, {self.oc_trainable}) λ={self.lambda_oc:g}"
        return "λ=0 control" if self.lambda_fcr == 0 else f"FCR λ={self.lambda_fcr:g}"

    def extra_forward_share(self) -> float:
        """Forward passes a training image costs beyond the denoising forward, as a share of one
        full forward (differentiated like it): FCR's encoder-only second branch; output
        consistency's stale pass (FD: an encoder at t + Δ and a decoder at t; DeepCache: a full
        forward at t + Δ and the shallow path at t). The planner's estimate and the stored
        fine-tune compute both read it."""
        c = self.cost
        if self.rollout is not None:  # the segments (fcr_train.rollout.rollout_cost_factor)
            from fcr_train.rollout import rollout_cost_factor

            return rollout_cost_factor(self.rollout_config(), self.batch_size, c.encoder_share,
                                       c.deepcache_partial_share) - 1.0
        if self.lambda_oc is not None:
            return 1.0 if self.oc_cache == "fd" else 1.0 + c.deepcache_partial_share
        return c.encoder_share if self.lambda_fcr > 0 else 0.0

    def fcr_config(self):
        """The fine-tune's :class:`fcr_train.loss.FCRConfig` (λ = 0 with output consistency)."""
        from fcr_train.loss import FCRConfig

        return FCRConfig(lam=self.lambda_fcr, delta_max=self.delta_max, blocks=self.blocks, distance=self.distance,
                         delta_unit=self.delta_unit, sampler_steps=self.sampler_steps)

    def oc_config(self):
        """The fine-tune's :class:`fcr_train.output_consistency.OutputConsistencyConfig`, or ``None``."""
        if self.lambda_oc is None:
            return None
        from fcr_train.output_consistency import OutputConsistencyConfig

        return OutputConsistencyConfig(lam=self.lambda_oc, delta_max=self.delta_max, delta_unit=self.delta_unit,
                                       sampler_steps=self.sampler_steps, distance=self.distance,
                                       cache=self.oc_cache, trainable=self.oc_trainable)

    def rollout_config(self):
        """The fine-tune's :class:`fcr_train.rollout.RolloutConfig`, or ``None``."""
        if self.rollout is None:
            return None
        from fcr_train.rollout import RolloutConfig

        r = self.rollout
        return RolloutConfig(lam=r["lam"], k=r["k"], cache=r["cache"], sampler_steps=r["sampler_steps"],
                             target=r["target"], distance=self.distance, noise_power=r["noise_power"],
                             trainable=r["trainable"], rollout_rows=r["rows"], guidance_scale=r["guidance_scale"])

    def objective_config(self):
        """The config of the objective the fine-tune trains instead of FCR (output consistency or
        the rollout term), or ``None`` (FCR: :meth:`fcr_config`)."""
        return self.oc_config() or self.rollout_config()


def _attribution_samples(ev, sampler: SamplerSettings, n_samples: int, variation_id: str) -> int:
    """How many of a run's samples the cache-error attribution walks (0: none). Only cached runs
    are attributed (those of ``evaluation.attribution_variations`` when it is set), and not FD with
    prior noise injection: the attribution walks the uncached trajectory, which has none, so it
    would measure a different sampler."""
    if "cache_attribution" not in ev.metrics or not sampler.cached:
        return 0
    if ev.attribution_variations is not None and variation_id not in ev.attribution_variations:
        return 0
    if sampler.kind in ADAPTIVE_SAMPLERS:  # its schedule is decided at run time; the attribution needs it ahead
        logger.warning("cache_attribution skips %s: an adaptive cache has no fixed schedule to attribute",
                       sampler.label)
        return 0
    if getattr(sampler.cache, "prior_noise_alpha", 0.0) > 0:
        logger.warning("cache_attribution skips %s: FD with prior noise injection (alpha=%g) is not "
                       "the uncached trajectory the attribution walks", sampler.label,
                       sampler.cache.prior_noise_alpha)
        return 0
    return min(int(n_samples), int(ev.attribution_samples))


@dataclass
class PlannedRun:
    """One variation × seed, resolved: every setting the runner needs, as the object it uses.

    ``config`` is the run's resolved settings as a plain record: it is hashed into ``run_id`` and
    stored with the run for provenance; the runner reads the typed fields, never ``config``.
    """

    variation: VariationSpec
    seed: int
    run_id: str
    run_dir: str
    config: dict
    finetune: PlannedFinetune | None
    sampler: SamplerSettings
    robustness: RobustnessSpec
    eval_prompts: str | None
    n_samples: int
    steps: int
    guidance_scale: float
    scheduler: str
    resolution: int
    cost: ModelCost
    #: σ²_Δ is also measured over Δ = 1…this many sampler steps: the largest stride any cached
    #: variation of the experiment reuses features over at this step count (below the step count).
    sigma2_sampler_range: int = 0
    #: The cache-error attribution (``"cache_attribution"`` in the metrics): how many of the run's
    #: first samples it walks (0 = not attributed) and whether it measures the propagation.
    attribution_samples: int = 0
    attribution_propagation: bool = False
    #: How many of the run's first samples are written as PNGs (``evaluation.save_samples``,
    #: resolved: 0 = none, ``n_samples`` = all).
    save_samples: int = 0
    unet_calls: int = 0
    full_forwards: int = 0
    encoder_forwards: int = 0
    decoder_forwards: int = 0
    partial_forwards: int = 0
    #: FLOPs of the uncached reference this run samples for its paired metrics (0 when an earlier
    #: run of the same weights × seed × setting provides it); part of ``est_flops``.
    reference_flops: float = 0.0
    est_flops: float = 0.0
    est_seconds: float = 0.0


@dataclass
class Plan:
    experiment: Experiment
    runs: list[PlannedRun]
    finetunes: dict[str, PlannedFinetune]
    results_dir: Path
    costs: dict[str, ModelCost]
    gflops_per_s: float
    calibration: str
    est_eval_seconds: float = 0.0
    #: contrast id → how its sides were replicated (:func:`fcr_eval.analysis.replication.contrast_replication`).
    replication: dict[str, str] = field(default_factory=dict)
    #: What `run` would stop at on this machine (a model or local file that is not here) and other
    #: notes; shown at the top of the plan, and logged.
    warnings: list[str] = field(default_factory=list)

    @property
    def total_seconds(self) -> float:
        return (sum(r.est_seconds for r in self.runs) + sum(f.est_seconds for f in self.finetunes.values())
                + self.est_eval_seconds)

    @property
    def total_flops(self) -> float:
        return sum(r.est_flops for r in self.runs) + sum(f.est_flops for f in self.finetunes.values())


def make_plan(exp: Experiment, *, results_dir: str | Path = "results", calibrate: bool = True,
              gflops_per_s: float | None = None) -> Plan:
    """Resolve every run (variation × seed) and fine-tune of ``exp`` and estimate its compute.

    Args:
        results_dir: the store's folder; run folders go to ``results_dir/runs/<experiment>/``.
        calibrate: time the embedded UNet for a few seconds to turn FLOPs into seconds;
            otherwise use ``gflops_per_s`` or :data:`DEFAULT_CPU_GFLOPS`.
    """
    results_dir = Path(results_dir)
    exp_dir = safe_child(results_dir, "runs", exp.id)
    if gflops_per_s is None:
        gflops_per_s = calibrate_throughput() if calibrate else DEFAULT_CPU_GFLOPS
        how = "measured on this machine (embedded UNet, batch 64)" if calibrate else "stated constant"
    else:
        how = "given"
    costs: dict[str, ModelCost] = {}
    drift_refs: set[tuple] = set()
    finetunes: dict[str, PlannedFinetune] = {}
    runs: list[PlannedRun] = []
    ft = exp.finetune
    ev = exp.evaluation
    for v in exp.variations:
        model = exp.models[v.model]
        vs = exp.settings(v)  # defaults filled in once, by the spec that validated them
        steps, guidance, scheduler = vs.steps, vs.guidance_scale, vs.scheduler
        rob = exp.robustness[v.robustness]
        base_res = v.resolution or exp.sampling.resolution or model.resolution or \
            EMBEDDED_RESOLUTION.get(model.backbone, 512)
        resolution = int(rob.settings.get("resolution", base_res)) if rob.kind == "resolution" else base_res
        ckey = f"{v.model}@{resolution}"
        if ckey not in costs:
            costs[ckey] = model_cost(exp, v.model, resolution)
        cost = costs[ckey]
        sampler = sampler_for(v, steps)
        counts = sampler.forward_counts()
        eval_prompts = v.eval_prompts or exp.sampling.eval_prompts
        cfg_mult = 2 if guidance != 1.0 else 1
        fwd_equiv = (counts["full_forwards"] + (counts["decoder_forwards"] - counts["full_forwards"])
                     * (1 - cost.encoder_share) + counts["partial_forwards"] * cost.deepcache_partial_share)
        n = exp.sampling.n_samples
        timing_imgs = sum(ev.timing_batch_sizes) * (ev.timing_repeats + 1)
        for seed in exp.seeds:
            planned_ft = None
            if v.finetuned:
                planned_ft = _planned_finetune(exp, v, seed, steps, exp_dir)
                if planned_ft.key not in finetunes:
                    # forward + backward (×3) of the denoising branch + the objective's second
                    # branch, per training image.
                    planned_ft.est_flops = (cost.flops_per_forward * (1 + planned_ft.extra_forward_share()) * 3
                                            * ft.steps * ft.batch_size)
                    planned_ft.est_seconds = planned_ft.est_flops / (gflops_per_s * 1e9)
                    finetunes[planned_ft.key] = planned_ft
                planned_ft = finetunes[planned_ft.key]
                planned_ft.variations.append(f"{v.id}/s{seed}")
            sampling = {"scheduler": scheduler, "steps": steps, "guidance_scale": guidance,
                        "resolution": resolution, "n_samples": n, "eval_prompts": eval_prompts,
                        # float32 is implied (keeps the run ids of float32 runs stable)
                        **({"dtype": exp.sampling.dtype} if exp.sampling.dtype != "float32" else {})}
            config = run_config(exp.id, v, seed, model=asdict(model), sampling=sampling, robustness=asdict(rob),
                                evaluation=ev, finetune=planned_ft)
            run_id = make_run_id(exp.id, v.id, seed, config)
            flops = n * cfg_mult * fwd_equiv * cost.flops_per_forward
            if "clip_drift" in ev.metrics and v.sampler != "none":
                # CLIP drift samples the same prompts without a cache once per weights × seed × setting
                key = (v.model, planned_ft.key if planned_ft else None, seed, scheduler, steps, guidance, resolution,
                       v.robustness, eval_prompts)
                if key not in drift_refs:
                    drift_refs.add(key)
                    flops += min(n, ev.clip_drift_samples) * cfg_mult * steps * cost.flops_per_forward
            timing_flops = timing_imgs * cfg_mult * fwd_equiv * cost.flops_per_forward
            runs.append(PlannedRun(
                variation=v, seed=seed, run_id=run_id, run_dir=str(safe_child(exp_dir, v.id, f"s{seed}")), config=config,
                finetune=planned_ft, sampler=sampler, robustness=rob,
                eval_prompts=eval_prompts, n_samples=n, steps=steps, guidance_scale=guidance, scheduler=scheduler,
                resolution=resolution, cost=cost,
                attribution_samples=_attribution_samples(ev, sampler, n, v.id),
                attribution_propagation=bool(ev.attribution_propagation),
                save_samples=saved_sample_count(ev.save_samples, n), **counts, est_flops=flops,
                est_seconds=(flops + timing_flops) / (gflops_per_s * 1e9)))
    _count_references(runs, gflops_per_s)
    # σ²_Δ over the cache's range: the largest interval reused at each step count (Δ < steps).
    widest: dict[int, int] = {}
    for r in runs:
        if r.sampler.cached:
            reach = r.sampler.interval or max(b - a for a, b in zip(r.sampler.key_steps, [*r.sampler.key_steps[1:],
                                                                                        r.steps], strict=True))
            widest[r.steps] = max(widest.get(r.steps, 0), min(reach, r.steps - 1))
    for r in runs:
        r.sigma2_sampler_range = widest.get(r.steps, 0)
    # Feature extraction of samples + reference, σ²_Δ passes: a rough add-on.
    feat_flops = EFFICIENTNET_LITE0_FLOPS_224 * (ev.feature_image_size / 224) ** 2
    n_feat = sum(r.n_samples for r in runs) + ev.n_reference
    any_cost = next(iter(costs.values()))
    sigma_flops = len(runs) * ev.sigma2_samples * (ev.sigma2_delta_max + 1) * any_cost.encoder_share \
        * any_cost.flops_per_forward
    est_eval = (n_feat * feat_flops + sigma_flops) / (gflops_per_s * 1e9)
    weights = planned_weights(runs)
    replication = {c.id: contrast_replication(weights, c.variations) for c in exp.contrasts}
    return Plan(exp, runs, finetunes, results_dir, costs, gflops_per_s, how, est_eval, replication,
                warnings=stated_cost_notes(exp))


def reference_key(run: PlannedRun) -> tuple:
    """Which uncached reference a run is paired with: runs with equal keys share one
    (:func:`fcr_eval.run.sampling.uncached_reference`: same weights, seed, x_T, sampling setting,
    stress and prompts)."""
    weights = run.finetune.key if run.finetune is not None else f"base:{run.variation.model}"
    x_key = run.run_id if run.robustness.kind == "fgsm_latent" else "seed"
    return (weights, run.seed, x_key, run.scheduler, run.steps, run.guidance_scale, run.resolution,
            run.variation.robustness, run.eval_prompts)


def uncached_flops(run: PlannedRun) -> float:
    """FLOPs of sampling ``run``'s prompts without a cache: its uncached reference."""
    return run.n_samples * (2 if run.guidance_scale != 1.0 else 1) * run.steps * run.cost.flops_per_forward


def _count_references(runs: list[PlannedRun], gflops_per_s: float) -> None:
    """Add the uncached reference that paired metrics compare a cached run with to the first
    run that needs it: an uncached run of the same weights × seed × setting is its own (and
    serves the cached runs after it: the runner runs uncached runs first), else the first cached
    run samples it once and the others share it."""
    served = {reference_key(r) for r in runs if not r.sampler.cached}
    for r in runs:
        key = reference_key(r)
        if r.sampler.cached and key not in served:
            served.add(key)
            r.reference_flops = uncached_flops(r)
            r.est_flops += r.reference_flops
            r.est_seconds += r.reference_flops / (gflops_per_s * 1e9)


def planned_weights(runs: list[PlannedRun]) -> list[RunWeights]:
    """Which weights each planned run samples (the rows :func:`~fcr_eval.analysis.replication.contrast_replication`
    reads): its fine-tune's key, or ``base:<model>``."""
    return [RunWeights(r.variation.id, r.seed, r.finetune.key if r.finetune is not None else f"base:{r.variation.model}",
                       r.finetune is not None) for r in runs]


def _planned_finetune(exp: Experiment, v: VariationSpec, seed: int, steps: int, exp_dir: Path) -> PlannedFinetune:
    """The fine-tune variation ``v`` samples in ``seed`` (shared by every variation with the same
    settings: its key says which)."""
    ft, vs = exp.finetune, exp.settings(v)
    oc, ro = vs.lambda_oc is not None, vs.rollout
    planned = PlannedFinetune(
        key="", model=v.model, model_source=exp.models[v.model].source,
        lambda_fcr=0.0 if oc or ro is not None else float(v.lambda_fcr), delta_max=vs.delta_max,
        blocks=vs.blocks or "all",  # unused by output consistency (FCR's λ is 0 there)
        data=vs.finetune_data, steps=ft.steps, batch_size=ft.batch_size, lr=ft.lr,
        seed=seed if ft.per_seed else exp.seeds[0], output_dir="", cost=model_cost(exp, v.model),
        delta_unit=vs.delta_unit, sampler_steps=steps if vs.delta_unit == "sampler_steps" else None,
        distance=vs.distance, weight_decay=ft.weight_decay, warmup_steps=ft.warmup_steps, ema_decay=ft.ema_decay,
        mixed_precision=ft.mixed_precision, checkpoint_every=ft.checkpoint_every, cond_dropout=ft.cond_dropout,
        early_stopping=ft.early_stopping,
        **({"lambda_oc": vs.lambda_oc, "oc_cache": vs.oc_cache, "oc_trainable": vs.oc_trainable} if oc else {}),
        rollout=None if ro is None else {**asdict(ro), "sampler_steps": steps})
    planned.key = finetune_key(planned)
    planned.output_dir = str(safe_child(exp_dir, "finetune", planned.key))
    return planned

