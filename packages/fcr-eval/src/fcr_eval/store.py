"""The DuckDB results store (the contract is ``docs/results-store.md``).

One file (default ``results/fcr.duckdb``) holds every finished run of every experiment: the run
row, its metrics, per-prompt scores, timings, encoder-feature statistics and sample references,
plus the success-criteria verdicts per experiment. Images live next to the store under
``results/samples/`` and are referenced by paths relative to the store's folder.

Concurrency. DuckDB lets one process at a time open a file for writing, and while it is open for
writing no *other* process can open it at all, not even read-only. So the store never keeps the
file open: every write and every query opens a connection, does its work and closes it. A run
is written in one transaction when it finishes, so a reader never sees half a run; if the file
is busy, the call retries for ``lock_timeout`` seconds and then raises :class:`StoreLockedError`
naming the process that holds it.

Schema versions. ``schema_version(version, applied_at)`` records every migration applied;
:data:`MIGRATIONS` are numbered functions applied in order by :func:`apply_migrations` (which
the human-study store uses too), each inside its own transaction, whenever a writer opens a
store that is behind. Readers never migrate; they refuse a store that is newer than this code
and ask for a writer to migrate one that is older.

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
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

__all__ = [
    "DEFAULT_STORE_PATH",
    "SCHEMA_VERSION",
    "MIGRATIONS",
    "StoreError",
    "StoreLockedError",
    "StoreSchemaError",
    "RunRecord",
    "MetricRecord",
    "PerPromptScore",
    "TimingRecord",
    "FeatureStat",
    "SampleRecord",
    "CriterionResult",
    "RunResult",
    "ResultsStore",
    "make_run_id",
    "migrate",
    "apply_migrations",
    "read_schema_version",
    "Migration",
]

logger = logging.getLogger(__name__)

DEFAULT_STORE_PATH = Path("results/fcr.duckdb")

SAMPLERS = ("none", "fd", "deepcache")
MEMORY_KINDS = ("cuda_peak", "process_rss")


class StoreError(RuntimeError):
    """Base class of every error the results store raises."""


class StoreLockedError(StoreError):
    """Another process holds the DuckDB file (DuckDB allows one writing process per file)."""


class StoreSchemaError(StoreError):
    """The file's schema version is not the one this code reads."""


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)


@dataclass(frozen=True)
class RunRecord:
    """One row of ``runs``: a variation × seed of an experiment, finished.

    ``params`` holds every run parameter without a column of its own (robustness protocol,
    prompt set, checkpoint path, ...); ``config`` the full resolved config. ``code_version`` and
    ``device`` say what produced every number of the run (see :func:`fcr_eval.provenance`).
    """

    run_id: str
    experiment_id: str
    variation_id: str
    seed: int
    model: str
    dataset: str
    sampler: str
    scheduler: str
    resolution: int
    num_inference_steps: int
    guidance_scale: float
    stride: int | None = None
    parallel_decoding: bool | None = None
    lambda_fcr: float | None = None
    delta_max: int | None = None
    blocks: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    config: Mapping[str, Any] = field(default_factory=dict)
    code_version: str = ""
    device: str = ""
    started_at: _dt.datetime | None = None
    finished_at: _dt.datetime | None = None
    status: str = "finished"
    run_dir: str | None = None  # added by migration 2

    def __post_init__(self) -> None:
        if not self.run_id:
            raise ValueError("RunRecord.run_id is empty; build it with make_run_id(...)")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"RunRecord.sampler is {self.sampler!r}; use one of {SAMPLERS}")
        if self.status != "finished":
            raise ValueError(
                f"RunRecord.status is {self.status!r}; the store holds finished runs only "
                "(a crashed run leaves nothing but its own folder)"
            )


@dataclass(frozen=True)
class MetricRecord:
    """One row of ``metrics``. ``feature_extractor``/``preprocessing`` say what produced it
    (``"none"`` for metrics without features, e.g. ``unet_calls``)."""

    metric: str
    value: float
    feature_extractor: str
    preprocessing: str
    n_samples: int
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PerPromptScore:
    """One row of ``per_prompt_scores`` (paired tests and bootstrap across variations)."""

    metric: str
    prompt_id: str
    value: float


