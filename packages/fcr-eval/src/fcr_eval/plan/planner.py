"""The plan of an experiment: which fine-tunes and which runs (variation × seed), their run ids
and folders, and the estimated compute (UNet forwards, FLOPs, wall time on this machine).

Fine-tunes are shared: every variation that needs the same weights (model, λ, Δ_max, blocks,
data, steps, and the seed when ``finetune.per_seed``) points at one :class:`PlannedFinetune`, so
a stride sweep fine-tunes once.

Example::

    plan = make_plan(load_experiment("experiments/mini-exp-1.toml", "quick"))
    print(format_plan(plan))
    json.dumps(plan_json([plan]))     # the design's output form
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fcr_eval.plan.samplers import SamplerSettings, resolve_sampler
from fcr_eval.plan.unet_flops import LATENT_FACTOR, unet_config_for, unet_flops
from fcr_eval.spec.experiment import EarlyStoppingSpec, Experiment, RobustnessSpec, VariationSpec
from fcr_eval.spec.names import safe_child
from fcr_eval.spec.vocabulary import (
    FIXED_WEIGHTS,
    INDEPENDENT_FINETUNES,
    SAME_WEIGHTS,
    SHARED_FINETUNE,
)

__all__ = [
    "PlannedFinetune",
    "PlannedRun",
    "ModelCost",
    "Plan",
    "make_plan",
    "model_cost",
    "calibrate_throughput",
    "format_plan",
    "plan_json",
    "contrast_replication",
    "DEFAULT_CPU_GFLOPS",
    "LONG_PLAN_SECONDS",
]

logger = logging.getLogger(__name__)

#: Effective throughput assumed when the plan is not calibrated (``--no-calibrate``): the embedded
#: UNet at batch 64 measured 96 GFLOP/s on a 2-core dev machine at low load and ~25 under load;
#: the mini-exp-1 quick run took 1.6× the calibrated estimate (per-step overheads), hence 60.
DEFAULT_CPU_GFLOPS = 60.0
#: For real models: one A100-class GPU at ~40 % of its 312 TFLOP/s bf16 peak (a stated assumption).
ASSUMED_GPU_TFLOPS = 125.0

#: design.md §2: SD v1.5 UNet at 512² (64×64 latent): ~803 GFLOPs per forward, encoder ~33 %.
#: DeepCache's shallow path at branch 0 costs roughly a tenth of a forward (its 2.1× at N=5).
SD_COSTS = {"flops_per_forward": 803e9, "encoder_flop_share": 0.33, "deepcache_partial_share": 0.10}
#: A plan whose wall-time estimate is past this (a week) says so in its first line.
LONG_PLAN_SECONDS = 7 * 86400
#: A stated ``flops_per_forward`` this far (relative) from the architecture's count is reported.
_STATED_FLOPS_TOLERANCE = 0.15

#: EfficientNet-Lite0 at 224²: ~0.39 GFLOPs per image (scales with the square of the input size).
EFFICIENTNET_LITE0_FLOPS_224 = 0.39e9


@dataclass(frozen=True)
class ModelCost:
    """FLOPs of one UNet forward for one image (no CFG doubling) and its split."""

    flops_per_forward: float
    encoder_share: float
    deepcache_partial_share: float
    source: str  # "flop counter" or "design.md §2 constants"


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
    # How the trainer runs (hashed into ``key`` through the ``train`` record; not repeated in
    # :meth:`config`, so run ids stay what they were).
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
    variations: list[str] = field(default_factory=list)
    est_flops: float = 0.0
    est_seconds: float = 0.0

    def config(self) -> dict:
        """The settings that define the weights (hashed into run ids; no estimates, no folder). The
        FCR options added later appear only when they differ from their defaults, so the run ids of
        earlier experiments stay the same."""
        out = {k: v for k, v in asdict(self).items() if k not in ("variations", "est_flops", "est_seconds",
                                                                 "output_dir", "cost", *_TRAINER_FIELDS,
                                                                 *_LATER_FCR_OPTIONS)}
        out.update({k: getattr(self, k) for k, default in _LATER_FCR_OPTIONS.items() if getattr(self, k) != default})
        return out

    @property
    def objective(self) -> str:
        """``"output_consistency"`` or ``"fcr"`` (λ = 0: the plain fine-tuning control)."""
        return "output_consistency" if self.lambda_oc is not None else "fcr"

    @property
    def label(self) -> str:
        """The objective in a line: ``FCR λ=0.15`` / ``λ=0 control`` / ``output consistency (fd) λ=0.5``."""
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


#: How the trainer runs: part of the fine-tune's key (its hash), not of :meth:`PlannedFinetune.config`.
_TRAINER_FIELDS = ("weight_decay", "warmup_steps", "ema_decay", "mixed_precision", "checkpoint_every",
                   "cond_dropout", "early_stopping")


#: Variation fields added after the first release: recorded only when set, so that the config
#: records (and run ids) of earlier experiment files stay the same.
_LATER_VARIATION_FIELDS = ("delta_unit", "distance", "lambda_oc", "oc_cache", "oc_trainable")


#: Evaluation settings of the whole experiment, not of a run: kept out of the run's record.
_EXPERIMENT_LEVEL_EVALUATION = ("timing_rounds",)


#: Evaluation settings added after the first release that only matter with their metric: kept out
#: of the run's record without it, so the run ids of experiments that do not use them stay stable.
_LATER_EVALUATION = {"cache_attribution": ("attribution_samples", "attribution_propagation")}


def _evaluation_record(ev) -> dict:
    unused = {k for metric, keys in _LATER_EVALUATION.items() if metric not in ev.metrics for k in keys}
    if ev.attribution_variations is None:  # added later: recorded only when set
        unused.add("attribution_variations")
    return {k: x for k, x in asdict(ev).items() if k not in _EXPERIMENT_LEVEL_EVALUATION and k not in unused}


def _attribution_samples(ev, sampler: SamplerSettings, n_samples: int, variation_id: str) -> int:
    """How many of a run's samples the cache-error attribution walks (0: none). Only cached runs
    are attributed (those of ``evaluation.attribution_variations`` when it is set), and not FD with
    prior noise injection: the attribution walks the uncached trajectory, which has none, so it
    would measure a different sampler."""
    if "cache_attribution" not in ev.metrics or not sampler.cached:
        return 0
    if ev.attribution_variations is not None and variation_id not in ev.attribution_variations:
        return 0
    if getattr(sampler.cache, "prior_noise_alpha", 0.0) > 0:
        logger.warning("cache_attribution skips %s: FD with prior noise injection (alpha=%g) is not "
                       "the uncached trajectory the attribution walks", sampler.label,
                       sampler.cache.prior_noise_alpha)
        return 0
    return min(int(n_samples), int(ev.attribution_samples))


def _lam_text(lam: float) -> str:
    """λ in a folder name: two decimals, or all its digits when two would round it (0.0015)."""
    return f"{lam:.2f}" if round(lam, 2) == lam else f"{lam:g}"


def _variation_record(v: VariationSpec) -> dict:
    rec = {k: x for k, x in asdict(v).items() if not (k in _LATER_VARIATION_FIELDS and x is None)}
    # Which profiles a variation belongs to says nothing about how its numbers were produced:
    # recorded as unset (as it was for every variation that did not restrict its profiles).
    rec["profiles"] = None
    return rec


#: FCR options a fine-tune's identity gained after the first release, with their defaults.
_LATER_FCR_OPTIONS = {"delta_unit": "timesteps", "sampler_steps": None, "distance": "mse",
                      "lambda_oc": None, "oc_cache": "fd", "oc_trainable": "recomputed"}


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
    unet_calls: int = 0
    full_forwards: int = 0
    encoder_forwards: int = 0
    decoder_forwards: int = 0
    partial_forwards: int = 0
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
    #: contrast id → how its sides were replicated (:func:`contrast_replication`).
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


def _short_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


_COST_CACHE: dict[tuple, ModelCost] = {}


#: Default sampling resolution (pixels) of each embedded backbone; Stable Diffusion's is 512.
EMBEDDED_RESOLUTION = {"fashion-mnist": 28, "emoji": 32}


def model_cost(exp: Experiment, model_id: str, resolution: int | None = None) -> ModelCost:
    """FLOPs per forward of ``model_id`` at ``resolution`` (default: the model's own): counted on the
    embedded UNet (exact; memoised per UNet and resolution), from the experiment file or design.md
    §2 constants for Stable Diffusion (not instantiated here)."""
    spec = exp.models[model_id]
    if spec.backbone == "emoji":
        from fcr_train.emoji_backbone import (
            EMOJI_TEXT_MAX_LENGTH,
            EMOJI_UNET_CONFIG,
            EMOJI_VAE_CONFIG,
            TINY_EMOJI_UNET_CONFIG,
        )

        cfg = TINY_EMOJI_UNET_CONFIG if spec.source == "emoji-tiny" else EMOJI_UNET_CONFIG
        factor = 2 ** (len(EMOJI_VAE_CONFIG["block_out_channels"]) - 1)  # pixels per latent side
        key = (spec.source, int(resolution // factor if resolution else cfg["sample_size"]))
        if key not in _COST_CACHE:
            _COST_CACHE[key] = _count_embedded_cost(cfg, key[1], EMOJI_TEXT_MAX_LENGTH)
        return _COST_CACHE[key]
    if spec.embedded:
        from fcr_train.api import TINY_EMBEDDED_UNET_CONFIG
        from fcr_train.embedded import EMBEDDED_UNET_CONFIG

        cfg = TINY_EMBEDDED_UNET_CONFIG if spec.source == "embedded-tiny" else EMBEDDED_UNET_CONFIG
        key = (spec.source, int(resolution or cfg["sample_size"]))
        if key not in _COST_CACHE:
            _COST_CACHE[key] = _count_embedded_cost(cfg, key[1])
        return _COST_CACHE[key]
    arch = unet_config_for(spec.source)
    if arch is not None:
        cfg, where = arch
        res = resolution or spec.resolution or int(cfg.get("sample_size", 64)) * LATENT_FACTOR
        split = unet_flops(cfg, max(1, res // LATENT_FACTOR))
        if split is not None:
            return ModelCost(split.total, split.encoder_share, SD_COSTS["deepcache_partial_share"],
                             f"counted from the UNet config ({where})")
    flops = spec.flops_per_forward or SD_COSTS["flops_per_forward"]
    if resolution and spec.resolution and resolution != spec.resolution:
        flops *= (resolution / spec.resolution) ** 2
    return ModelCost(flops, spec.encoder_flop_share or SD_COSTS["encoder_flop_share"],
                     SD_COSTS["deepcache_partial_share"], "experiment file / design.md §2 constants")


def _stated_cost_notes(exp: Experiment) -> list[str]:
    """Where a model's stated ``flops_per_forward`` disagrees with its architecture's count."""
    notes = []
    for m in exp.models.values():
        if m.embedded or not m.flops_per_forward:
            continue
        counted = model_cost(exp, m.id, m.resolution)
        if counted.source.startswith("counted") and abs(m.flops_per_forward / counted.flops_per_forward - 1) \
                > _STATED_FLOPS_TOLERANCE:
            notes.append(f"model {m.id!r}: flops_per_forward = {m.flops_per_forward:.3g} in {exp.path} differs from "
                         f"{counted.flops_per_forward:.3g} counted from its UNet config at {m.resolution or 'its'}px; "
                         "the plan uses the count")
    return notes


def _count_embedded_cost(cfg: dict, res: int, tokens: int = 16) -> ModelCost:
    import torch
    from fcr_sample import DeepCacheConfig
    from fcr_sample.benchmark import deepcache_partial_flops, flop_split
    from fcr_train.embedded import build_unet

    unet = build_unet(cfg).eval()
    x = torch.randn(1, cfg["in_channels"], res, res)
    text = torch.randn(1, tokens, cfg["cross_attention_dim"])
    split = flop_split(unet, x, text)
    # the shallow path of DeepCache's default branch (0), which the mini experiments compare
    partial = deepcache_partial_flops(unet, x, text, DeepCacheConfig(cache_branch_id=0)) / split.total
    return ModelCost(split.total, split.encoder_share, partial, "flop counter")


def calibrate_throughput(seconds: float = 2.0) -> float:
    """Effective GFLOP/s of this machine on the embedded UNet (batched CFG forwards, the
    runner's dominant work). Takes about ``seconds``."""
    import torch
    from fcr_train.embedded import EMBEDDED_UNET_CONFIG, build_unet

    unet = build_unet(EMBEDDED_UNET_CONFIG).eval()
    x = torch.randn(64, 1, 28, 28)
    text = torch.randn(64, 16, 384)
    from fcr_eval.metrics.cost import count_flops

    flops = count_flops(lambda: unet(x, 500, text))
    with torch.no_grad():
        unet(x, 500, text)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            unet(x, 500, text)
            n += 1
    return flops * n / (time.perf_counter() - t0) / 1e9


def make_plan(exp: Experiment, *, results_dir: str | Path = "results", calibrate: bool = True,
              gflops_per_s: float | None = None) -> Plan:
    """Resolve every run (variation × seed) and fine-tune of ``exp`` and estimate its compute.

    Args:
        results_dir: the store's folder; run folders go to ``results_dir/runs/<experiment>/``.
        calibrate: time the embedded UNet for a few seconds to turn FLOPs into seconds;
            otherwise use ``gflops_per_s`` or :data:`DEFAULT_CPU_GFLOPS`.
    """
    from fcr_eval.store import make_run_id

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
        sampler = resolve_sampler(v.sampler, steps=steps, stride=v.stride, schedule=v.schedule,
                                  parallel_decoding=v.parallel_decoding, prior_noise_alpha=v.prior_noise_alpha,
                                  cache_branch_id=v.cache_branch_id)
        counts = sampler.forward_counts()
        eval_prompts = v.eval_prompts or exp.sampling.eval_prompts
        cfg_mult = 2 if guidance != 1.0 else 1
        fwd_equiv = (counts["full_forwards"] + (counts["decoder_forwards"] - counts["full_forwards"])
                     * (1 - cost.encoder_share) + counts["partial_forwards"] * cost.deepcache_partial_share)
        n = exp.sampling.n_samples
        timing_imgs = sum(ev.timing_batch_sizes) * (ev.timing_repeats + 1)
        for seed in exp.seeds:
            ft_key = None
            if v.finetuned:
                oc = vs.lambda_oc is not None
                lam = 0.0 if oc else float(v.lambda_fcr)
                ft_seed = seed if ft.per_seed else exp.seeds[0]
                unit, distance, delta_max = vs.delta_unit, vs.distance, vs.delta_max
                later = {k: x for k, x in (("delta_unit", unit), ("sampler_steps", steps if unit == "sampler_steps"
                                                                  else None), ("distance", distance),
                                           ("lambda_oc", vs.lambda_oc), ("oc_cache", vs.oc_cache or "fd"),
                                           ("oc_trainable", vs.oc_trainable or "recomputed"))
                         if x != _LATER_FCR_OPTIONS[k]}
                blocks = vs.blocks or "all"  # unused by output consistency (FCR's λ is 0 there)
                ftc = {"model": v.model, "lambda_fcr": lam, "delta_max": delta_max,
                       "blocks": blocks, "data": vs.finetune_data, "steps": ft.steps,
                       "batch_size": ft.batch_size, "lr": ft.lr, "seed": ft_seed,
                       "train": {k: getattr(ft, k) for k in ("weight_decay", "warmup_steps", "ema_decay",
                                                             "mixed_precision")}, **later}
                tags = ("-ss" if unit == "sampler_steps" else "") + ("" if distance == "mse" else f"-{distance}")
                if oc:
                    trainable = "" if vs.oc_trainable == "recomputed" else f"-{vs.oc_trainable}"
                    ft_key = (f"ft-oc{_lam_text(vs.lambda_oc)}-d{delta_max}{tags}-{vs.oc_cache}{trainable}"
                              f"-s{ft_seed}-{_short_hash(ftc)}")
                else:
                    ft_key = (f"ft-lam{_lam_text(lam)}-d{delta_max}{tags}-{blocks}-s{ft_seed}-"
                              f"{_short_hash(ftc)}")
                if ft_key not in finetunes:
                    finetunes[ft_key] = PlannedFinetune(
                        key=ft_key, model=v.model, model_source=model.source, lambda_fcr=lam,
                        delta_max=delta_max, blocks=blocks, data=ftc["data"], steps=ft.steps,
                        batch_size=ft.batch_size, lr=ft.lr, seed=ft_seed,
                        output_dir=str(safe_child(exp_dir, "finetune", ft_key)), cost=model_cost(exp, v.model),
                        delta_unit=unit, sampler_steps=later.get("sampler_steps"), distance=distance,
                        weight_decay=ft.weight_decay, warmup_steps=ft.warmup_steps, ema_decay=ft.ema_decay,
                        mixed_precision=ft.mixed_precision, checkpoint_every=ft.checkpoint_every,
                        cond_dropout=ft.cond_dropout, early_stopping=ft.early_stopping,
                        **({"lambda_oc": vs.lambda_oc, "oc_cache": vs.oc_cache, "oc_trainable": vs.oc_trainable}
                           if oc else {}))
                    # forward + backward (×3) of the denoising branch + the objective's second
                    # branch, per training image.
                    new = finetunes[ft_key]
                    new.est_flops = (cost.flops_per_forward * (1 + new.extra_forward_share()) * 3
                                     * ft.steps * ft.batch_size)
                    new.est_seconds = new.est_flops / (gflops_per_s * 1e9)
                finetunes[ft_key].variations.append(f"{v.id}/s{seed}")
            config = {
                "experiment_id": exp.id, "variation": _variation_record(v), "seed": seed, "model": asdict(model),
                "sampling": {"scheduler": scheduler, "steps": steps, "guidance_scale": guidance,
                             "resolution": resolution, "n_samples": n,
                             "eval_prompts": eval_prompts,
                             # float32 is implied (keeps the run ids of float32 runs stable)
                             **({"dtype": exp.sampling.dtype} if exp.sampling.dtype != "float32" else {})},
                "robustness": asdict(rob), "evaluation": _evaluation_record(ev),
                "finetune": finetunes[ft_key].config() if ft_key else None,
            }
            run_id = make_run_id(exp.id, v.id, seed, config)
            flops = n * cfg_mult * fwd_equiv * cost.flops_per_forward
            if "clip_drift" in ev.metrics and v.sampler != "none":
                # CLIP drift samples the same prompts without a cache once per weights × seed × setting
                key = (v.model, ft_key, seed, scheduler, steps, guidance, resolution, v.robustness, eval_prompts)
                if key not in drift_refs:
                    drift_refs.add(key)
                    flops += min(n, ev.clip_drift_samples) * cfg_mult * steps * cost.flops_per_forward
            timing_flops = timing_imgs * cfg_mult * fwd_equiv * cost.flops_per_forward
            runs.append(PlannedRun(
                variation=v, seed=seed, run_id=run_id, run_dir=str(safe_child(exp_dir, v.id, f"s{seed}")), config=config,
                finetune=finetunes[ft_key] if ft_key else None, sampler=sampler, robustness=rob,
                eval_prompts=eval_prompts, n_samples=n, steps=steps, guidance_scale=guidance, scheduler=scheduler,
                resolution=resolution, cost=cost,
                attribution_samples=_attribution_samples(ev, sampler, n, v.id),
                attribution_propagation=bool(ev.attribution_propagation), **counts, est_flops=flops,
                est_seconds=(flops + timing_flops) / (gflops_per_s * 1e9)))
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
    replication = {c.id: contrast_replication(runs, c.variations) for c in exp.contrasts}
    return Plan(exp, runs, finetunes, results_dir, costs, gflops_per_s, how, est_eval, replication,
                warnings=_stated_cost_notes(exp))


def contrast_replication(runs: list[PlannedRun], variations: tuple[str, ...]) -> str:
    """How the sides of a contrast over ``variations`` were replicated, from the weights each
    planned run samples (one of :data:`fcr_eval.spec.vocabulary.REPLICATIONS`):

    * the same weights on every side in every seed → ``SAME_WEIGHTS``;
    * different weights, none fine-tuned (e.g. two base models) → ``FIXED_WEIGHTS``;
    * different weights, every fine-tuned side with its own fine-tune in each seed (and ≥ 2
      seeds) → ``INDEPENDENT_FINETUNES``: the seeds are independent replicates of the method;
    * otherwise (a fine-tune serves several seeds) → ``SHARED_FINETUNE``.

    Example:
        >>> contrast_replication(plan.runs, ("fcr-ss-0.15-fd-10", "ft-0.00-fd-10"))
        'independent fine-tunes'
    """
    weights: dict[str, dict[int, str]] = {}
    tuned: set[str] = set()
    for r in runs:
        if r.variation.id in variations:
            key = r.finetune.key if r.finetune is not None else f"base:{r.variation.model}"
            weights.setdefault(r.variation.id, {})[r.seed] = key
            if r.finetune is not None:
                tuned.add(r.variation.id)
    seeds = sorted({s for per in weights.values() for s in per})
    if all(len({weights[v].get(s) for v in variations if v in weights}) == 1 for s in seeds):
        return SAME_WEIGHTS
    if not tuned:
        return FIXED_WEIGHTS
    own = all(len({weights[v][s] for s in seeds if s in weights[v]}) == len(weights[v]) for v in tuned)
    return INDEPENDENT_FINETUNES if own and len(seeds) >= 2 else SHARED_FINETUNE


def long_plan_line(plan: Plan) -> str | None:
    """The plan's first line when its wall-time estimate is past a week on this machine, else ``None``."""
    if plan.total_seconds <= LONG_PLAN_SECONDS:
        return None
    gpu = ""
    if not plan.experiment.embedded:
        gpu = (f"; on one A100-class GPU at an assumed {ASSUMED_GPU_TFLOPS:g} TFLOP/s ≈"
               f"{_fmt_s(plan.total_flops / (ASSUMED_GPU_TFLOPS * 1e12))}")
    return (f"WARNING: experiment {plan.experiment.id} is estimated at ≈{_fmt_s(plan.total_seconds)} of compute on "
            f"this machine (at {plan.gflops_per_s:.1f} GFLOP/s, {plan.calibration}), far past a week{gpu}. Check n_samples, seeds and "
            "finetune.steps, or use a smaller profile")


def _fmt_flops(x: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if x >= scale:
            return f"{x / scale:.1f} {unit}"
    return f"{x / 1e6:.1f} MFLOP"


def _fmt_s(s: float) -> str:
    if s >= 365 * 86400:
        return f"{s / (365 * 86400):.1f} years"
    if s >= 86400:
        return f"{s / 86400:.1f} d"
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.0f} s"


def _lambda_column(v: VariationSpec) -> str:
    """The plan table's λ column: FCR's λ, ``oc`` + λ for output consistency, ``-`` for none."""
    if v.lambda_oc is not None:
        return f"oc{v.lambda_oc:g}"
    return "-" if v.lambda_fcr is None else f"{v.lambda_fcr:g}"


def format_plan(plan: Plan, done: set[str] | None = None) -> str:
    """The plan as text: fine-tunes, runs with forward counts, and totals."""
    exp = plan.experiment
    done = done or set()
    lines = [line for line in (long_plan_line(plan),) if line]
    lines += [f"experiment {exp.id}" + (f" (profile {exp.profile})" if exp.profile else "") + f" — {exp.path}",
              f"  {exp.description}".rstrip()]
    lines += [f"  warning: {w}" for w in plan.warnings]
    lines.append("")
    lines.append(f"fine-tunes ({len(plan.finetunes)}, shared by the variations listed):")
    if not plan.finetunes:
        lines.append("  none")
    for f in plan.finetunes.values():
        what = f.label if f.lambda_oc is not None else f"{f.label} blocks={f.blocks}"
        lines.append(f"  {f.key}: {f.model} {what} Δmax={f.delta_max} "
                     f"{f.steps} steps × batch {f.batch_size}, ≈{_fmt_flops(f.est_flops)}, ≈{_fmt_s(f.est_seconds)}")
        lines.append(f"      used by {', '.join(f.variations)}; folder {f.output_dir}")
    lines.append("")
    lines.append(f"runs ({len(plan.runs)} = {len(exp.variations)} variations × {len(exp.seeds)} seeds"
                 f"{f', {len(done)} already in the store' if done else ''}):")
    hdr = f"  {'variation':<26} {'seed':>4} {'model':<10} {'cache schedule':<16} {'λ':>5} {'robust':<14} " \
          f"{'steps':>5} {'imgs':>5} {'full/enc/dec/part fwd':>22} {'FLOPs':>11} {'time':>8}"
    lines.append(hdr)
    for r in plan.runs:
        v = r.variation
        fwd = f"{r.full_forwards}/{r.encoder_forwards}/{r.decoder_forwards}/{r.partial_forwards}"
        mark = " ✓" if r.run_id in done else ""
        lines.append(f"  {v.id:<26} {r.seed:>4} {v.model:<10} {r.sampler.label:<16} "
                     f"{_lambda_column(v):>5} {v.robustness:<14} {r.steps:>5} "
                     f"{r.n_samples:>5} {fwd:>22} {_fmt_flops(r.est_flops):>11} {_fmt_s(r.est_seconds):>8}{mark}")
    lines.append("")
    lines.append("  forward counts are per sampling run (one batch); ×2 rows with classifier-free guidance")
    if plan.replication:
        lines.append("contrasts (the noise each interval will hold):")
        for c in exp.contrasts:
            rep = plan.replication[c.id]
            note = {SHARED_FINETUNE: "sampling noise only; no PASS/FAIL about the method",
                    INDEPENDENT_FINETUNES: f"fine-tune + sampling noise over {len(exp.seeds)} fine-tunes",
                    }.get(rep, "sampling noise (no fine-tune varies)")
            lines.append(f"  {c.id}: {rep} — {note}")
    costs = ", ".join(f"{k}: {c.flops_per_forward / 1e9:.3g} GFLOPs/forward, encoder {c.encoder_share:.0%} "
                      f"({c.source})" for k, c in plan.costs.items())
    lines.append(f"  model cost: {costs}")
    lines.append(f"estimated compute: {_fmt_flops(plan.total_flops)} (sampling + fine-tuning); "
                 f"wall time ≈ {_fmt_s(plan.total_seconds)} at {plan.gflops_per_s:.1f} GFLOP/s ({plan.calibration};"
                 " includes timing repeats, feature extraction and σ²_Δ)")
    if not exp.embedded:
        lines.append(f"  on one A100-class GPU at an assumed {ASSUMED_GPU_TFLOPS:g} TFLOP/s effective: "
                     f"≈{_fmt_s(plan.total_flops / (ASSUMED_GPU_TFLOPS * 1e12))} (CPU figure above is for scale only)")
    if exp.human_study:
        lines.append(f"human study: {exp.human_study.pairs} A/B pairs over {len(exp.human_study.comparisons)} "
                     "comparison(s) (run with fcr-human-study on the stored samples)")
    return "\n".join(lines)


def plan_json(plans: list[Plan]) -> dict:
    """The design's output form: experiments (experiment_id, run_variations, description),
    expected_models, expected_datasets."""
    experiments, models, datasets = [], [], []
    for plan in plans:
        exp = plan.experiment
        experiments.append({
            "experiment_id": exp.id,
            "run_variations": [v.id for v in exp.variations],
            "description": exp.description,
        })
        for m in exp.models.values():
            if m.source not in models:
                models.append(m.source)
        for d in exp.datasets.values():
            if d.id not in datasets:
                datasets.append(d.id)
    return {"experiments": experiments, "expected_models": models, "expected_datasets": datasets}
