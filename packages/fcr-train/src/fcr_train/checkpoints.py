"""Is a training checkpoint usable for a resume? Cheap, read-only checks made before a run writes.

A checkpoint folder (``checkpoints/step_N``, see :mod:`fcr_train.trainer`) is written atomically,
but a full disk, a copy cut short or a crash on a file system that renames before it flushes can
still leave one whose files are cut off: accelerate then fails deep in ``torch.load``
(``PytorchStreamReader failed reading zip archive``). And a checkpoint of another UNet fails with
a ``size mismatch`` only after the run folder is set up. The checks here catch both from the
files' headers alone, without loading a tensor:

* :func:`unreadable_reason` — a file is missing or cut off (safetensors header not covering the
  file, a torch zip without its central directory, ``trainer_state.json`` not JSON);
* :func:`model_mismatch` — the checkpoint's weights have other names or shapes than the UNet;
* :func:`settings_mismatch` — the run's stored settings (``config.json``) differ from the new
  ones in a setting that changes results (a resume is exact or refused).

Example::

    problem = unreadable_reason(ckpt) or model_mismatch(ckpt, unet)
    if problem:
        raise CheckpointError(f"cannot resume from {ckpt}: {problem}")
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["CheckpointError", "unreadable_reason", "model_mismatch", "settings_mismatch", "MODEL_FILE",
           "STATE_FILE", "RESUME_FREE_SETTINGS"]

#: accelerate's model weights in a checkpoint saved with ``safe_serialization=True``.
MODEL_FILE = "model.safetensors"
#: Written last into a checkpoint by the trainer: its presence marks a complete checkpoint.
STATE_FILE = "trainer_state.json"
# Files accelerate needs besides the model; all written by torch.save (a zip archive).
_REQUIRED = (MODEL_FILE, "optimizer.bin")
# Wrappers whose prefixes a saved state dict may carry (DDP, torch.compile) and the trainer's own
# FCRObjective, which holds the UNet as ``unet``.
_PREFIXES = ("module.", "_orig_mod.", "unet.")


class CheckpointError(ValueError):
    """A checkpoint to resume from cannot be used: its files do not load (torn, truncated), or it
    holds another model's weights. The message names the checkpoint(s) and what is wrong."""