@dataclass(frozen=True)
class TimingRecord:
    """One row of ``timings``. ``sec_per_image`` is device-synchronised, after ``warmup``
    untimed calls, averaged over ``n_images`` images."""

    batch_size: int
    sec_per_image: float
    unet_calls: int | None = None
    encoder_forwards: int | None = None
    decoder_forwards: int | None = None
    flops_per_image: float | None = None
    peak_memory_bytes: int | None = None
    memory_kind: str | None = None
    device: str = ""
    n_images: int | None = None  # added by migration 2
    warmup: int | None = None  # added by migration 2

    def __post_init__(self) -> None:
        if self.memory_kind is not None and self.memory_kind not in MEMORY_KINDS:
            raise ValueError(f"TimingRecord.memory_kind is {self.memory_kind!r}; use one of {MEMORY_KINDS}")


@dataclass(frozen=True)
class FeatureStat:
    """One row of ``feature_stats``: σ²_Δ of one encoder feature (or ``'all'``) at one Δ."""

    block: str
    delta: int
    variance: float
    n: int


@dataclass(frozen=True)
class SampleRecord:
    """One row of ``samples``. ``image_path`` is relative to the store's folder."""

    prompt_id: str
    prompt: str
    seed: int
    image_path: str
    width: int
    height: int
    class_label: str | None = None


@dataclass(frozen=True)
class CriterionResult:
    """One row of ``criteria``: a success criterion of design.md §1, evaluated.
    ``passed`` is ``None`` when the criterion could not be evaluated (reason in ``details``)."""

    experiment_id: str
    criterion: str
    passed: bool | None
    value: float | None
    threshold: float
    details: Mapping[str, Any] = field(default_factory=dict)
    code_version: str = ""
    evaluated_at: _dt.datetime | None = None


@dataclass
class RunResult:
    """Everything a finished run writes, in one transaction (:meth:`ResultsStore.write_run`)."""

    run: RunRecord
    metrics: list[MetricRecord] = field(default_factory=list)
    per_prompt_scores: list[PerPromptScore] = field(default_factory=list)
    timings: list[TimingRecord] = field(default_factory=list)
    feature_stats: list[FeatureStat] = field(default_factory=list)
    samples: list[SampleRecord] = field(default_factory=list)


def make_run_id(experiment_id: str, variation_id: str, seed: int, config: Mapping[str, Any]) -> str:
    """Stable run id: a hash of experiment, variation, seed and the resolved config.

    Key order in ``config`` does not matter; any changed value gives a new id, so a changed
    config is never mistaken for a finished run.

    Example:
        >>> make_run_id("exp-1", "fd-10", 0, {"stride": 10}) == make_run_id("exp-1", "fd-10", 0, {"stride": 10})
        True
    """
    payload = json.dumps(
        {"experiment_id": experiment_id, "variation_id": variation_id, "seed": int(seed), "config": config},
        sort_keys=True,
        default=str,
        separators=(",", ":"),
    )
    digest = hashlib.sha256(payload.encode()).hexdigest()[:16]
    return f"{experiment_id}/{variation_id}/s{int(seed)}/{digest}"


# --------------------------------------------------------------------------------------------
# Schema and migrations
# --------------------------------------------------------------------------------------------


