"""The ``[[variations]]`` table: one run variation each (weights, sampler, fine-tune objective,
overrides of the sampling settings, robustness protocol), list-valued fields expanded into one
variation per value, and each variation's settings with the experiment's defaults filled in.

Variation expansion: ``stride = [5, 10, 20]`` with ``id = "fcr-{lambda_fcr:.2f}-fd-{stride}"``
gives three variations; every list-valued expandable field must appear in the id as ``{field}``.
A variation with ``profiles = ["full"]`` exists only in those profiles.

Example::

    variations, index = load_variations(chk, raw.get("variations", []), profile, profiles, models, datasets,
                                        robustness, sampling, finetune)
    resolve_variation(variations[0], sampling, finetune).steps
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from fcr_sample.cache_configs import DEFAULT_ADAPTIVE_THRESHOLD
from fcr_sample.schedules import NAMED_SCHEDULES
from fcr_sample.vocabulary import BLOCK_GROUPS as BLOCKS
from fcr_train.vocabulary import DELTA_UNITS, DISTANCES, OC_CACHES, OC_TRAINABLE

from fcr_eval.spec.checker import Checker, check_profile_names
from fcr_eval.spec.datasets import DatasetSpec
from fcr_eval.spec.finetune import FinetuneSpec
from fcr_eval.spec.models import ModelSpec
from fcr_eval.spec.robustness import RobustnessSpec
from fcr_eval.spec.rollout import RolloutSettings, check_rollout, resolve_rollout
from fcr_eval.spec.sampling import SamplingSpec, check_guidance
from fcr_eval.spec.vocabulary import ADAPTIVE_SAMPLERS, INTERVAL_SAMPLERS, SAMPLERS, SCHEDULERS

__all__ = ["EXPANDABLE", "VariationSpec", "VariationSettings", "resolve_variation", "load_variations",
           "check_variation"]

EXPANDABLE = ("model", "stride", "lambda_fcr", "lambda_oc", "lambda_rollout", "rollout_k", "delta_max", "delta_unit",
              "distance", "blocks", "scheduler", "robustness", "eval_prompts")


@dataclass(frozen=True)
class VariationSpec:
    """One run variation. ``lambda_fcr = None`` samples the model's own weights; a number (0
    included) samples an FCR fine-tune with that λ (λ = 0 is the plain fine-tuning control).
    ``lambda_oc`` (> 0, instead of ``lambda_fcr``) samples a fine-tune with the output-consistency
    term (:mod:`fcr_train.output_consistency`) against ``oc_cache``'s stale features; ``delta_max``,
    ``delta_unit`` and ``distance`` mean for it what they mean for FCR. ``lambda_rollout`` (> 0,
    instead of either) samples a fine-tune with the rollout term (:mod:`fcr_eval.spec.rollout`);
    ``distance`` is its distance."""

    id: str
    model: str
    sampler: str = "none"
    description: str = ""
    stride: int | None = None
    parallel_decoding: bool = True
    schedule: str = "uniform"
    prior_noise_alpha: float = 0.0
    cache_branch_id: int = 0
    threshold: float | None = None  # the adaptive caches' refresh threshold (fcr_sample.AdaptiveCacheConfig)
    lambda_fcr: float | None = None
    lambda_oc: float | None = None
    oc_cache: str | None = None  # fcr_train.vocabulary.OC_CACHES; default "fd"
    oc_trainable: str | None = None  # fcr_train.vocabulary.OC_TRAINABLE; default "recomputed"
    lambda_rollout: float | None = None
    rollout_k: int | None = None  # the rollout options; defaults fcr_eval.spec.rollout.ROLLOUT_OPTIONS
    rollout_cache: str | None = None
    rollout_target: str | None = None
    rollout_noise_power: float | None = None
    rollout_trainable: str | None = None
    rollout_rows: int | None = None
    rollout_guidance_scale: float | None = None
    delta_max: int | None = None
    delta_unit: str | None = None
    distance: str | None = None
    blocks: str | None = None
    finetune_data: str | None = None
    scheduler: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    resolution: int | None = None
    robustness: str = "none"
    eval_prompts: str | None = None
    profiles: tuple[str, ...] | None = None

    @property
    def finetuned(self) -> bool:
        return self.lambda_fcr is not None or self.lambda_oc is not None or self.lambda_rollout is not None

    @property
    def objective(self) -> str | None:
        """What the variation's fine-tune trains: ``"fcr"`` (λ = 0: the plain control),
        ``"output_consistency"``, ``"rollout"``, or ``None`` (the model's own weights)."""
        if self.lambda_rollout is not None:
            return "rollout"
        if self.lambda_oc is not None:
            return "output_consistency"
        return "fcr" if self.lambda_fcr is not None else None

    @property
    def objective_key(self) -> str:
        """The key that states the fine-tune's objective in the file (``lambda_fcr``, ``lambda_oc``,
        ``lambda_rollout``)."""
        return {"rollout": "lambda_rollout", "output_consistency": "lambda_oc"}.get(self.objective, "lambda_fcr")

    @property
    def objective_text(self) -> str:
        """The fine-tune's setting as the file states it (``lambda_fcr = 0.15``, ``lambda_oc = 0.5``)."""
        if not self.finetuned:
            return "no fine-tune"
        return f"{self.objective_key} = {getattr(self, self.objective_key):g}"


@dataclass(frozen=True)
class VariationSettings:
    """A variation's settings with the experiment's defaults filled in: the one place a
    variation's effective step count, guidance, scheduler and FCR options are derived (the spec
    checks them, the planner carries them). FCR fields are ``None`` for a variation that samples
    the model's own weights."""

    steps: int
    guidance_scale: float
    scheduler: str
    delta_unit: str | None = None
    distance: str | None = None
    delta_max: int | None = None
    blocks: str | None = None
    finetune_data: str | None = None
    lambda_oc: float | None = None  # set: the output-consistency objective (lambda_fcr is then None)
    oc_cache: str | None = None
    oc_trainable: str | None = None
    rollout: RolloutSettings | None = None  # set: the rollout objective (lambda_fcr is then None)


def resolve_variation(v: VariationSpec, sampling: SamplingSpec, finetune: FinetuneSpec) -> VariationSettings:
    """Fill ``v``'s unset settings from the experiment's ``[sampling]`` and ``[finetune]`` tables.

    In sampler steps Δ_max defaults to the stride the fine-tune serves; in timesteps to
    ``finetune.delta_max`` (the paper's 10).

    Example:
        >>> resolve_variation(exp.variation("fcr-ss-fd-10"), exp.sampling, exp.finetune).delta_max
        10
    """
    steps = v.num_inference_steps if v.num_inference_steps is not None else sampling.num_inference_steps
    guidance = v.guidance_scale if v.guidance_scale is not None else sampling.guidance_scale
    scheduler = v.scheduler or sampling.scheduler
    if not v.finetuned:
        return VariationSettings(steps, guidance, scheduler)
    unit = v.delta_unit or finetune.delta_unit
    delta_max = v.delta_max or (v.stride if unit == "sampler_steps" and v.stride else finetune.delta_max)
    oc = v.lambda_oc is not None
    # A rollout fine-tune is the λ = 0 control plus its term: FCR's options are the control's.
    return VariationSettings(steps, guidance, scheduler, delta_unit=unit, distance=v.distance or finetune.distance,
                             delta_max=delta_max, blocks=None if oc else (v.blocks or finetune.blocks),
                             finetune_data=v.finetune_data or finetune.data, lambda_oc=v.lambda_oc,
                             oc_cache=(v.oc_cache or "fd") if oc else None,
                             oc_trainable=(v.oc_trainable or "recomputed") if oc else None,
                             rollout=resolve_rollout(v))


def load_variations(chk: Checker, raw: Any, profile: str | None, profiles: dict, models: dict[str, ModelSpec],
                    datasets: dict[str, DatasetSpec], robustness: dict[str, RobustnessSpec], sampling: SamplingSpec,
                    finetune: FinetuneSpec) -> tuple[list[VariationSpec], dict[str, int]]:
    """``[[variations]]`` expanded, restricted to ``profile`` and checked; with each variation's
    index among the file's ``[[variations]]`` tables (for ``file:line``)."""
    variations: list[VariationSpec] = []
    raw_index: dict[str, int] = {}  # variation id → its [[variations]] table (for file:line)
    default_model = next(iter(models))
    for i, v in enumerate(raw):
        if not isinstance(v, dict):
            chk.fail(f"variations[{i}] must be a table", "variations", None, i)
        lists = {k: v[k] for k in EXPANDABLE if isinstance(v.get(k), list)}
        if "id" not in v or not isinstance(v["id"], str):
            chk.fail(f"variations[{i}] needs id = \"...\"", "variations", None, i)
        for k in lists:
            if "{" + k not in v["id"]:
                chk.fail(f"variations[{i}].{k} is a list, so its id {v['id']!r} must contain {{{k}}} "
                         "(one variation per value)", "variations", k, i)
        for combo in itertools.product(*lists.values()) if lists else [()]:
            one = {**v, **dict(zip(lists, combo, strict=False))}
            fmt = {k: one.get(k) for k in EXPANDABLE}
            try:
                one["id"] = v["id"].format(**fmt)
            except (KeyError, ValueError, IndexError) as e:
                chk.fail(f"variations[{i}].id {v['id']!r} cannot be formatted ({e}); placeholders may be "
                         f"{list(EXPANDABLE)}", "variations", "id", i)
            one.setdefault("model", default_model)
            chk.name(one["id"], f"variations[{i}].id" + (f" (from {v['id']!r})" if one["id"] != v["id"] else ""),
                     "variations", "id", i)
            spec = chk.build(VariationSpec, one, "variations", i, label=f"variations[{i}] ({one['id']})")
            check_profile_names(chk, spec.profiles, f"variations[{i}] ({spec.id}).profiles", profiles, "variations", i)
            if spec.profiles is not None and profile not in spec.profiles:
                continue
            check_variation(chk, spec, i, models, datasets, robustness, sampling, finetune)
            variations.append(spec)
            raw_index[spec.id] = i
    if not variations:
        chk.fail("no [[variations]] in this profile" if profile else "no [[variations]] (each one restricts itself "
                 "to profiles with `profiles = [...]`)", "variations")
    ids = [v.id for v in variations]
    dup = sorted({x for x in ids if ids.count(x) > 1})
    if dup:
        chk.fail(f"duplicate variation ids {dup}", "variations")
    return variations, raw_index


def check_variation(chk: Checker, v: VariationSpec, i: int, models, datasets, robustness,
                     sampling: SamplingSpec, finetune: FinetuneSpec) -> None:
    sec = "variations"
    for k in ("num_inference_steps", "resolution"):
        val = getattr(v, k)
        if val is not None and val < (1 if k == "num_inference_steps" else 8):
            chk.fail(f"variations[{i}] ({v.id}).{k} = {val} must be >= {1 if k == 'num_inference_steps' else 8} "
                     f"(or left out: sampling.{k})", sec, k, i)
    if v.guidance_scale is not None:
        check_guidance(chk, v.guidance_scale, f"variations[{i}] ({v.id}).guidance_scale", sec, i)
    settings = resolve_variation(v, sampling, finetune)
    steps = settings.steps
    if settings.delta_unit == "sampler_steps" and settings.delta_max is not None and settings.delta_max >= steps:
        chk.fail(f"variations[{i}] ({v.id}): Δ_max = {settings.delta_max} sampler steps must be below the {steps} "
                 "steps it counts (Δ·T/steps must stay inside the schedule); set delta_max", sec, "delta_max", i)
    if v.sampler in INTERVAL_SAMPLERS and v.schedule == "uniform" and v.stride is not None:
        if v.stride > steps:
            chk.fail(f"variations[{i}] ({v.id}).stride = {v.stride} is larger than its {steps} sampling steps, so "
                     f"no step would reuse the cache as designed; use a stride <= {steps}", sec, "stride", i)
    if v.prior_noise_alpha < 0:
        chk.fail(f"variations[{i}] ({v.id}).prior_noise_alpha = {v.prior_noise_alpha} must be >= 0 (Faster "
                 "Diffusion uses 0.003)", sec, "prior_noise_alpha", i)
    if v.cache_branch_id < 0:
        chk.fail(f"variations[{i}] ({v.id}).cache_branch_id = {v.cache_branch_id} must be >= 0", sec,
                 "cache_branch_id", i)
    if v.delta_max is not None and v.delta_max < 1:
        chk.fail(f"variations[{i}] ({v.id}).delta_max = {v.delta_max} must be >= 1", sec, "delta_max", i)
    chk.one_of(v.model, list(models), f"variations[{i}] ({v.id}).model", sec, "model", i)
    chk.one_of(v.sampler, SAMPLERS, f"variations[{i}] ({v.id}).sampler", sec, "sampler", i)
    if v.sampler in INTERVAL_SAMPLERS and v.schedule == "uniform" and (v.stride is None or v.stride < 1):
        chk.fail(f"variations[{i}] ({v.id}) uses sampler {v.sampler!r} and needs stride >= 1 "
                 "(FD key-step stride / DeepCache cache interval)", sec, "stride", i)
    if v.sampler in ADAPTIVE_SAMPLERS:
        if v.threshold is None or not v.threshold >= 0:
            chk.fail(f"variations[{i}] ({v.id}) uses sampler {v.sampler!r} and needs threshold >= 0 (the accumulated "
                     "relative change of conv_in's output that triggers a refresh; 0 refreshes every step, "
                     f"fcr-sample's default is {DEFAULT_ADAPTIVE_THRESHOLD})", sec, "threshold", i)
        if v.stride is not None:
            chk.fail(f"variations[{i}] ({v.id}) has stride = {v.stride} but sampler {v.sampler!r} decides its "
                     "refreshes at run time; drop stride (set threshold)", sec, "stride", i)
    elif v.threshold is not None:
        chk.fail(f"variations[{i}] ({v.id}) has threshold = {v.threshold} but sampler {v.sampler!r} is not adaptive; "
                 f"use one of {ADAPTIVE_SAMPLERS}, or drop threshold", sec, "threshold", i)
    if v.sampler == "none" and v.stride is not None:
        chk.fail(f"variations[{i}] ({v.id}) has stride = {v.stride} but sampler = 'none'; use sampler 'fd' or "
                 "'deepcache', or drop stride", sec, "stride", i)
    chk.one_of(v.schedule, NAMED_SCHEDULES, f"variations[{i}] ({v.id}).schedule", sec, "schedule", i)
    if v.scheduler is not None:
        chk.one_of(v.scheduler, SCHEDULERS, f"variations[{i}] ({v.id}).scheduler", sec, "scheduler", i)
    if v.lambda_fcr is not None and v.lambda_fcr < 0:
        chk.fail(f"variations[{i}] ({v.id}).lambda_fcr = {v.lambda_fcr} must be >= 0 (0 = fine-tune without FCR)",
                 sec, "lambda_fcr", i)
    if v.blocks is not None:
        chk.one_of(v.blocks, BLOCKS, f"variations[{i}] ({v.id}).blocks", sec, "blocks", i)
    if v.delta_unit is not None:
        chk.one_of(v.delta_unit, DELTA_UNITS, f"variations[{i}] ({v.id}).delta_unit", sec, "delta_unit", i)
    if v.distance is not None:
        chk.one_of(v.distance, DISTANCES, f"variations[{i}] ({v.id}).distance", sec, "distance", i)
    if not v.finetuned and any(x is not None for x in (v.delta_max, v.blocks, v.finetune_data, v.delta_unit,
                                                       v.distance)):
        chk.fail(f"variations[{i}] ({v.id}) sets fine-tune options but no lambda_fcr, lambda_oc or lambda_rollout "
                 "(no fine-tune)", sec, None, i)
    check_output_consistency(chk, v, i)
    check_rollout(chk, v, i, steps)
    chk.one_of(v.robustness, list(robustness), f"variations[{i}] ({v.id}).robustness", sec, "robustness", i)
    for k, roles in (("eval_prompts", ("eval",)), ("finetune_data", ("finetune",))):
        val = getattr(v, k)
        if val is not None:
            chk.one_of(val, list(datasets), f"variations[{i}] ({v.id}).{k}", sec, k, i)
            if datasets[val].role not in roles:
                chk.fail(f"variations[{i}] ({v.id}).{k} = {val!r} has role {datasets[val].role!r}, expected "
                         f"{list(roles)}", sec, k, i)


def check_output_consistency(chk: Checker, v: VariationSpec, i: int) -> None:
    """``lambda_oc`` and its options: one objective per fine-tune, each option only with its term."""
    sec = "variations"
    if v.lambda_oc is None:
        for k in ("oc_cache", "oc_trainable"):
            if getattr(v, k) is not None:
                chk.fail(f"variations[{i}] ({v.id}).{k} is an option of the output-consistency term, but the "
                         "variation sets no lambda_oc", sec, k, i)
        return
    if v.lambda_fcr is not None:
        chk.fail(f"variations[{i}] ({v.id}) sets both lambda_fcr and lambda_oc: a fine-tune trains one term "
                 "besides denoising; make two variations", sec, "lambda_oc", i)
    if not v.lambda_oc > 0:
        chk.fail(f"variations[{i}] ({v.id}).lambda_oc = {v.lambda_oc} must be > 0 (the λ = 0 control is "
                 "lambda_fcr = 0)", sec, "lambda_oc", i)
    if v.blocks is not None:
        chk.fail(f"variations[{i}] ({v.id}).blocks chooses FCR's encoder blocks; the output-consistency term "
                 "compares the UNet's outputs (oc_cache says whose stale features): drop blocks", sec, "blocks", i)
    if v.oc_cache is not None:
        chk.one_of(v.oc_cache, OC_CACHES, f"variations[{i}] ({v.id}).oc_cache", sec, "oc_cache", i)
    if v.oc_trainable is not None:
        chk.one_of(v.oc_trainable, OC_TRAINABLE, f"variations[{i}] ({v.id}).oc_trainable", sec, "oc_trainable", i)
