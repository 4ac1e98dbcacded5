"""A run's batches: the grid, which process samples which batch, and the files that make each
finished batch durable — so memory does not grow with the sample count and a killed run resumes
at its first unfinished batch.

* :class:`BatchGrid` — batch ``k`` holds samples ``[k·b, min((k+1)·b, n))`` whatever the number of
  processes; process ``p`` of ``P`` does the batches ``k ≡ p (mod P)``. Every sample is sampled in
  the same batch however many processes run, so a 2-process run stores the same per-sample
  values as one process (batch composition can change float rounding; here it cannot change).
* :class:`RunBatches` — ``<run folder>/batches/``: ``manifest.json`` (which run, sample count and
  batch size the files belong to), one ``b<k>.pkl`` per finished batch (its per-sample values,
  sample records and timings; written to a temporary file, fsynced and renamed, so it is there
  whole or not at all) and the run's feature spills ``features.npy`` / ``logits.npy``
  (:class:`~fcr_eval.metrics.streaming.FeatureSpill`; a batch's rows are written and flushed
  before its ``.pkl``). A folder of another run (another configuration, sample count or batch
  size) is refused with :class:`ResumeMismatchError` before any work. The folder is removed once
  the run is in the store.
* :class:`ReferenceSpill` — the uncached reference samples that cached runs of the same weights,
  seed and sampling settings are paired with, one ``.npy`` of float32 images (and one of their
  features) per batch, read back memory-mapped: exact, unlike an 8-bit PNG. Removed when the
  last run that needs it is stored.

Example:
    >>> grid = BatchGrid(n=1000, batch_size=64)
    >>> files = RunBatches(run.run_dir, run.run_id, grid); files.check()
    >>> [k for k in grid.assigned(procs) if not files.done(k)]     # what this process still has to do
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fcr_eval.metrics.streaming import FeatureSpill
from fcr_eval.plan.resources import REFERENCE_MODES  # the owner: the plan prices both modes

__all__ = ["BatchGrid", "RunBatches", "ReferenceSpill", "ReferencePlan", "REFERENCE_MODES", "ResumeMismatchError",
           "atomic_write_bytes"]

_FORMAT = "fcr-run-batches"
_VERSION = 1


class ResumeMismatchError(Exception):
    """A run folder holds finished batches of another run than the one planned: resuming would
    mix two runs' samples. The message says which and what to do."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all: a temporary file in the same folder,
    fsynced, renamed over ``path``, and the folder fsynced (the rename survives a power cut)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class BatchGrid:
    """The batches of a run of ``n`` samples at ``batch_size``."""

    n: int
    batch_size: int

    @property
    def count(self) -> int:
        return -(-self.n // self.batch_size)

    def bounds(self, k: int) -> range:
        """The sample indices of batch ``k``."""
        return range(k * self.batch_size, min((k + 1) * self.batch_size, self.n))

    def assigned(self, index: int, count: int) -> list[int]:
        """The batches process ``index`` of ``count`` samples: every ``count``-th, from its index."""
        return list(range(index, self.count, count))


class RunBatches:
    """The durable batches of one run under ``<run_dir>/batches`` (see the module's docstring)."""

    def __init__(self, run_dir: str | Path, run_id: str, grid: BatchGrid, label: str = "") -> None:
        self.dir = Path(run_dir) / "batches"
        self.run_id, self.grid, self.label = run_id, grid, label or run_id

    def manifest(self) -> dict:
        return {"format": _FORMAT, "version": _VERSION, "run_id": self.run_id, "n_samples": self.grid.n,
                "batch_size": self.grid.batch_size}

    def finished(self) -> list[int]:
        """The batches already written."""
        return [k for k in range(self.grid.count) if self.done(k)]

    def check(self) -> None:
        """Refuse a folder of another run (raises :class:`ResumeMismatchError`); a missing or
        empty one is fine."""
        path = self.dir / "manifest.json"
        if not path.is_file():
            return
        try:
            found = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ResumeMismatchError(f"{path} is not a batch manifest ({err}); delete {self.dir} to start "
                                      f"{self.label} afresh") from None
        want = self.manifest()
        if found == want:
            return
        done = len(list(self.dir.glob("b*.pkl")))
        if found.get("run_id") != self.run_id:
            what = (f"holds {done} finished batch(es) of run {found.get('run_id')} (another configuration of "
                    f"{self.label}), not of the planned run {self.run_id}")
            fix = "run the experiment file and profile that started it to finish it"
        else:
            what = (f"holds {done} finished batch(es) of {self.label} made with batch_size "
                    f"{found.get('batch_size')} and {found.get('n_samples')} samples; the plan has batch_size "
                    f"{self.grid.batch_size} and {self.grid.n} samples")
            fix = f"set [sampling] batch_size = {found.get('batch_size')} to resume it"
        raise ResumeMismatchError(f"cannot resume: {self.dir} {what}. To resume, {fix}; or delete {self.dir} "
                                  "to start this run afresh")

    def start(self) -> None:
        """Make the folder and its manifest (the main process, before any batch)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if not (self.dir / "manifest.json").is_file():
            atomic_write_bytes(self.dir / "manifest.json", json.dumps(self.manifest(), indent=2).encode())

    def _path(self, k: int) -> Path:
        return self.dir / f"b{k:06d}.pkl"

    def done(self, k: int) -> bool:
        return self._path(k).is_file()

    def write(self, k: int, record: dict) -> None:
        """Batch ``k`` is finished: its record, atomically (after its feature rows)."""
        atomic_write_bytes(self._path(k), pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL))

    def read(self, k: int) -> dict:
        with open(self._path(k), "rb") as f:
            return pickle.load(f)  # noqa: S301 - our own file, written by this code

    def spill(self, name: str, dim: int) -> FeatureSpill:
        """The run's ``(n, dim)`` spill ``<name>.npy`` (``features``, ``logits``)."""
        return FeatureSpill(self.dir / f"{name}.npy", self.grid.n, dim)

    def open_spill(self, name: str):
        """A spill, memory-mapped read-only, or ``None`` when no batch wrote one."""
        path = self.dir / f"{name}.npy"
        return np.load(path, mmap_mode="r") if path.is_file() else None

    def remove(self) -> None:
        """Drop the folder: the run is in the store."""
        shutil.rmtree(self.dir, ignore_errors=True)


class ReferenceSpill:
    """Uncached reference batches of one reference key on disk, exact (float32 ``.npy``), read
    back memory-mapped; features beside them (float64). ``root/<key digest>/i<k>.npy``, ``f<k>.npy``."""

    def __init__(self, root: str | Path, digest: str) -> None:
        self.dir = Path(root) / digest

    def has(self, k: int) -> bool:
        return (self.dir / f"i{k:06d}.npy").is_file()

    def read(self, k: int):
        """``(images, features or None)`` of batch ``k``, memory-mapped."""
        feats = self.dir / f"f{k:06d}.npy"
        return (np.load(self.dir / f"i{k:06d}.npy", mmap_mode="r"),
                np.load(feats, mmap_mode="r") if feats.is_file() else None)

    def write(self, k: int, images: np.ndarray, features: np.ndarray | None) -> None:
        """Batch ``k``'s reference: the features first, so a batch with images has its features."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if features is not None:
            atomic_write_bytes(self.dir / f"f{k:06d}.npy", _npy_bytes(np.asarray(features, np.float64)))
        atomic_write_bytes(self.dir / f"i{k:06d}.npy", _npy_bytes(np.asarray(images, np.float32)))

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _npy_bytes(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


class ReferencePlan:
    """Which runs spill their uncached reference batches for later runs, and when a spill is
    dropped: a key's spill (:func:`fcr_eval.run.sampling.reference_key`) is written by the first
    run of the key that has its batches (the uncached run, which the runner orders first, or the
    first cached run) when a cached run of the key is still to come, and removed once the last
    run of the key is stored.

    Args:
        root: the experiment's folder for spills.
        runs: the runs still to do, in the order they will run.
        key_fn: ``run → reference key``.
        mode: one of :data:`REFERENCE_MODES`.
    """

    def __init__(self, root: str | Path, runs, key_fn, mode: str = "spill") -> None:
        if mode not in REFERENCE_MODES:
            raise ValueError(f"reference mode {mode!r} is not one of {REFERENCE_MODES}")
        self.root, self.key_fn, self.mode = Path(root), key_fn, mode
        self._pending: dict[tuple, list] = {}
        for r in runs:
            self._pending.setdefault(key_fn(r), []).append(r)

    def _spill(self, key) -> ReferenceSpill:
        from fcr_eval.plan.identity import short_hash

        return ReferenceSpill(self.root, short_hash(list(map(str, key))))

    def spill_for(self, run) -> tuple[ReferenceSpill | None, bool]:
        """``(the key's spill to read from, whether this run writes it)``; ``(None, False)`` in
        ``sample`` mode."""
        if self.mode != "spill":
            return None, False
        key = self.key_fn(run)
        later = [r for r in self._pending.get(key, []) if r is not run and r.sampler.cached]
        return self._spill(key), bool(later)

    def done(self, run, remove: bool = True) -> None:
        """``run`` is stored: forget it, and (``remove``: the main process) drop its key's spill
        when no cached run needs it any more."""
        key = self.key_fn(run)
        pending = [r for r in self._pending.get(key, []) if r is not run]
        self._pending[key] = pending
        if remove and self.mode == "spill" and not any(r.sampler.cached for r in pending):
            self._spill(key).remove()
            try:
                self.root.rmdir()  # the last spill: leave no empty folder beside the run folders
            except OSError:
                pass
