"""Early-stopping validation whose moving window survives a resumed fine-tune.

fcr-train's trainer calls ``validation_fn(unet, step) -> float`` every ``validate_every`` steps
and stops after ``early_stopping_patience`` calls without improvement; its own counters are
restored from checkpoints on resume.  A *moving* metric (the mean over the last ``window``
validations, e.g. moving FID in exp-1) also needs the earlier values, so
:class:`MovingValidation` keeps them in a JSON file in the fine-tune's folder. A resumed run
then sees the same moving values as an uninterrupted one.

History file (written atomically: a temporary file in the same folder, then ``os.replace``)::

    {"format": "fcr-moving-validation", "version": 1, "window": 3,
     "history": [{"step": 500, "value": 41.2}, {"step": 1000, "value": 39.8}]}
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

__all__ = ["MovingValidation"]

logger = logging.getLogger(__name__)

_FORMAT = "fcr-moving-validation"
_VERSION = 1


class MovingValidation:
    """``validation_fn(unet, step)`` for fcr-train: the mean of ``metric_fn`` over the last
    ``window`` validations, with the history persisted in ``history_path``.

    Each call computes ``metric_fn(unet, step)``, drops the recorded entries at ``step`` or
    later (a run resumed from an earlier checkpoint redoes those steps, so their validations are
    recomputed rather than counted twice), appends ``(step, value)``, writes the file and returns
    the moving mean. A new instance on the same file carries on where the last one stopped.

    Args:
        metric_fn: ``fn(unet, step) -> float``, e.g. the Fréchet distance of a mini-val sample.
        window: number of most recent validations averaged (>= 1).
        history_path: JSON file holding the history, normally in the fine-tune's output folder.
            A missing file starts an empty history.
        name: what the metric is, for the log lines.

    Raises:
        ValueError: ``window`` < 1, or ``history_path`` exists but is not a readable history
            (the message names the file); a call whose metric is NaN or infinite (nothing is
            recorded then).

    Example:
        >>> moving_fd = MovingValidation(mini_val_fd, window=3,
        ...                              history_path=Path(run_dir) / "moving_fd_history.json")
        >>> finetune(cfg, validation_fn=moving_fd)   # cfg.train.resume=True picks up after a crash
        >>> moving_fd.history
        [(500, 41.2), (1000, 39.8), (1500, 40.5)]
    """

    def __init__(self, metric_fn: Callable[[object, int], float], window: int, history_path: str | os.PathLike,
                 *, name: str = "metric"):
        if int(window) != window or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window!r}")
        self.metric_fn = metric_fn
        self.window = int(window)
        self.history_path = Path(history_path)
        self.name = name
        self._history = _load_history(self.history_path)
        if self._history:
            logger.info("%s: %d earlier validations (steps %d..%d)", self.history_path, len(self._history),
                        self._history[0][0], self._history[-1][0])

    @property
    def history(self) -> list[tuple[int, float]]:
        """The recorded ``(step, value)`` pairs, oldest first (a copy)."""
        return list(self._history)

    def __call__(self, unet, step: int) -> float:
        step = int(step)
        value = float(self.metric_fn(unet, step))
        if not math.isfinite(value):
            raise ValueError(f"{self.name} at step {step} is {value}; not recorded in {self.history_path}")
        history = [(s, v) for s, v in self._history if s < step]
        dropped = len(self._history) - len(history)
        if dropped:
            logger.info("%s: dropped %d validations at step >= %d (redone after resume)",
                        self.history_path, dropped, step)
        history.append((step, value))
        _write_history(self.history_path, history, self.window)
        self._history = history
        recent = [v for _, v in history[-self.window:]]
        moving = sum(recent) / len(recent)
        logger.info("step %d: %s %.5g, moving mean over %d validations (window %d) %.5g",
                    step, self.name, value, len(recent), self.window, moving)
        return moving


def _load_history(path: Path) -> list[tuple[int, float]]:
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
        if data.get("format") != _FORMAT:
            raise ValueError(f"format is {data.get('format')!r}, expected {_FORMAT!r}")
        if data.get("version") != _VERSION:
            raise ValueError(f"version {data.get('version')!r} is not supported (expected {_VERSION})")
        history = [(r["step"], r["value"]) for r in data["history"]]
        for s, v in history:
            if type(s) is not int or not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"bad entry step={s!r} value={v!r}")
        if any(a[0] >= b[0] for a, b in pairwise(history)):
            raise ValueError("steps are not strictly increasing")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, KeyError, TypeError) as e:
        raise ValueError(
            f"{path}: not a readable moving-validation history ({type(e).__name__}: {e}). Restore it, or delete "
            "it to restart the moving window (early stopping will then differ from an uninterrupted run)."
        ) from e
    return [(s, float(v)) for s, v in history]


def _write_history(path: Path, history: list[tuple[int, float]], window: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"format": _FORMAT, "version": _VERSION, "window": window,
                       "history": [{"step": s, "value": v} for s, v in history]}, indent=1)
    # A unique temporary name: with several training processes every one of them validates.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
