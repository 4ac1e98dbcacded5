"""Run identity: what enters a run id and a fine-tune key — the one place that decides it.

A run (variation × seed) is stored and skipped under its run id,
``make_run_id(experiment, variation, seed, config)``: a hash of :func:`run_config`, the run's
resolved settings (stored with the run). A fine-tune is trained once into the folder named by
:func:`finetune_key`, a readable prefix and a hash of :func:`finetune_key_record`; runs record it
through :func:`finetune_record`. What enters these records decides which stored runs and fine-tunes
a plan finds again: a value that changes them makes every run it touches look new, and a setting
that changes results but is left out lets two different settings share one run or one fine-tune.

So every field of every spec table a run is made from has a decision in :data:`DECISIONS`:

* ``RECORDED`` — in the run's config, hence its id;
* ``RECORDED_WHEN_SET`` — recorded only when set (``None`` is left out): added after runs were
  stored, so the ids of files that do not use it stay what they were;
* ``KEY`` / ``KEY_WHEN_NOT_DEFAULT`` — a fine-tune setting: in the fine-tune key's hash and in the
  run's ``finetune`` record (the latter only when it differs from its default,
  :data:`LATER_FINETUNE_OPTIONS`);
* ``TRAINER`` — how the trainer runs: in the key's hash (its ``train`` record), not repeated in the
  run's ``finetune`` record (the key, which the record holds, already differs);
* ``WITH_ITS_METRIC`` — an evaluation setting recorded only when its metric is requested;
* ``NOT_IDENTITY`` — left out, with the reason it cannot change a stored number.

``tests/fcr_eval/plan/test_identity.py`` fails when a field has no decision, and pins every
committed experiment file's run ids and fine-tune keys (all profiles): a change to either is a
decision to make here, in the same commit, with the files whose ids it changes named.

Example::

    key = finetune_key(planned_finetune)        # 'ft-lam0.15-d10-ss-all-s0-1a2b3c4d'
    config = run_config(exp.id, variation, seed, model=..., sampling=..., robustness=..., evaluation=..., finetune=...)
    make_run_id(exp.id, variation.id, seed, config)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Any

from fcr_eval.spec.experiment import EvaluationSpec, VariationSpec

__all__ = ["DECISIONS", "RECORDED", "RECORDED_WHEN_SET", "KEY", "KEY_WHEN_NOT_DEFAULT", "TRAINER",
           "WITH_ITS_METRIC", "NOT_IDENTITY", "LATER_VARIATION_FIELDS", "EXPERIMENT_LEVEL_EVALUATION",
           "FROZEN_EVALUATION",
           "LATER_EVALUATION", "LATER_FINETUNE_OPTIONS", "undecided_fields", "short_hash", "lambda_text",
           "variation_record", "evaluation_record", "finetune_key_record", "finetune_key", "finetune_record",
           "run_config"]

RECORDED = "recorded"
RECORDED_WHEN_SET = "recorded when set"
KEY = "fine-tune key"
KEY_WHEN_NOT_DEFAULT = "fine-tune key, when not its default"
TRAINER = "fine-tune key (train record)"
WITH_ITS_METRIC = "recorded with its metric"
NOT_IDENTITY = "not identity"

_VARIATION = {
    **{f: (RECORDED, "") for f in (
        "id", "model", "sampler", "description", "stride", "parallel_decoding", "schedule", "prior_noise_alpha",
        "cache_branch_id", "lambda_fcr", "delta_max", "blocks", "finetune_data", "scheduler",
        "num_inference_steps", "guidance_scale", "resolution", "robustness", "eval_prompts")},
    **{f: (RECORDED_WHEN_SET, "added after the first release") for f in (
        "delta_unit", "distance", "lambda_oc", "oc_cache", "oc_trainable", "lambda_rollout", "rollout_k",
        "rollout_cache", "rollout_target", "rollout_noise_power", "rollout_trainable", "rollout_rows",
        "rollout_guidance_scale")},
    "threshold": (RECORDED_WHEN_SET, "the adaptive caches' refresh threshold (issue 26); unset for every other "
                                     "sampler, so committed files' run ids stay"),
    "profiles": (NOT_IDENTITY, "which profiles list a variation says nothing of how its numbers are produced "
                               "(recorded as unset)"),
}
_FINETUNE = {
    **{f: (KEY, "") for f in ("data", "steps", "batch_size", "lr", "delta_max", "blocks")},
    "per_seed": (KEY, "through the seed in the key"),
    **{f: (KEY_WHEN_NOT_DEFAULT, "added after the first release") for f in ("delta_unit", "distance")},
    **{f: (TRAINER, "") for f in ("weight_decay", "warmup_steps", "ema_decay", "mixed_precision")},
    "cond_dropout": (KEY_WHEN_NOT_DEFAULT, "the share of rows trained with the null text changes the weights"),
    "early_stopping": (KEY_WHEN_NOT_DEFAULT, "stopping early changes the weights; two settings that differ only "
                                             "in it must not share a fine-tune"),
    "checkpoint_every": (NOT_IDENTITY, "how often the trainer saves: resuming is exact and validation saves its "
                                       "own checkpoints, so the weights do not depend on it"),
    "optimizer": (NOT_IDENTITY, "one value is accepted (adamw); a second one must enter the key"),
}
_EARLY_STOPPING = {f: (KEY, "through finetune.early_stopping") for f in (
    "metric", "every", "mini_val_size", "window", "patience", "mini_val")}
_SAMPLING = {
    **{f: (RECORDED, "as the run's effective value (a variation may override it)") for f in (
        "scheduler", "num_inference_steps", "guidance_scale", "resolution", "n_samples", "eval_prompts")},
    "dtype": (RECORDED_WHEN_SET, "recorded when not float32 (added after the first release)"),
    "batch_size": (NOT_IDENTITY, "every sample draws its own x_T; batching changes no sample beyond float rounding"),
}
_EVALUATION = {
    **{f: (RECORDED, "") for f in (
        "metrics", "feature_extractor", "feature_image_size", "inception_weights", "clip_model", "reference",
        "n_reference", "timing_batch_sizes", "timing_repeats", "timing_seeds", "sigma2_delta_max", "sigma2_samples",
        "sigma2_blocks", "clip_drift_samples", "kid_subset_size", "pr_k", "grid_per_class")},
    **{f: (WITH_ITS_METRIC, "only with cache_attribution") for f in ("attribution_samples",
                                                                     "attribution_propagation")},
    "attribution_variations": (RECORDED_WHEN_SET, "added after the first release"),
    "timing_rounds": (NOT_IDENTITY, "the experiment's interleaved timing session, not a run's setting"),
    "save_samples": (NOT_IDENTITY, "which PNGs are written: no metric reads them (recorded as its first "
                                   "release's value, FROZEN_EVALUATION, so stored run ids stay valid)"),
}

#: Evaluation fields that once were identity and no longer are: every run's record carries the
#: value every stored run was made with, whatever the file says, so no run id moves.
FROZEN_EVALUATION = {"save_samples": True}

#: Every field of the spec tables a run is made from → (decision, reason). A field without a row
#: is undecided (:func:`undecided_fields`), and the identity test fails naming it.
DECISIONS: dict[str, dict[str, tuple[str, str]]] = {
    "VariationSpec": _VARIATION,
    "FinetuneSpec": _FINETUNE,
    "EarlyStoppingSpec": _EARLY_STOPPING,
    "SamplingSpec": _SAMPLING,
    "EvaluationSpec": _EVALUATION,
    "ModelSpec": {"*": (RECORDED, "the whole [[models]] table")},
    "RobustnessSpec": {"*": (RECORDED, "the whole [[robustness]] table")},
}

#: Variation fields recorded only when set, so that the run ids of earlier files stay the same.
LATER_VARIATION_FIELDS = tuple(f for f, (d, _) in _VARIATION.items() if d == RECORDED_WHEN_SET)

#: Evaluation settings of the whole experiment, not of a run: kept out of the run's record.
EXPERIMENT_LEVEL_EVALUATION = tuple(f for f, (d, _) in _EVALUATION.items() if d == NOT_IDENTITY)

#: Evaluation settings that only matter with their metric: kept out of the run's record without it.
LATER_EVALUATION = {"cache_attribution": tuple(f for f, (d, _) in _EVALUATION.items() if d == WITH_ITS_METRIC)}

#: Fine-tune options recorded (in the key's hash and the run's ``finetune`` record) only when they
#: differ from these defaults, so the keys and run ids of files that do not set them stay the same.
LATER_FINETUNE_OPTIONS = {"delta_unit": "timesteps", "sampler_steps": None, "distance": "mse",
                          "lambda_oc": None, "oc_cache": "fd", "oc_trainable": "recomputed", "rollout": None,
                          "cond_dropout": 0.1, "early_stopping": None}

#: The trainer settings hashed into a fine-tune key (its ``train`` record).
_KEY_TRAINER_FIELDS = tuple(f for f, (d, _) in _FINETUNE.items() if d == TRAINER)
#: A PlannedFinetune's fields that are not settings of the weights, or are in the key only.
_NOT_RECORDED = ("variations", "est_flops", "est_seconds", "output_dir", "cost", "checkpoint_every",
                 *_KEY_TRAINER_FIELDS)


def undecided_fields(cls: type, name: str | None = None) -> list[str]:
    """Fields of the dataclass ``cls`` with no decision in :data:`DECISIONS` (under ``name``, by
    default the class's name), and decisions for fields it no longer has."""
    import dataclasses

    table = DECISIONS.get(name or cls.__name__)
    fields = [f.name for f in dataclasses.fields(cls)]
    if table is None:
        return fields
    if "*" in table:
        return []
    return sorted(set(fields).symmetric_difference(table))


def short_hash(obj: Any) -> str:
    """Eight hex digits of the SHA-256 of ``obj`` as sorted JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def lambda_text(lam: float) -> str:
    """λ in a folder name: two decimals, or all its digits when two would round it (0.0015)."""
    return f"{lam:.2f}" if round(lam, 2) == lam else f"{lam:g}"


def variation_record(v: VariationSpec) -> dict:
    """A variation as its run's config records it."""
    rec = {k: x for k, x in asdict(v).items() if not (k in LATER_VARIATION_FIELDS and x is None)}
    # Which profiles a variation belongs to says nothing about how its numbers were produced:
    # recorded as unset (as it was for every variation that did not restrict its profiles).
    rec["profiles"] = None
    return rec


def evaluation_record(ev: EvaluationSpec) -> dict:
    """The ``[evaluation]`` table as a run's config records it."""
    unused = {k for metric, keys in LATER_EVALUATION.items() if metric not in ev.metrics for k in keys}
    if ev.attribution_variations is None:  # added later: recorded only when set
        unused.add("attribution_variations")
    rec = {k: x for k, x in asdict(ev).items() if k not in EXPERIMENT_LEVEL_EVALUATION and k not in unused}
    return {**rec, **FROZEN_EVALUATION}


def _later_options(ft) -> dict:
    out = {}
    for k, default in LATER_FINETUNE_OPTIONS.items():
        value = getattr(ft, k)
        if value != default:
            out[k] = asdict(value) if k == "early_stopping" else value
    return out


def finetune_key_record(ft) -> dict:
    """What the hash in a fine-tune's key covers, read off a
    :class:`~fcr_eval.plan.planner.PlannedFinetune` ``ft``."""
    return {"model": ft.model, "lambda_fcr": ft.lambda_fcr, "delta_max": ft.delta_max, "blocks": ft.blocks,
            "data": ft.data, "steps": ft.steps, "batch_size": ft.batch_size, "lr": ft.lr, "seed": ft.seed,
            "train": {k: getattr(ft, k) for k in _KEY_TRAINER_FIELDS}, **_later_options(ft)}


def finetune_key(ft) -> str:
    """The fine-tune's key (its folder name): the objective, λ, Δ_max, unit and distance tags,
    blocks or cache, seed, and :func:`short_hash` of :func:`finetune_key_record`."""
    tags = ("-ss" if ft.delta_unit == "sampler_steps" else "") + ("" if ft.distance == "mse" else f"-{ft.distance}")
    digest = short_hash(finetune_key_record(ft))
    if ft.rollout is not None:
        r = ft.rollout
        return f"ft-ro{lambda_text(r['lam'])}-k{r['k']}-{r['cache']}-{r['target']}{tags}-s{ft.seed}-{digest}"
    if ft.lambda_oc is not None:
        trainable = "" if ft.oc_trainable == "recomputed" else f"-{ft.oc_trainable}"
        return f"ft-oc{lambda_text(ft.lambda_oc)}-d{ft.delta_max}{tags}-{ft.oc_cache}{trainable}-s{ft.seed}-{digest}"
    return f"ft-lam{lambda_text(ft.lambda_fcr)}-d{ft.delta_max}{tags}-{ft.blocks}-s{ft.seed}-{digest}"


def finetune_record(ft) -> dict:
    """The settings that define the weights, as a run's config records them (no estimates, no
    folder). The options added later appear only when they differ from their defaults, so the run
    ids of earlier experiments stay the same."""
    out = {k: v for k, v in asdict(ft).items() if k not in (*_NOT_RECORDED, *LATER_FINETUNE_OPTIONS)}
    out.update(_later_options(ft))
    return out


def run_config(experiment_id: str, v: VariationSpec, seed: int, *, model: dict, sampling: dict, robustness: dict,
               evaluation: EvaluationSpec, finetune) -> dict:
    """A run's resolved settings as one record: hashed into its run id and stored with it.

    Args:
        model: the model's spec as a record; ``sampling``: the run's effective sampling settings;
        robustness: its protocol as a record; ``finetune``: the PlannedFinetune it samples, or ``None``.
    """
    return {"experiment_id": experiment_id, "variation": variation_record(v), "seed": seed, "model": model,
            "sampling": sampling, "robustness": robustness, "evaluation": evaluation_record(evaluation),
            "finetune": finetune_record(finetune) if finetune is not None else None}