def unreadable_reason(ckpt: str | Path) -> str | None:
    """Why the checkpoint folder ``ckpt`` cannot be loaded, or ``None`` when its files are whole.

    Reads only headers: every ``*.safetensors`` (the header must cover the whole file), every
    top-level ``*.bin`` / ``*.pkl`` (a torch zip archive must have its central directory, which a
    cut-off file loses) and ``trainer_state.json`` (JSON).

    Args:
        ckpt: a ``checkpoints/step_N`` folder.

    Example:
        >>> unreadable_reason("runs/fcr/checkpoints/step_0000500")
        'optimizer.bin is cut off or not a torch file (File is not a zip file)'
    """
    from safetensors import safe_open

    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        return "not a folder"
    state = ckpt / STATE_FILE
    if not state.is_file():
        return f"no {STATE_FILE} (an unfinished checkpoint)"
    try:
        json.loads(state.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return f"{STATE_FILE} is not readable JSON ({exc})"
    for name in _REQUIRED:
        if not (ckpt / name).is_file():
            return f"{name} is missing"
    for path in sorted(ckpt.rglob("*.safetensors")):
        try:
            with safe_open(str(path), "pt"):
                pass
        except Exception as exc:  # noqa: BLE001 - safetensors' error type is private to its Rust core
            return f"{path.relative_to(ckpt)} is cut off or not a safetensors file ({exc})"
    for path in sorted(p for p in ckpt.iterdir() if p.suffix in (".bin", ".pkl") and p.is_file()):
        try:
            with zipfile.ZipFile(path):
                pass
        except (OSError, zipfile.BadZipFile) as exc:
            return f"{path.name} is cut off or not a torch file ({exc})"
    return None


def _strip(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


def model_mismatch(ckpt: str | Path, unet) -> str | None:
    """How the weights in ``ckpt`` differ from ``unet``'s parameters, or ``None`` when they match.

    Compares names and shapes from the safetensors header of ``model.safetensors`` (no tensor is
    read), so a checkpoint of another model is refused before anything is written.

    Args:
        ckpt: a ``checkpoints/step_N`` folder whose files :func:`unreadable_reason` accepts.
        unet: the model the run trains.

    Example:
        >>> model_mismatch("runs/other-model/checkpoints/step_0000004", unet)
        'conv_in.weight is [8, 1, 3, 3] in the checkpoint but [4, 1, 3, 3] in this model; ...'
    """
    from safetensors import safe_open

    want = {k: list(v.shape) for k, v in unet.state_dict().items()}
    with safe_open(str(Path(ckpt) / MODEL_FILE), "pt") as f:
        have = {_strip(k): list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not a dict
    differ = [k for k in want if k in have and have[k] != want[k]]
    missing = [k for k in want if k not in have]
    extra = [k for k in have if k not in want]
    if not (differ or missing or extra):
        return None
    if differ:
        k = differ[0]
        first = f"{k} is {have[k]} in the checkpoint but {want[k]} in this model"
    elif missing:
        first = f"{missing[0]} is not in the checkpoint"
    else:
        first = f"the checkpoint has {extra[0]}, which this model does not"
    return (f"{first}; {len(differ)} of {len(want)} tensors differ in shape, {len(missing)} are missing, "
            f"{len(extra)} are extra")


#: ``TrainConfig`` fields a resume may change: they decide where and how often the run writes,
#: when it stops (a longer ``max_steps`` or a larger early-stopping patience continues the same
#: run: the LR is constant after warm-up), how progress shows and how data is loaded, never which
#: values are computed (``grad_checkpointing`` recomputes the same activations; ``cpu`` is the
#: machine, recorded in the provenance). Every other stored setting must be the same for the
#: resume to be exact.
RESUME_FREE_SETTINGS = frozenset({
    "output_dir", "max_steps", "early_stopping_patience", "checkpoint_every", "keep_checkpoints", "log_every",
    "progress", "resume", "num_workers", "max_time_s", "max_bad_fraction", "max_bad_count", "grad_checkpointing",
    "cpu",
})
# Stored facts that are not settings of the run: output-only options of pretraining (the sample
# grid and where the weights are exported), the train config repeated inside the command's own
# config, and the resolved path of the base weights (its identity is ``base_provenance``; the
# user's choice is ``finetune.base_weights``).
_NOT_SETTINGS = ("run.finetune.train.", "run.pretrain.train.", "run.pretrain.export_dir",
                 "run.pretrain.grid_columns", "run.pretrain.sample_steps", "run.pretrain.guidance_scale",
                 "run.base_weights")


def _differences(old: Any, new: Any, key: str, out: list[tuple[str, Any, Any]]) -> list[tuple[str, Any, Any]]:
    """(dotted key, old, new) for every leaf that differs; a mapping on one side only is one line."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for k in sorted(set(old) | set(new)):
            _differences(old.get(k), new.get(k), f"{key}.{k}" if key else k, out)
    elif old != new:
        out.append((key, old, new))
    return out


def _shown(key: str) -> str:
    for prefix in ("train.", "run.finetune.", "run.pretrain.", "run."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def settings_mismatch(stored: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The settings that change results and differ between a run's stored ``config.json`` and a
    resume of it, one ``"name = stored in the stored run, new now"`` line each; ``[]`` when the
    resume is exact.

    Both mappings have the ``config.json`` keys the trainer writes: ``train`` (the
    ``TrainConfig``), ``run`` (the command's model and data) and ``dataset`` (its type and size).
    Fields of :data:`RESUME_FREE_SETTINGS` may differ. Values are compared as JSON stores them.

    Example:
        >>> settings_mismatch(json.loads(Path("runs/fcr/config.json").read_text()), new)
        ['fcr.lam = 0.1 in the stored run, 0.2 now', 'batch_size = 4 in the stored run, 8 now']
    """
    def settings(config: Mapping[str, Any]) -> dict[str, Any]:
        return json.loads(json.dumps({k: config.get(k) for k in ("train", "run", "dataset")}, default=str))

    free = {f"train.{name}" for name in RESUME_FREE_SETTINGS}
    return [f"{_shown(key)} = {old!r} in the stored run, {now!r} now"
            for key, old, now in _differences(settings(stored), settings(new), "", [])
            if key not in free and not key.startswith(_NOT_SETTINGS)]
