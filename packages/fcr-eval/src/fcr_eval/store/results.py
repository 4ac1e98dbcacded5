"""The DuckDB results store (the contract is ``docs/results-store.md``).

One file (default ``results/fcr.duckdb``) holds every finished run of every experiment: the run
row, its metrics, per-prompt scores, timings, encoder-feature statistics and sample references,
plus the success-criteria verdicts per experiment. Images live next to the store under
``results/samples/`` and are referenced by paths relative to the store's folder.

The concerns are split: :mod:`fcr_eval.records` holds the typed rows (:class:`RunRecord`, ...,
:func:`make_run_id`), :mod:`fcr_eval.store.migrations` the numbered schema, :mod:`fcr_eval.store.db` opening a
file (lock back-off, clear errors) and transactions; this module is the store itself and
re-exports the others' names, so ``from fcr_eval.store import RunRecord`` keeps working.

Concurrency. DuckDB lets one process at a time open a file for writing, and while it is open for
writing no *other* process can open it at all, not even read-only. So the store never keeps the
file open: every write and every query opens a connection, does its work and closes it. A run
is written in one transaction when it finishes, so a reader never sees half a run; if the file
is busy, the call retries for ``lock_timeout`` seconds and then raises :class:`StoreLockedError`
naming the process that holds it.

Schema versions. Writers migrate a store that is behind (:func:`fcr_eval.store.migrations.migrate`).
Readers never migrate; they refuse a store that is newer than this code and ask for a writer
(``fcr-eval migrate --store PATH``) to migrate one that is older.

Files that are not results stores. Before it migrates or writes anything, a writer looks at an
existing file read-only and refuses a human-study file or a DuckDB database of other tables
(:class:`NotAResultsStoreError`, naming what the file is); a reader refuses them too, and an
empty database. :func:`check_results_store` makes the same checks for a command before it
starts any work.

Example:
    >>> store = ResultsStore("results/fcr.duckdb")
    >>> run = RunRecord(run_id=make_run_id("exp", "fd-10", 0, cfg), experiment_id="exp",
    ...                 variation_id="fd-10", seed=0, model="embedded", dataset="fashion-mnist",
    ...                 sampler="fd", stride=10, scheduler="ddim", resolution=32,
    ...                 num_inference_steps=50, guidance_scale=3.0, config=cfg)
    >>> store.write_run(RunResult(run, metrics=[MetricRecord("fd_efficientnet_lite0", 12.3,
    ...                 "efficientnet_lite0", "resize_bilinear_224_imagenet_norm", 500)]))
    True
    >>> ResultsStore.open_readonly("results/fcr.duckdb").metrics(experiment_id="exp")

Why one module of this size: it is one class, the store's whole API (one transactional writer
and its typed readers); records and migrations live in ``records.py`` and ``migrations.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import polars as pl

from fcr_eval.records import (
    MEMORY_KINDS,
    SAMPLERS,
    VERDICTS,
    AttributionValue,
    CriterionResult,
    FeatureStat,
    MetricRecord,
    PerPromptScore,
    RunRecord,
    RunResult,
    SampleMetrics,
    SampleRecord,
    TimingRecord,
    make_run_id,
)
from fcr_eval.store.db import (
    StoreError,
    StoreLockedError,
    StoreSchemaError,
    StoreUnreadableError,
    check_complete,
    connect,
    database_kind,
    describe_database,
    store_path,
    transaction,
    utcnow,
)
from fcr_eval.store.migrations import (
    MIGRATIONS,
    SCHEMA_VERSION,
    Migration,
    apply_migrations,
    migrate,
    read_schema_version,
)

__all__ = [
    "DEFAULT_STORE_PATH",
    "SCHEMA_VERSION",
    "MIGRATIONS",
    "SAMPLERS",
    "MEMORY_KINDS",
    "VERDICTS",
    "StoreError",
    "StoreLockedError",
    "StoreSchemaError",
    "StoreUnreadableError",
    "NotAResultsStoreError",
    "check_results_store",
    "MIGRATE_COMMAND",
    "RunRecord",
    "MetricRecord",
    "PerPromptScore",
    "TimingRecord",
    "FeatureStat",
    "AttributionValue",
    "SampleRecord",
    "CriterionResult",
    "SampleMetrics",
    "RunResult",
    "ResultsStore",
    "RUN_TABLES",
    "writer_lock",
    "writer_lock_path",
    "refuse_if_writer_busy",
    "make_run_id",
    "migrate",
    "apply_migrations",
    "read_schema_version",
    "Migration",
]

logger = logging.getLogger(__name__)

DEFAULT_STORE_PATH = Path("results/fcr.duckdb")

#: The command that migrates a store to this code's schema (a reader's hint).
MIGRATE_COMMAND = "fcr-eval migrate --store {path}"


class NotAResultsStoreError(StoreUnreadableError):
    """The file is a DuckDB database but not a results store (a human-study file, someone else's
    tables, or — for reading — an empty database). Nothing was migrated or written."""


def _refuse_other_kind(con: duckdb.DuckDBPyConnection, path: Path, *, empty_is_ok: bool) -> None:
    """Refuse a file that is not a results store (or empty, with ``empty_is_ok``), or one cut off."""
    check_complete(con, path, "results store")
    kind, tables = database_kind(con)
    if kind == "results store" or (kind == "empty" and empty_is_ok):
        return
    hint = (" (the explorer reads a study's votes with `fcr-explorer --human-study PATH`)"
            if kind == "human-study file" else "")
    raise NotAResultsStoreError(
        f"{path} is not a results store: it is {describe_database(kind, tables)}{hint}. The toolkit never "
        "migrates or writes another kind of file; pass the results store (e.g. results/fcr.duckdb), or a new path for a new one")


def check_results_store(path: str | os.PathLike, *, must_exist: bool, for_writing: bool,
                        describe: str = "results store", lock_timeout: float = 5.0) -> None:
    """Fail before any work when ``path`` cannot be (or become) the results store: a folder, a
    pipe, a file that is not a DuckDB database, one cut off, a human-study file or someone else's
    database, a read-only file or folder (``for_writing``), or — with ``must_exist`` — no file at
    all. Opens the file read-only and creates nothing.

    Raises:
        StoreUnreadableError: what is wrong and what to do (:class:`NotAResultsStoreError` for
            a DuckDB file of another kind).
        StoreLockedError: another process holds the file for longer than ``lock_timeout``.
    """
    path = store_path(path, describe)
    if not path.exists() and not path.is_symlink() and not must_exist:
        if path.parent.exists() and not path.parent.is_dir():
            raise StoreUnreadableError(f"{describe} {path}: {path.parent} is a file, not a folder; pass a store "
                                       "path in a folder")
        if for_writing and path.parent.is_dir() and not os.access(path.parent, os.W_OK | os.X_OK):
            raise StoreUnreadableError(
                f"{describe} {path} cannot be written: its folder {path.parent} is read-only; pass a --store in "
                "a folder you can write, or make that one writable")
        return  # the writer creates it (and its folder)
    with connect(path, read_only=True, timeout=lock_timeout, describe=describe,
                 missing_hint="run the experiment first (`fcr-eval run <experiment.toml>`) or pass the right "
                              "--store") as con:
        _refuse_other_kind(con, path, empty_is_ok=not must_exist)  # a writer makes an empty one a store
    if for_writing:  # the checks a writer's connect makes, before the work rather than after it
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise StoreUnreadableError(
                f"{describe} {path} cannot be written: its folder {path.parent} is read-only (a writer creates its "
                "write-ahead log and lock file there); make it writable or pass another --store")
        if not os.access(path, os.W_OK):
            raise StoreUnreadableError(
                f"{describe} {path} is read-only; make it writable or pass another --store (`fcr-eval report` "
                "reads a read-only store)")


#: The tables holding a run's rows, children first (a run is deleted or replaced as a whole).
RUN_TABLES = ("metrics", "per_prompt_scores", "timings", "feature_stats", "samples", "sample_metrics",
              "sample_metric_definitions", "cache_attribution", "runs")

_POLARS_TYPES = {
    "VARCHAR": pl.String, "JSON": pl.String, "INTEGER": pl.Int64, "BIGINT": pl.Int64,
    "SMALLINT": pl.Int64, "HUGEINT": pl.Int64, "DOUBLE": pl.Float64, "FLOAT": pl.Float64,
    "BOOLEAN": pl.Boolean, "TIMESTAMP": pl.Datetime("us"), "INTEGER[]": pl.List(pl.Int64),
}


def _json(obj: Mapping[str, Any] | None) -> str:
    return json.dumps(obj or {}, sort_keys=True, default=_json_default)


def _json_default(o: Any) -> Any:
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    if isinstance(o, (Path, _dt.datetime, _dt.date)):
        return str(o)
    if hasattr(o, "tolist"):  # numpy / torch scalars and arrays
        return o.tolist()
    return str(o)


def _num(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def writer_lock_path(store_path: str | os.PathLike = DEFAULT_STORE_PATH) -> Path:
    """The lock file of the store's one writer: ``<store>.writer.lock`` beside the store."""
    path = Path(store_path)
    return path.with_name(path.name + ".writer.lock")