def _migration_1(con: duckdb.DuckDBPyConnection) -> None:
    """The contract of docs/results-store.md as first agreed."""
    con.execute(
        """
        CREATE TABLE runs (
            run_id VARCHAR PRIMARY KEY,
            experiment_id VARCHAR NOT NULL,
            variation_id VARCHAR NOT NULL,
            seed INTEGER NOT NULL,
            status VARCHAR NOT NULL,
            model VARCHAR,
            dataset VARCHAR,
            sampler VARCHAR,
            stride INTEGER,
            parallel_decoding BOOLEAN,
            lambda_fcr DOUBLE,
            delta_max INTEGER,
            blocks VARCHAR,
            scheduler VARCHAR,
            resolution INTEGER,
            num_inference_steps INTEGER,
            guidance_scale DOUBLE,
            params JSON,
            config JSON,
            code_version VARCHAR,
            device VARCHAR,
            started_at TIMESTAMP,
            finished_at TIMESTAMP
        )"""
    )
    con.execute(
        """
        CREATE TABLE metrics (
            run_id VARCHAR NOT NULL,
            metric VARCHAR NOT NULL,
            value DOUBLE,
            feature_extractor VARCHAR,
            preprocessing VARCHAR,
            n_samples INTEGER,
            details JSON
        )"""
    )
    con.execute(
        """
        CREATE TABLE per_prompt_scores (
            run_id VARCHAR NOT NULL,
            metric VARCHAR NOT NULL,
            prompt_id VARCHAR NOT NULL,
            value DOUBLE
        )"""
    )
    con.execute(
        """
        CREATE TABLE timings (
            run_id VARCHAR NOT NULL,
            batch_size INTEGER,
            sec_per_image DOUBLE,
            unet_calls INTEGER,
            encoder_forwards INTEGER,
            decoder_forwards INTEGER,
            flops_per_image DOUBLE,
            peak_memory_bytes BIGINT,
            memory_kind VARCHAR,
            device VARCHAR
        )"""
    )
    con.execute(
        """
        CREATE TABLE feature_stats (
            run_id VARCHAR NOT NULL,
            block VARCHAR NOT NULL,
            delta INTEGER NOT NULL,
            variance DOUBLE,
            n INTEGER
        )"""
    )
    con.execute(
        """
        CREATE TABLE samples (
            run_id VARCHAR NOT NULL,
            prompt_id VARCHAR,
            prompt VARCHAR,
            seed INTEGER,
            image_path VARCHAR,
            class_label VARCHAR,
            width INTEGER,
            height INTEGER
        )"""
    )
    con.execute(
        """
        CREATE TABLE criteria (
            experiment_id VARCHAR NOT NULL,
            criterion VARCHAR NOT NULL,
            passed BOOLEAN,
            value DOUBLE,
            threshold DOUBLE,
            details JSON,
            evaluated_at TIMESTAMP,
            code_version VARCHAR
        )"""
    )
    # Written by `fcr-human-study analyse`; created here so every store has the full contract.
    con.execute(
        """
        CREATE TABLE human_study_results (
            study_id VARCHAR,
            variation_a VARCHAR,
            variation_b VARCHAR,
            n_a INTEGER,
            n_b INTEGER,
            n_tie INTEGER,
            n_both_bad INTEGER,
            win_rate_a DOUBLE,
            ci_low DOUBLE,
            ci_high DOUBLE,
            p_value DOUBLE,
            analysed_at TIMESTAMP
        )"""
    )
    con.execute(
        """
        CREATE TABLE human_study_scores (
            study_id VARCHAR,
            variation VARCHAR,
            bt_score DOUBLE,
            ci_low DOUBLE,
            ci_high DOUBLE
        )"""
    )
    for table in ("metrics", "per_prompt_scores", "timings", "feature_stats", "samples"):
        con.execute(f"CREATE INDEX idx_{table}_run ON {table}(run_id)")


def _migration_2(con: duckdb.DuckDBPyConnection) -> None:
    """Additions (documented in docs/results-store.md): the run's folder, and how many images
    and warm-up calls each timing used."""
    con.execute("ALTER TABLE runs ADD COLUMN run_dir VARCHAR")
    con.execute("ALTER TABLE timings ADD COLUMN n_images INTEGER")
    con.execute("ALTER TABLE timings ADD COLUMN warmup INTEGER")


#: Numbered migrations; ``MIGRATIONS[i]`` brings a store from version ``i`` to ``i + 1``.
MIGRATIONS: tuple[Callable[[duckdb.DuckDBPyConnection], None], ...] = (_migration_1, _migration_2)
SCHEMA_VERSION = len(MIGRATIONS)


#: One migration: SQL (one or more statements) or a function of the connection.
Migration = str | Callable[[duckdb.DuckDBPyConnection], None]

_IDENTIFIER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _version_table(table: str) -> str:
    if not _IDENTIFIER_RE.fullmatch(table):
        raise ValueError(f"schema-version table name must be a plain SQL identifier, got {table!r}")
    return table


def read_schema_version(con: duckdb.DuckDBPyConnection, *, table: str = "schema_version") -> int:
    """The highest version recorded in ``table`` (0 when the table does not exist or is empty).

    Example:
        >>> read_schema_version(duckdb.connect(":memory:"))
        0
    """
    table = _version_table(table)
    exists = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [table]
    ).fetchone()[0]
    if not exists:
        return 0
    v = con.execute(f"SELECT max(version) FROM {table}").fetchone()[0]
    return int(v or 0)


