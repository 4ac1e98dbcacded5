"""Set-level metrics of a generated set that is never in memory at once.

A run's features arrive one batch at a time and are spilled to disk (:class:`FeatureSpill`, one
``.npy`` per run, read back memory-mapped); these functions compute from such an array (or any
``(N, D)`` array-like) in row chunks, so memory depends on the chunk and the feature dimension,
never on N:

* :class:`RunningMoments` — mean and unbiased covariance in float64, merged chunk by chunk
  (Chan, Golub & LeVeque's pairwise update: no catastrophic cancellation of Σxxᵀ − nμμᵀ); the
  Fréchet statistics.
* :func:`check_rows` — the finiteness check of :func:`fcr_eval.metrics.frechet.feature_matrix`, by chunk.

The other set-level metrics read array-likes the same way: precision and recall compute their
k-NN block by block (:mod:`fcr_eval.metrics.precision_recall`: no ``n × n`` matrix), KID gathers
its random subsets' rows (:func:`fcr_eval.metrics.kid.kernel_distance`) and the Inception Score
reads its logits chunk by chunk (:func:`fcr_eval.metrics.inception_score.inception_score`).

Example:
    >>> spill = FeatureSpill(run_dir / "features.npy", dim=1280)
    >>> for batch in batches: spill.append(batch)        # or write_rows(start, batch) out of order
    >>> feats = spill.open()                            # (N, 1280) memory-mapped
    >>> mu, sigma = RunningMoments.of(feats).statistics()
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["RunningMoments", "FeatureSpill", "check_rows", "iter_chunks", "CHUNK_ROWS"]

#: Rows per chunk: 4,096 × 2,048 float64 features are 64 MiB.
CHUNK_ROWS = 4096


def iter_chunks(x, chunk: int = CHUNK_ROWS):
    """``(start, float64 array)`` row chunks of an ``(N, D)`` array-like."""
    for i in range(0, x.shape[0], chunk):
        yield i, np.array(x[i: i + chunk], dtype=np.float64)  # a writable copy, also of a read-only map


def check_rows(x, name: str, chunk: int = CHUNK_ROWS) -> None:
    """Raise (as :func:`~fcr_eval.metrics.frechet.feature_matrix` does) unless ``x`` is a finite
    ``(N, D)`` array with N ≥ 2, reading it chunk by chunk."""
    if len(x.shape) != 2:
        raise ValueError(f"{name} must be a (N, D) feature matrix, got shape {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"{name} has {x.shape[0]} rows; a covariance needs at least 2 samples")
    for _, c in iter_chunks(x, chunk):
        if not np.isfinite(c).all():
            raise ValueError(f"{name} contains NaN or inf; check the images fed to the extractor")


class RunningMoments:
    """Mean and unbiased covariance of rows seen so far (float64), merged chunk by chunk.

    Example:
        >>> m = RunningMoments(8)
        >>> for c in np.array_split(x, 5): m.update(c)
        >>> mu, sigma = m.statistics()     # == x.mean(0), np.cov(x, rowvar=False) to rounding
    """

    def __init__(self, dim: int) -> None:
        self.n = 0
        self.mean = np.zeros(dim)
        self._m2 = np.zeros((dim, dim))  # Σ (x − mean)(x − mean)ᵀ
        self._whole: tuple[np.ndarray, np.ndarray] | None = None

    def update(self, rows) -> None:
        b = np.asarray(rows, dtype=np.float64)
        nb = b.shape[0]
        if nb == 0:
            return
        # A set that arrives in one chunk keeps np.mean / np.cov's own values, bit for bit (the
        # merged form below agrees with them to rounding only).
        self._whole = (b.mean(axis=0), np.cov(b, rowvar=False)) if self.n == 0 and nb > 1 else None
        mb = b.mean(axis=0)
        cb = b - mb
        m2b = cb.T @ cb
        n = self.n + nb
        delta = mb - self.mean
        self._m2 += m2b + np.outer(delta, delta) * (self.n * nb / n)
        self.mean = self.mean + delta * (nb / n)
        self.n = n

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mean (D,), covariance (D, D))`` with the ``N − 1`` normalisation of ``np.cov``."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.n}")
        if self._whole is not None:
            return self._whole[0].copy(), self._whole[1].copy()
        return self.mean.copy(), self._m2 / (self.n - 1)

    @classmethod
    def of(cls, x, chunk: int = CHUNK_ROWS) -> RunningMoments:
        m = cls(int(x.shape[1]))
        for _, c in iter_chunks(x, chunk):
            m.update(c)
        return m


class FeatureSpill:
    """A run's per-sample feature rows on disk: one ``(N, D)`` float64 ``.npy``, written by rows.

    Rows go in at their sample index (:meth:`write_rows`), in any order and from a resumed run, and
    each write is flushed before it returns; the file is made at its full size when first opened,
    so a reader never maps a partial header. :meth:`open` maps it read-only.
    """

    def __init__(self, path: str | Path, n: int, dim: int) -> None:
        self.path, self.n, self.dim = Path(path), int(n), int(dim)

    def _map(self, mode: str):
        return np.lib.format.open_memmap(self.path, mode=mode, dtype=np.float64, shape=(self.n, self.dim))

    def write_rows(self, start: int, rows) -> None:
        rows = np.asarray(rows, dtype=np.float64)
        if rows.ndim != 2 or rows.shape[1] != self.dim or start + len(rows) > self.n:
            raise ValueError(f"rows of shape {rows.shape} at {start} do not fit a spill of {self.n} × {self.dim}")
        if not self.path.is_file():
            tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
            np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float64, shape=(self.n, self.dim)).flush()
            try:
                os.link(tmp, self.path)  # only one process makes the file; the others find it
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        m = self._map("r+")
        m[start: start + len(rows)] = rows
        m.flush()
        del m

    def open(self):
        """The spill, memory-mapped read-only."""
        return np.load(self.path, mmap_mode="r")