def writer_lock(store_path: str | os.PathLike = DEFAULT_STORE_PATH, *, wait: bool | float = False):
    """Take the one-writer lock of the results store at ``store_path`` and return it, held.

    One process at a time may *work on* a store: an experiment runner holds this lock from
    before it creates anything (store, run folders, fine-tune folders) until it has written its
    last row, so a second runner on the same store never computes the same runs or shares their
    folders. Readers (the explorer, ``fcr-eval report``) take no lock. A lock left by a process
    that died on this host is taken over (see :class:`fcr_common.locking.ProcessLock`).

    Args:
        store_path: the results store (its folder is created if needed, the store itself is not).
        wait: ``False`` refuses at once; seconds to wait for the holder to finish; ``True`` waits
            as long as it takes (logging who it waits for).

    Returns:
        The held :class:`fcr_common.locking.ProcessLock`; ``release()`` it, or use it in ``with``.

    Raises:
        fcr_common.locking.LockHeldError: another live process holds the store (its pid, host,
            start time and command are in the message).

    Example:
        >>> with writer_lock("results/fcr.duckdb", wait=600):
        ...     run_experiment(...)
    """
    return _writer_lock(store_path).acquire(wait=wait)


def refuse_if_writer_busy(store_path: str | os.PathLike = DEFAULT_STORE_PATH) -> None:
    """Raise :class:`fcr_common.locking.LockHeldError` — the message :func:`writer_lock` gives — if a
    live process holds the store's writer lock now. Takes nothing: it lets ``fcr-eval run`` refuse a
    busy store in a fraction of a second, before it loads torch; :func:`writer_lock` still decides."""
    from fcr_common.locking import LockHeldError

    lock = _writer_lock(store_path)
    holder = lock.holder()
    if holder is not None and not holder.is_stale():
        raise LockHeldError(lock.path, holder, lock.what, 0.0, lock.wait_hint)