def apply_migrations(
    con: duckdb.DuckDBPyConnection,
    migrations: Sequence[tuple[int, Migration]],
    *,
    table: str = "schema_version",
    target: int | None = None,
    newer_error: Callable[[int, int], BaseException] | None = None,
) -> int:
    """Bring ``con``'s database to version ``target`` with the numbered ``migrations`` it lacks.

    The version reached is kept in ``table(version INTEGER, applied_at TIMESTAMP)`` (created if
    missing), one row per migration applied. Each migration runs in its own transaction together
    with its row, so a failing one is rolled back and leaves the database at the previous version.
    Both the results store and the human-study store migrate through this function.

    Args:
        con: an open, writable DuckDB connection with no transaction in progress.
        migrations: ``(version, migration)`` pairs in increasing version order; a migration is
            SQL text or ``fn(con)``. Versions at or below the database's are skipped.
        table: the schema-version table.
        target: stop at this version (default: the last migration's).
        newer_error: ``fn(db_version, latest_known) -> exception`` raised when the database is
            at a version newer than the last migration (default: :class:`StoreSchemaError`).

    Returns:
        The version the database is at afterwards.

    Raises:
        StoreSchemaError: ``target`` is beyond the last migration, or (by default) the database
            is newer than the migrations.
        ValueError: versions not positive and strictly increasing, or a bad ``table`` name.

    Example:
        >>> con = duckdb.connect(":memory:")
        >>> apply_migrations(con, [(1, "CREATE TABLE votes (choice VARCHAR)"),
        ...                        (2, lambda c: c.execute("ALTER TABLE votes ADD COLUMN rater VARCHAR"))])
        2
    """
    table = _version_table(table)
    versions = [int(v) for v, _ in migrations]
    if any(v < 1 for v in versions) or any(a >= b for a, b in pairwise(versions)):
        raise ValueError(f"migration versions must be positive and strictly increasing, got {versions}")
    latest = versions[-1] if versions else 0
    target = latest if target is None else int(target)
    if target > latest:
        raise StoreSchemaError(f"no migration to version {target}; the migrations go up to {latest}")
    con.execute(f"CREATE TABLE IF NOT EXISTS {table} (version INTEGER, applied_at TIMESTAMP)")
    current = read_schema_version(con, table=table)
    if current > latest:
        if newer_error is not None:
            raise newer_error(current, latest)
        raise StoreSchemaError(f"the database is at schema version {current} ({table}) but the migrations "
                               f"go only up to {latest}; upgrade the code before writing to it")
    for version, migration in migrations:
        if version <= current or version > target:
            continue
        con.execute("BEGIN TRANSACTION")
        try:
            if isinstance(migration, str):
                con.execute(migration)
            else:
                migration(con)
            con.execute(f"INSERT INTO {table} VALUES (?, ?)", [version, _utcnow()])
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        logger.info("migrated to schema version %d (%s)", version, table)
    return max(current, target)


def migrate(con: duckdb.DuckDBPyConnection, target: int = SCHEMA_VERSION) -> int:
    """Apply the numbered results-store migrations that ``con``'s database lacks, up to ``target``.

    See :func:`apply_migrations`: a failed migration leaves the store at the previous version.
    Returns the version reached.

    Example:
        >>> con = duckdb.connect(":memory:"); migrate(con)
        2
    """
    return apply_migrations(
        con, list(enumerate(MIGRATIONS, start=1)), target=target,
        newer_error=lambda current, latest: StoreSchemaError(
            f"the store is at schema version {current} but this fcr-eval knows only up to "
            f"{latest}; upgrade fcr-eval (uv sync) before writing to it"),
    )


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------

_LOCK_RE = re.compile(r"lock", re.IGNORECASE)

