"""Run identity: what enters a run id and a fine-tune key.

A run (variation × seed) is stored and skipped under its run id,
``make_run_id(experiment, variation, seed, config)``: a hash of :func:`run_config`, the run's
resolved settings. A fine-tune is trained once into the folder named by :func:`finetune_key`, a
readable prefix and a hash of :func:`finetune_key_record`. So what enters these records decides
which stored runs and fine-tunes a plan finds again; a value that changes them makes every run of
every stored experiment look new.

Example::

    key = finetune_key(planned_finetune)        # 'ft-lam0.15-d10-ss-all-s0-1a2b3c4d'
    config = run_config(exp, variation, seed, sampling=..., robustness=..., evaluation=..., finetune=...)
    make_run_id(exp.id, variation.id, seed, config)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Any

from fcr_eval.spec.experiment import EvaluationSpec, VariationSpec

__all__ = ["TRAINER_FIELDS", "LATER_VARIATION_FIELDS", "EXPERIMENT_LEVEL_EVALUATION", "LATER_EVALUATION",
           "LATER_FINETUNE_OPTIONS", "short_hash", "lambda_text", "variation_record", "evaluation_record",
           "finetune_key_record", "finetune_key", "finetune_record", "run_config"]

#: How the trainer runs: part of the fine-tune's key (its hash), not of :func:`finetune_record`.
TRAINER_FIELDS = ("weight_decay", "warmup_steps", "ema_decay", "mixed_precision", "checkpoint_every",
                  "cond_dropout", "early_stopping")

#: Variation fields added after the first release: recorded only when set, so that the config
#: records (and run ids) of earlier experiment files stay the same.
LATER_VARIATION_FIELDS = ("delta_unit", "distance", "lambda_oc", "oc_cache", "oc_trainable", "lambda_rollout",
                          "rollout_k", "rollout_cache", "rollout_target", "rollout_noise_power", "rollout_trainable",
                          "rollout_rows", "rollout_guidance_scale")

#: Evaluation settings of the whole experiment, not of a run: kept out of the run's record.
EXPERIMENT_LEVEL_EVALUATION = ("timing_rounds",)

#: Evaluation settings added after the first release that only matter with their metric: kept out
#: of the run's record without it, so the run ids of experiments that do not use them stay stable.
LATER_EVALUATION = {"cache_attribution": ("attribution_samples", "attribution_propagation")}

#: Fine-tune options a fine-tune's identity gained after the first release, with their defaults:
#: recorded only when they differ from these.
LATER_FINETUNE_OPTIONS = {"delta_unit": "timesteps", "sampler_steps": None, "distance": "mse",
                          "lambda_oc": None, "oc_cache": "fd", "oc_trainable": "recomputed", "rollout": None}

#: The trainer settings hashed into a fine-tune key (its ``train`` record).
_KEY_TRAINER_FIELDS = ("weight_decay", "warmup_steps", "ema_decay", "mixed_precision")
#: A PlannedFinetune's fields that are not settings of the weights.
_NOT_SETTINGS = ("variations", "est_flops", "est_seconds", "output_dir", "cost")


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
    return {k: x for k, x in asdict(ev).items() if k not in EXPERIMENT_LEVEL_EVALUATION and k not in unused}


def _later_options(ft) -> dict:
    return {k: getattr(ft, k) for k, default in LATER_FINETUNE_OPTIONS.items() if getattr(ft, k) != default}


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
    out = {k: v for k, v in asdict(ft).items() if k not in (*_NOT_SETTINGS, *TRAINER_FIELDS,
                                                            *LATER_FINETUNE_OPTIONS)}
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
