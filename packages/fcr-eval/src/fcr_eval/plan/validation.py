"""Checks that run before any work: every real model can be loaded here, every local file the
plan needs is on disk, the store path can be a results store and the device exists.
``fcr-eval run`` stops at the first that fails; ``fcr-eval plan`` runs the same checks offline
(:func:`model_problems` reads files only) and shows each failure as a warning in the plan
(``--strict``: as the error ``run`` gives)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fcr_eval.spec.experiment import Experiment
from fcr_eval.spec.vocabulary import PACKAGED_DATASET_KINDS

if TYPE_CHECKING:  # the planner brings scipy (~1 s of CPU): a bad store or device is refused without it
    from fcr_eval.plan.planner import Plan

__all__ = ["model_problems", "hub_reachable", "check_models", "check_inputs", "check_store", "check_device"]


def model_problems(exp: Experiment) -> list[str]:
    """Why each real model of ``exp`` cannot be loaded here, without loading it and without the
    network: a local folder must hold the diffusers parts, a hub id must be in the local Hugging
    Face cache. Empty when every model is here. Takes milliseconds (no torch).

    Example:
        >>> model_problems(load_experiment("experiments/exp-1-main-ablation.toml"))
        ["model 'sd15' (stable-diffusion-v1-5/stable-diffusion-v1-5) is not available here ..."]
    """
    from fcr_sample.vocabulary import MODEL_IDS
    from fcr_train.vocabulary import SD_PARTS

    out = []
    for m in exp.models.values():
        if m.embedded:
            continue
        source = MODEL_IDS.get(m.source, m.source)
        folder = Path(source).expanduser()
        use_local = (f"to use a local copy, set `source = \"/path/to/folder\"` (a diffusers folder with "
                     f"{', '.join(SD_PARTS)}/) for [[models]] id = {m.id!r} in {exp.path}")
        if folder.is_dir():
            missing = [p for p in SD_PARTS if not (folder / p).is_dir()]
            if missing:
                out.append(f"model {m.id!r}: the folder {folder} lacks {missing} (a diffusers layout has "
                           f"{', '.join(SD_PARTS)}/); fix the folder or {use_local}")
            continue
        if source.startswith((".", "/", "~")) or source.count("/") != 1:
            out.append(f"model {m.id!r}: source = {m.source!r} is neither a folder here nor a hub id "
                       f"(org/name; short names: {', '.join(MODEL_IDS)}); {use_local}")
            continue
        if not _in_hub_cache(source, SD_PARTS):
            out.append(f"model {m.id!r} ({source}) is not available here (not in the Hugging Face cache "
                       f"{_hub_cache()}). Download it where the hub is reachable (`huggingface-cli download "
                       f"{source}`); {use_local}, or point HF_HOME at a cache that holds it")
    return out


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _in_hub_cache(repo_id: str, parts) -> bool:
    """Whether every part's config is in the local cache (reads files only)."""
    from huggingface_hub import try_to_load_from_cache

    files = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
             "tokenizer": "tokenizer_config.json", "scheduler": "scheduler_config.json"}
    return all(isinstance(try_to_load_from_cache(repo_id, f"{p}/{files.get(p, 'config.json')}"), str) for p in parts)


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the Hugging Face endpoint (``False`` when ``HF_HUB_OFFLINE`` is set):
    checked once, so an unreachable hub is not retried part by part."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
    except OSError:
        return False
    return True


def check_models(exp: Experiment) -> None:
    """Fail early, naming the model and how to point at a local copy, when a real (non-embedded)
    model of ``exp`` cannot be loaded here. A model that is not on this machine is an error at once
    when the hub is not reachable (one connection attempt, no retries); otherwise it is loaded
    (downloaded when missing) as the run will.

    Raises:
        fcr_train.models.ModelNotAvailableError
    """
    from fcr_sample.loading import ModelNotAvailableError

    problems = model_problems(exp)
    if problems and not hub_reachable():
        raise ModelNotAvailableError(f"experiment {exp.id}: {problems[0]}. The hub is not reachable from here"
                                     + (f" ({len(problems) - 1} more model(s) missing)" if len(problems) > 1 else ""))
    from fcr_train.models import load_sd_components

    for m in exp.models.values():
        if m.embedded:
            continue
        try:
            load_sd_components(m.source)
        except ModelNotAvailableError as e:
            reason = str(e.__cause__ or e).splitlines()[0][:200]
            raise ModelNotAvailableError(
                f"experiment {exp.id}: model {m.id!r} ({m.source}) is not available ({reason}). To use a local copy, "
                f"set `source = \"/path/to/folder\"` for [[models]] id = {m.id!r} in {exp.path}.") from e


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
        if ds.kind in PACKAGED_DATASET_KINDS:
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


def check_store(path: str | Path, *, must_exist: bool, for_writing: bool = False) -> None:
    """Fail before any work when ``path`` cannot be the results store (see
    :func:`fcr_eval.store.results.check_results_store`): a directory, a pipe, a file that is not a
    DuckDB database or is cut off, a human-study file or someone else's database, a folder that
    does not exist, a read-only file or folder when ``for_writing`` (``run``), or — with
    ``must_exist`` (``report``) — no file at all. Opens the file read-only and creates nothing.

    Raises:
        fcr_eval.store.db.StoreUnreadableError: what is wrong and what to do.
        fcr_eval.store.db.StoreLockedError: another process holds the file for longer than the timeout.
    """
    from fcr_eval.store.results import check_results_store

    check_results_store(path, must_exist=must_exist, for_writing=for_writing)


def check_device(device: str | None) -> None:
    """Fail before any work when ``--device`` names a device this machine does not have.

    Args:
        device: ``None`` (CUDA when present, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    Raises:
        fcr_common.cli_errors.UserError: not a device name, or the device is not here.
    """
    if device is None:
        return
    import torch
    from fcr_common.cli_errors import UserError

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