def _writer_lock(store_path: str | os.PathLike):
    # fcr-common owns the lock (fcr-train's fine-tune folders use it too); imported here, not at the
    # top, so that a reader of the store never imports it.
    from fcr_common.locking import ProcessLock

    path = Path(store_path)
    return ProcessLock(writer_lock_path(path), what=f"results store {path}",
                       wait_hint="`fcr-eval run ... --wait SECONDS` waits up to that long")


class ResultsStore:
    """The results store at ``path`` (a DuckDB file).

    Writers: ``ResultsStore(path)`` creates the file and its folder if needed and migrates it to
    :data:`SCHEMA_VERSION`. Readers: :meth:`open_readonly` never creates or migrates. Neither
    holds the file between calls (see the module docstring), so the runner and the apps can take
    turns on one file.

    Args:
        path: the DuckDB file, e.g. ``results/fcr.duckdb``.
        lock_timeout: seconds to keep retrying while another process holds the file.

    Example:
        >>> store = ResultsStore("results/fcr.duckdb")
        >>> store.is_finished(run_id)
        False
    """

    def __init__(self, path: str | os.PathLike = DEFAULT_STORE_PATH, *, lock_timeout: float = 30.0,
                 _read_only: bool = False) -> None:
        self.path = store_path(path, "results store")
        self.read_only = _read_only
        self.lock_timeout = float(lock_timeout)
        if self.read_only:
            with self._connect() as con:
                _refuse_other_kind(con, self.path, empty_is_ok=False)
                v = read_schema_version(con)
            if v != SCHEMA_VERSION:
                newer = v > SCHEMA_VERSION
                raise StoreSchemaError(
                    f"{self.path} is at schema version {v}, this fcr-eval reads version "
                    f"{SCHEMA_VERSION}; "
                    + ("upgrade fcr-eval (uv sync)." if newer else
                       f"migrate it once with `{MIGRATE_COMMAND.format(path=self.path)}` (readers never migrate).")
                )
        else:
            if self.path.is_file():  # look read-only first: a file of another kind is never opened for writing
                with connect(self.path, read_only=True, timeout=self.lock_timeout, describe="results store") as con:
                    _refuse_other_kind(con, self.path, empty_is_ok=True)
            elif not self.path.is_dir():  # a directory is refused by connect() with a clear error
                self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as con:
                _refuse_other_kind(con, self.path, empty_is_ok=True)
                migrate(con)

    @classmethod
    def open_readonly(cls, path: str | os.PathLike = DEFAULT_STORE_PATH, *, lock_timeout: float = 30.0) -> ResultsStore:
        """Open an existing store for queries only; write methods raise :class:`StoreError`.

        Example:
            >>> ResultsStore.open_readonly("results/fcr.duckdb").runs()
        """
        return cls(path, lock_timeout=lock_timeout, _read_only=True)

    def __repr__(self) -> str:
        mode = "read-only" if self.read_only else "read-write"
        return f"ResultsStore({str(self.path)!r}, {mode})"

    # -- connections -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        con = connect(self.path, read_only=self.read_only, timeout=self.lock_timeout,
                      describe="results store",
                      missing_hint="run an experiment first (`fcr-eval run <experiment.toml>`) "
                                   "or pass the right path")
        try:
            yield con
        finally:
            con.close()

    def _require_writer(self, what: str) -> None:
        if self.read_only:
            raise StoreError(f"{self!r} is read-only; {what} needs ResultsStore(path)")

    @property
    def schema_version(self) -> int:
        """The schema version of the file."""
        with self._connect() as con:
            return read_schema_version(con)

    # -- writing ---------------------------------------------------------------------------

    def is_finished(self, run_id: str) -> bool:
        """Whether ``run_id`` is already stored as finished (the runner then skips it)."""
        with self._connect() as con:
            row = con.execute(
                "SELECT count(*) FROM runs WHERE run_id = ? AND status = 'finished'", [run_id]
            ).fetchone()
        return bool(row[0])

    def finished_run_ids(self, experiment_id: str | None = None) -> set[str]:
        """Every finished ``run_id`` (of one experiment if given), in one query."""
        q = "SELECT run_id FROM runs WHERE status = 'finished'"
        args: list[Any] = []
        if experiment_id is not None:
            q += " AND experiment_id = ?"
            args.append(experiment_id)
        with self._connect() as con:
            return {r[0] for r in con.execute(q, args).fetchall()}

    def _relative_image_path(self, p: str) -> str:
        path = Path(p)
        if not path.is_absolute():
            return path.as_posix()
        root = self.path.resolve().parent
        try:
            return path.resolve().relative_to(root).as_posix()
        except ValueError:
            raise StoreError(
                f"sample image {p} is outside the store's folder {root}; save samples under "
                f"{root / 'samples'} so the store and its images move together"
            ) from None

    def write_run(self, result: RunResult) -> bool:
        """Write a finished run — its row, metrics, per-prompt scores, timings, feature stats
        and samples — in ONE transaction.

        If anything fails, nothing of the run is stored. If ``run_id`` is already finished the
        call writes nothing and returns ``False`` (re-running a finished run is skipped).

        Returns:
            ``True`` if the run was written, ``False`` if it was already there.

        Example:
            >>> store.write_run(RunResult(run, metrics=[...], timings=[...]))
            True
        """
        self._require_writer("write_run")
        r = result.run
        finished_at = r.finished_at or utcnow()
        sample_rows = [
            [r.run_id, s.prompt_id, s.prompt, int(s.seed), self._relative_image_path(s.image_path),
             s.class_label, int(s.width), int(s.height)]
            for s in result.samples
        ]
        try:
            with self._connect() as con, transaction(con):
                done = con.execute("SELECT status FROM runs WHERE run_id = ?", [r.run_id]).fetchone()
                if done is not None and done[0] == "finished":
                    logger.info("run %s is already finished in %s; skipped", r.run_id, self.path)
                    return False
                if done is not None:  # a non-finished row from an older writer: replace it
                    self._delete_rows(con, r.run_id)
                self._insert(con, "runs (run_id, experiment_id, variation_id, seed, status, model, dataset, "
                             "sampler, stride, parallel_decoding, lambda_fcr, delta_max, blocks, scheduler, "
                             "resolution, num_inference_steps, guidance_scale, params, config, code_version, "
                             "device, started_at, finished_at, run_dir, cache_label, cache_key_steps, "
                             "cache_interval, lambda_oc)", 28, [
                    [r.run_id, r.experiment_id, r.variation_id, int(r.seed), r.status, r.model,
                     r.dataset, r.sampler, r.stride, r.parallel_decoding, _num(r.lambda_fcr),
                     r.delta_max, r.blocks, r.scheduler, int(r.resolution),
                     int(r.num_inference_steps), _num(r.guidance_scale), _json(r.params),
                     _json(r.config), r.code_version, r.device, r.started_at, finished_at,
                     r.run_dir, r.cache_label,
                     None if r.cache_key_steps is None else list(r.cache_key_steps),
                     r.cache_interval, _num(r.lambda_oc)]])
                self._insert(con, "metrics", 7, [
                    [r.run_id, m.metric, _num(m.value), m.feature_extractor, m.preprocessing,
                     int(m.n_samples), _json(m.details)] for m in result.metrics])
                self._insert(con, "per_prompt_scores", 4, [
                    [r.run_id, p.metric, str(p.prompt_id), _num(p.value)] for p in result.per_prompt_scores])
                self._insert(con, "timings (run_id, batch_size, sec_per_image, unet_calls, "
                             "encoder_forwards, decoder_forwards, flops_per_image, "
                             "peak_memory_bytes, memory_kind, device, n_images, warmup)", 12, [
                    [r.run_id, int(t.batch_size), _num(t.sec_per_image), t.unet_calls,
                     t.encoder_forwards, t.decoder_forwards, _num(t.flops_per_image),
                     t.peak_memory_bytes, t.memory_kind, t.device or r.device, t.n_images,
                     t.warmup] for t in result.timings])
                self._insert(con, "feature_stats", 7, [
                    [r.run_id, f.block, int(f.delta), _num(f.variance), int(f.n), _num(f.energy), f.unit]
                    for f in result.feature_stats])
                self._insert(con, "samples", 8, sample_rows)
                self._insert_sample_metrics(con, r.run_id, result.sample_metrics)
                self._insert(con, "cache_attribution", 7, [
                    [r.run_id, int(a.step), float(a.timestep), a.feature, a.quantity, _num(a.value),
                     int(a.n_samples)] for a in result.cache_attribution])
        except BaseException:
            logger.error("writing run %s failed; nothing of it was stored", r.run_id)
            raise
        logger.info(
            "stored run %s (%d metrics, %d per-prompt scores, %d timings, %d feature stats, %d samples, "
            "%d per-sample values, %d attribution values)", r.run_id, len(result.metrics),
            len(result.per_prompt_scores), len(result.timings), len(result.feature_stats),
            len(result.samples), sum(len(m) for m in result.sample_metrics),
            len(result.cache_attribution),
        )
        return True

    @staticmethod
    def _insert_sample_metrics(con: duckdb.DuckDBPyConnection, run_id: str,
                               batches: Sequence[SampleMetrics]) -> None:
        """All per-sample values of a run in one bulk insert (an Arrow scan, not row by row)."""
        if not batches:
            return
        seen = [b.metric for b in batches]
        if len(set(seen)) != len(seen):
            dup = sorted({m for m in seen if seen.count(m) > 1})
            raise StoreError(f"run {run_id} has per-sample metrics {dup} more than once; give one "
                             "SampleMetrics per metric")
        def columns(b: SampleMetrics) -> pl.DataFrame:
            shared = b.reference is None or isinstance(b.reference, str)
            frame = pl.DataFrame({
                "sample_index": pl.Series(b.sample_index, dtype=pl.Int32),
                "prompt_id": pl.Series(b.prompt_ids.tolist(), dtype=pl.String),
                "seed": pl.Series(b.seeds, dtype=pl.Int32),
                "value": pl.Series(b.values, dtype=pl.Float64).fill_nan(None),
            })
            reference = (pl.lit(b.reference, dtype=pl.String) if shared
                         else pl.Series(b.reference.tolist(), dtype=pl.String))
            return frame.with_columns(metric=pl.lit(b.metric, dtype=pl.String), reference=reference)

        frame = pl.concat([columns(b) for b in batches])
        con.register("_fcr_sample_metrics", frame)
        try:
            con.execute(
                "INSERT INTO sample_metrics (run_id, sample_index, prompt_id, seed, metric, value, reference) "
                "SELECT ?, sample_index, prompt_id, seed, metric, value, reference FROM _fcr_sample_metrics",
                [run_id])
        finally:
            con.unregister("_fcr_sample_metrics")
        ResultsStore._insert(con, "sample_metric_definitions", 6, [
            [run_id, b.metric, b.feature_extractor, b.preprocessing, len(b), _json(b.details)] for b in batches])

    @staticmethod
    def _delete_rows(con: duckdb.DuckDBPyConnection, run_id: str) -> None:
        for table in RUN_TABLES:
            con.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_id])

    @staticmethod
    def _insert(con: duckdb.DuckDBPyConnection, table: str, ncols: int, rows: Sequence[Sequence[Any]]) -> None:
        """Insert ``rows`` (``ncols`` values each) into ``table`` (a name, or a name with its column list)
        as one scan of per-column object arrays: DuckDB reads a dict of numpy arrays without pyarrow and
        casts each column to the table's type. A design-size run's 30,000 samples and 30,000 per-prompt
        scores: ``write_run`` 0.35 s where parameter-bound multi-row VALUES took 4.2 s (12×, 2-core CPU,
        ``benchmarks/store_write.py``, docs/benchmarks.md).
        DuckDB reads a float NaN in an object column as NULL, as :func:`_num` stores it."""
        if not rows:
            return
        bad = next((len(row) for row in rows if len(row) != ncols), None)
        if bad is not None:
            raise StoreError(f"a row for {table.split(' ')[0]} has {bad} values, not {ncols}")
        n = len(rows)
        frame = {f"c{i}": np.fromiter((row[i] for row in rows), dtype=object, count=n) for i in range(ncols)}
        con.register("_fcr_rows", frame)
        try:
            con.execute(f"INSERT INTO {table} SELECT {', '.join(frame)} FROM _fcr_rows")
        finally:
            con.unregister("_fcr_rows")

    def write_criteria(self, results: Iterable[CriterionResult]) -> int:
        """Store success-criteria verdicts in one transaction, replacing earlier verdicts of the
        same (experiment_id, criterion). Returns the number of rows written.

        Example:
            >>> store.write_criteria(evaluate_criteria(...))
            6
        """
        self._require_writer("write_criteria")
        rows = list(results)
        now = utcnow()
        with self._connect() as con, transaction(con):
            for c in rows:
                con.execute("DELETE FROM criteria WHERE experiment_id = ? AND criterion = ?",
                            [c.experiment_id, c.criterion])
            self._insert(con, "criteria (experiment_id, criterion, passed, value, threshold, details, "
                         "evaluated_at, code_version, verdict, ci_low, ci_high)", 11, [
                [c.experiment_id, c.criterion, None if c.passed is None else bool(c.passed), _num(c.value),
                 _num(c.threshold), _json(c.details), c.evaluated_at or now, c.code_version, c.verdict,
                 _num(c.ci_low), _num(c.ci_high)] for c in rows])
        return len(rows)

    def write_contrasts(self, experiment_id: str, results: Iterable[Any], *, code_version: str = "") -> int:
        """Store computed contrasts in one transaction, replacing earlier rows of the same
        (experiment_id, contrast_id). Returns the number of rows written.

        Args:
            experiment_id: the experiment the contrasts belong to.
            results: :class:`fcr_eval.analysis.contrasts.ContrastResult` objects (anything with its fields:
                ``contrast_id, kind, metric, candidate, baseline, target, estimate, ci_low, ci_high,
                confidence, n_samples, n_clusters, method, threshold, direction, verdict, details``).
            code_version: what computed them (:func:`fcr_common.provenance.code_version`).

        Example:
            >>> store.write_contrasts("mini-exp-1", compute_contrasts(specs, store.sample_metrics(
            ...     experiment_id="mini-exp-1")), code_version=code_version())
            3
        """
        self._require_writer("write_contrasts")
        rows = list(results)
        for c in rows:
            if c.verdict is not None and c.verdict not in VERDICTS:
                raise StoreError(f"contrast {c.contrast_id!r} has verdict {c.verdict!r}; use one of {VERDICTS} or None")
        now = utcnow()
        with self._connect() as con, transaction(con):
            for c in rows:
                con.execute("DELETE FROM contrasts WHERE experiment_id = ? AND contrast_id = ?",
                            [experiment_id, c.contrast_id])
            self._insert(con, "contrasts", 20, [
                [experiment_id, c.contrast_id, c.kind, c.metric, c.candidate, c.baseline, c.target,
                 _num(c.estimate), _num(c.ci_low), _num(c.ci_high), _num(c.confidence), int(c.n_samples),
                 int(c.n_clusters), c.method, _num(c.threshold), c.direction, c.verdict, _json(c.details),
                 code_version, now] for c in rows])
        return len(rows)

    def delete_run(self, run_id: str) -> bool:
        """Remove a run and all its rows in one transaction (e.g. to recompute it)."""
        self._require_writer("delete_run")
        with self._connect() as con, transaction(con):
            n = con.execute("SELECT count(*) FROM runs WHERE run_id = ?", [run_id]).fetchone()[0]
            self._delete_rows(con, run_id)
        return bool(n)

    # -- reading ---------------------------------------------------------------------------

    def sql(self, query: str, params: Sequence[Any] | None = None) -> pl.DataFrame:
        """Run any SQL query and return a polars frame (JSON columns come back as strings).

        Example:
            >>> store.sql("SELECT metric, avg(value) FROM metrics GROUP BY metric")
        """
        with self._connect() as con:
            cur = con.execute(query, list(params or []))
            schema = {d[0]: _POLARS_TYPES.get(str(d[1]).upper()) for d in cur.description}
            rows = cur.fetchall()
        # Typed columns even when a result is empty or all-NULL, so filters keep working.
        if all(t is not None for t in schema.values()):
            return pl.DataFrame(rows, schema=schema, orient="row")
        return pl.DataFrame(rows, schema=list(schema), orient="row", infer_schema_length=None)

    @staticmethod
    def _where(**filters: Any) -> tuple[str, list[Any]]:
        clauses, args = [], []
        for col, val in filters.items():
            if val is None:
                continue
            if isinstance(val, (list, tuple, set)):
                val = list(val)
                clauses.append(f"{col} IN ({', '.join('?' * len(val))})")
                args.extend(val)
            else:
                clauses.append(f"{col} = ?")
                args.append(val)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args

    def runs(self, experiment_id: str | None = None, variation_id: str | None = None) -> pl.DataFrame:
        """The ``runs`` table, optionally filtered."""
        w, a = self._where(experiment_id=experiment_id, variation_id=variation_id)
        return self.sql(f"SELECT * FROM runs{w} ORDER BY experiment_id, variation_id, seed", a)

    def _joined(self, table: str, order: str, experiment_id=None, variation_id=None, run_id=None,
                **filters: Any) -> pl.DataFrame:
        w, a = self._where(**{"r.experiment_id": experiment_id, "r.variation_id": variation_id,
                              "t.run_id": run_id, **{f"t.{k}": v for k, v in filters.items()}})
        return self.sql(
            f"SELECT r.experiment_id, r.variation_id, r.seed, t.* FROM {table} t "
            f"JOIN runs r USING (run_id){w} ORDER BY r.experiment_id, r.variation_id, r.seed, {order}",
            a,
        )

    def metrics(self, experiment_id: str | None = None, metric: str | Sequence[str] | None = None,
                variation_id: str | None = None, run_id: str | None = None) -> pl.DataFrame:
        """Metrics joined with ``experiment_id``, ``variation_id``, ``seed``."""
        return self._joined("metrics", "t.metric", experiment_id, variation_id, run_id, metric=metric)

    def per_prompt_scores(self, experiment_id: str | None = None, metric: str | None = None,
                          variation_id: str | None = None, run_id: str | None = None) -> pl.DataFrame:
        """Per-prompt scores joined with ``experiment_id``, ``variation_id``, ``seed``."""
        return self._joined("per_prompt_scores", "t.metric, t.prompt_id", experiment_id,
                            variation_id, run_id, metric=metric)

    def timings(self, experiment_id: str | None = None, variation_id: str | None = None,
                run_id: str | None = None) -> pl.DataFrame:
        """Timings joined with ``experiment_id``, ``variation_id``, ``seed``."""
        return self._joined("timings", "t.batch_size", experiment_id, variation_id, run_id)

    def feature_stats(self, experiment_id: str | None = None, variation_id: str | None = None,
                      run_id: str | None = None, block: str | None = None,
                      unit: str | None = "timesteps") -> pl.DataFrame:
        """σ²_Δ rows joined with ``experiment_id``, ``variation_id``, ``seed``. ``unit`` picks the Δ
        range: ``"timesteps"`` (default: the paper's literal 1…Δ_max, what earlier stores hold),
        ``"sampler_steps"`` (the cache's range), or ``None`` for both."""
        return self._joined("feature_stats", "t.block, t.delta", experiment_id, variation_id,
                            run_id, block=block, delta_unit=unit)

    def cache_attribution(self, experiment_id: str | None = None, variation_id: str | None = None,
                          run_id: str | None = None, quantity: str | Sequence[str] | None = None,
                          feature: str | Sequence[str] | None = None) -> pl.DataFrame:
        """Cache-error attribution rows (``step, timestep, feature, quantity, value, n_samples``)
        joined with ``experiment_id``, ``variation_id``, ``seed``, in step order.

        Example:
            >>> store.cache_attribution("exp-1", "fd-10", quantity="only_stale_error")
        """
        return self._joined("cache_attribution", "t.step, t.feature, t.quantity", experiment_id,
                            variation_id, run_id, quantity=quantity, feature=feature)

    def samples(self, experiment_id: str | None = None, variation_id: str | None = None,
                run_id: str | None = None) -> pl.DataFrame:
        """Sample references; ``image_path`` is relative to :attr:`root` (use :meth:`image_file`)."""
        return self._joined("samples", "t.prompt_id", experiment_id, variation_id, run_id)

    def write_timing_rounds(self, experiment_id: str, rows: Sequence[Mapping[str, Any]]) -> int:
        """Store an experiment's interleaved timing session in one transaction, replacing the
        earlier rows of the same variations. Each row: ``variation_id, run_id, batch_size, round, position,
        sec_per_image, peak_memory_bytes, memory_kind, device, code_version``."""
        self._require_writer("write_timing_rounds")
        cols = ("variation_id", "run_id", "batch_size", "round", "position", "sec_per_image", "peak_memory_bytes",
                "memory_kind", "device", "code_version")
        now = utcnow()
        variations = sorted({r["variation_id"] for r in rows})
        with self._connect() as con, transaction(con):
            if variations:
                con.execute(f"DELETE FROM timing_rounds WHERE experiment_id = ? AND variation_id IN "
                            f"({', '.join('?' * len(variations))})", [experiment_id, *variations])
            self._insert(con, "timing_rounds", 12, [[experiment_id, *(r.get(c) for c in cols), now] for r in rows])
        return len(rows)

    def timing_rounds(self, experiment_id: str | None = None) -> pl.DataFrame:
        """The interleaved timing session(s): one row per variation, batch size and round."""
        w, a = self._where(experiment_id=experiment_id)
        return self.sql(f"SELECT * FROM timing_rounds{w} ORDER BY experiment_id, batch_size, round, position", a)

    def criteria(self, experiment_id: str | None = None) -> pl.DataFrame:
        """Success-criteria verdicts."""
        w, a = self._where(experiment_id=experiment_id)
        return self.sql(f"SELECT * FROM criteria{w} ORDER BY experiment_id, criterion", a)

    def contrasts(self, experiment_id: str | None = None) -> pl.DataFrame:
        """Stored contrasts (one row per experiment and contrast id).

        Example:
            >>> store.contrasts("mini-exp-1").select("contrast_id", "estimate", "ci_low", "ci_high")
        """
        w, a = self._where(experiment_id=experiment_id)
        return self.sql(f"SELECT * FROM contrasts{w} ORDER BY experiment_id, contrast_id", a)

    def sample_metrics(self, experiment_id: str | None = None, metric: str | Sequence[str] | None = None,
                       variation_id: str | Sequence[str] | None = None,
                       run_id: str | Sequence[str] | None = None) -> pl.DataFrame:
        """Per-sample metric values joined with the run's ``experiment_id`` and ``variation_id``.

        Columns: ``experiment_id, variation_id, run_id, seed, sample_index, prompt_id, metric,
        value, reference`` — the long form :func:`fcr_eval.analysis.contrasts.compute_contrasts` pairs
        by (seed, sample_index). Read through Arrow, so millions of rows come back in seconds.

        Example:
            >>> store.sample_metrics(experiment_id="mini-exp-1", metric="cache_mse")
        """
        w, a = self._where(**{"r.experiment_id": experiment_id, "r.variation_id": variation_id,
                              "t.run_id": run_id, "t.metric": metric})
        query = ("SELECT r.experiment_id, r.variation_id, t.run_id, t.seed, t.sample_index, t.prompt_id, "
                 f"t.metric, t.value, t.reference FROM sample_metrics t JOIN runs r USING (run_id){w} "
                 "ORDER BY r.experiment_id, r.variation_id, t.seed, t.metric, t.sample_index")
        with self._connect() as con:
            return con.sql(query, params=a).pl()

    def sample_metric_definitions(self, experiment_id: str | None = None,
                                  run_id: str | None = None) -> pl.DataFrame:
        """What produced each per-sample metric of each run (extractor, preprocessing, details)."""
        return self._joined("sample_metric_definitions", "t.metric", experiment_id, None, run_id)

    @property
    def root(self) -> Path:
        """The store's folder; sample ``image_path`` values are relative to it."""
        return self.path.resolve().parent

    def image_file(self, image_path: str) -> Path:
        """Absolute path of a stored sample's ``image_path``."""
        return self.root / image_path