_POLARS_TYPES = {
    "VARCHAR": pl.String, "JSON": pl.String, "INTEGER": pl.Int64, "BIGINT": pl.Int64,
    "SMALLINT": pl.Int64, "HUGEINT": pl.Int64, "DOUBLE": pl.Float64, "FLOAT": pl.Float64,
    "BOOLEAN": pl.Boolean, "TIMESTAMP": pl.Datetime("us"),
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
        self.path = Path(path)
        self.read_only = _read_only
        self.lock_timeout = float(lock_timeout)
        if self.read_only:
            if not self.path.exists():
                raise StoreError(
                    f"no results store at {self.path}; run an experiment first "
                    "(`fcr-eval run <experiment.toml>`) or pass the right path"
                )
            with self._connect() as con:
                v = read_schema_version(con)
            if v != SCHEMA_VERSION:
                newer = v > SCHEMA_VERSION
                raise StoreSchemaError(
                    f"{self.path} is at schema version {v}, this fcr-eval reads version "
                    f"{SCHEMA_VERSION}; "
                    + ("upgrade fcr-eval (uv sync)." if newer else
                       "open it once for writing (fcr_eval.store.ResultsStore(path)) to migrate it.")
                )
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as con:
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
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.05
        while True:
            try:
                con = duckdb.connect(str(self.path), read_only=self.read_only)
                break
            except duckdb.IOException as e:
                if not _LOCK_RE.search(str(e)):
                    raise StoreError(f"cannot open results store {self.path}: {e}") from e
                if time.monotonic() >= deadline:
                    holder = re.search(r"held in (.*)\)", str(e))
                    who = holder.group(1) + ")" if holder else "another process"
                    raise StoreLockedError(
                        f"results store {self.path} is held by {who} and stayed busy for "
                        f"{self.lock_timeout:.0f} s. DuckDB allows one process per file while "
                        "it writes: wait for that process to finish (or stop it), or write to "
                        "another store file. Apps must open it with "
                        "ResultsStore.open_readonly() and keep connections short. "
                        f"DuckDB said: {e}"
                    ) from e
                logger.debug("results store %s busy, retrying: %s", self.path, e)
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
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
        finished_at = r.finished_at or _utcnow()
        sample_rows = [
            [r.run_id, s.prompt_id, s.prompt, int(s.seed), self._relative_image_path(s.image_path),
             s.class_label, int(s.width), int(s.height)]
            for s in result.samples
        ]
        with self._connect() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                done = con.execute(
                    "SELECT status FROM runs WHERE run_id = ?", [r.run_id]
                ).fetchone()
                if done is not None and done[0] == "finished":
                    con.execute("ROLLBACK")
                    logger.info("run %s is already finished in %s; skipped", r.run_id, self.path)
                    return False
                if done is not None:  # a non-finished row from an older writer: replace it
                    for table in ("metrics", "per_prompt_scores", "timings", "feature_stats", "samples", "runs"):
                        con.execute(f"DELETE FROM {table} WHERE run_id = ?", [r.run_id])
                con.execute(
                    """INSERT INTO runs (run_id, experiment_id, variation_id, seed, status, model,
                        dataset, sampler, stride, parallel_decoding, lambda_fcr, delta_max, blocks,
                        scheduler, resolution, num_inference_steps, guidance_scale, params, config,
                        code_version, device, started_at, finished_at, run_dir)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    [r.run_id, r.experiment_id, r.variation_id, int(r.seed), r.status, r.model,
                     r.dataset, r.sampler, r.stride, r.parallel_decoding, _num(r.lambda_fcr),
                     r.delta_max, r.blocks, r.scheduler, int(r.resolution),
                     int(r.num_inference_steps), _num(r.guidance_scale), _json(r.params),
                     _json(r.config), r.code_version, r.device, r.started_at, finished_at,
                     r.run_dir],
                )
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
                self._insert(con, "feature_stats", 5, [
                    [r.run_id, f.block, int(f.delta), _num(f.variance), int(f.n)] for f in result.feature_stats])
                self._insert(con, "samples", 8, sample_rows)
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                logger.error("writing run %s failed; nothing of it was stored", r.run_id)
                raise
        logger.info(
            "stored run %s (%d metrics, %d per-prompt scores, %d timings, %d feature stats, %d samples)",
            r.run_id, len(result.metrics), len(result.per_prompt_scores), len(result.timings),
            len(result.feature_stats), len(result.samples),
        )
        return True

    @staticmethod
    def _insert(con: duckdb.DuckDBPyConnection, table: str, ncols: int, rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        placeholders = "(" + ", ".join("?" * ncols) + ")"
        # Chunked multi-row VALUES: far faster than executemany for thousands of rows.
        chunk = max(1, 2000 // ncols)
        for i in range(0, len(rows), chunk):
            part = rows[i : i + chunk]
            con.execute(
                f"INSERT INTO {table} VALUES " + ", ".join([placeholders] * len(part)),
                [v for row in part for v in row],
            )

    def write_criteria(self, results: Iterable[CriterionResult]) -> int:
        """Store success-criteria verdicts in one transaction, replacing earlier verdicts of the
        same (experiment_id, criterion). Returns the number of rows written.

        Example:
            >>> store.write_criteria(evaluate_criteria(...))
            6
        """
        self._require_writer("write_criteria")
        rows = list(results)
        now = _utcnow()
        with self._connect() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                for c in rows:
                    con.execute("DELETE FROM criteria WHERE experiment_id = ? AND criterion = ?",
                                [c.experiment_id, c.criterion])
                self._insert(con, "criteria", 8, [
                    [c.experiment_id, c.criterion, None if c.passed is None else bool(c.passed), _num(c.value), _num(c.threshold),
                     _json(c.details), c.evaluated_at or now, c.code_version] for c in rows])
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return len(rows)

    def delete_run(self, run_id: str) -> bool:
        """Remove a run and all its rows in one transaction (e.g. to recompute it)."""
        self._require_writer("delete_run")
        with self._connect() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                n = con.execute("SELECT count(*) FROM runs WHERE run_id = ?", [run_id]).fetchone()[0]
                for table in ("metrics", "per_prompt_scores", "timings", "feature_stats", "samples", "runs"):
                    con.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_id])
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
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
                      run_id: str | None = None, block: str | None = None) -> pl.DataFrame:
        """σ²_Δ rows joined with ``experiment_id``, ``variation_id``, ``seed``."""
        return self._joined("feature_stats", "t.block, t.delta", experiment_id, variation_id,
                            run_id, block=block)

    def samples(self, experiment_id: str | None = None, variation_id: str | None = None,
                run_id: str | None = None) -> pl.DataFrame:
        """Sample references; ``image_path`` is relative to :attr:`root` (use :meth:`image_file`)."""
        return self._joined("samples", "t.prompt_id", experiment_id, variation_id, run_id)

    def criteria(self, experiment_id: str | None = None) -> pl.DataFrame:
        """Success-criteria verdicts."""
        w, a = self._where(experiment_id=experiment_id)
        return self.sql(f"SELECT * FROM criteria{w} ORDER BY experiment_id, criterion", a)

    @property
    def root(self) -> Path:
        """The store's folder; sample ``image_path`` values are relative to it."""
        return self.path.resolve().parent

    def image_file(self, image_path: str) -> Path:
        """Absolute path of a stored sample's ``image_path``."""
        return self.root / image_path

    def metric_summary(self, experiment_id: str, metric: str, confidence: float = 0.95) -> pl.DataFrame:
        """Mean and t-interval over seeds of one metric, per variation.

        Columns: ``variation_id, n_seeds, mean, std, ci_low, ci_high, feature_extractor,
        preprocessing``.

        Example:
            >>> store.metric_summary("mini-exp-1", "fd_efficientnet_lite0")
        """
        from .stats import mean_ci

        df = self.metrics(experiment_id=experiment_id, metric=metric)
        rows = []
        if df.height:
            for (variation,), g in df.group_by(["variation_id"], maintain_order=True):
                ci = mean_ci(g["value"].to_list(), confidence=confidence)
                rows.append({
                    "variation_id": variation, "n_seeds": ci.n, "mean": ci.mean, "std": ci.std,
                    "ci_low": ci.low, "ci_high": ci.high,
                    "feature_extractor": ",".join(sorted(set(g["feature_extractor"].to_list()))),
                    "preprocessing": ",".join(sorted(set(g["preprocessing"].to_list()))),
                })
        schema = {"variation_id": pl.String, "n_seeds": pl.Int64, "mean": pl.Float64, "std": pl.Float64,
                  "ci_low": pl.Float64, "ci_high": pl.Float64, "feature_extractor": pl.String,
                  "preprocessing": pl.String}
        return pl.DataFrame(rows, schema=schema)
