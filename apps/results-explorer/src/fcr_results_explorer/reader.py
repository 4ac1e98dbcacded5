"""Read-only access to the results store (and the human-study votes store beside it).

DuckDB allows one writing *process* per database file, and while that process has the file open
no other process can open it at all, not even read-only ("Could not set lock on file ...
Conflicting lock is held in ... (PID n)"). Readers, on the other hand, share the file. So the
explorer:

* opens the store with ``read_only=True`` for the length of one page render and closes it again,
  so that it never keeps an experiment runner from opening the store for long;
* when a running experiment holds the write lock, retries briefly and then reads a *snapshot*: a
  copy of the database file and its write-ahead log taken into a private temporary folder. DuckDB
  replays the copied WAL when it opens the copy, so every run committed before the copy is
  visible; a run is written in one transaction, so a snapshot never shows half a run. A copy that
  does not open (torn by a checkpoint in flight) is taken again.

Queries return polars frames straight from DuckDB's Arrow output; callers aggregate in SQL.

Example::

    with StoreReader(StoreLocation.resolve("results/fcr.duckdb")) as reader:
        runs = reader.frame("SELECT count(*) AS n FROM runs")
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
from fcr_eval.store.db import (
    StoreLockedError,
    StoreUnreadableError,
    check_complete,
    connect,
    database_kind,
    retry_while_locked,
)

logger = logging.getLogger(__name__)

DEFAULT_STORE = Path("results/fcr.duckdb")
HUMAN_STUDY_FILE = "human-study.duckdb"
HUMAN_STUDY_ALIAS = "hs"
STORE_TABLES = (
    "runs",
    "metrics",
    "per_prompt_scores",
    "timings",
    "feature_stats",
    "samples",
    "criteria",
)
HUMAN_STUDY_TABLES = ("human_study_results", "human_study_scores")


class StoreUnavailable(StoreUnreadableError):
    """The store exists but could not be opened, even as a snapshot (not a DuckDB file, or a
    snapshot that never opened)."""


def _file_state(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError:
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)


def _wal(path: Path) -> Path:
    return path.with_name(path.name + ".wal")


@dataclass(frozen=True)
class StoreLocation:
    """Where the results store and the human-study votes store are.

    Args:
        path: the results store (``results/fcr.duckdb`` by default).
        human_study_path: the human-study store; by default ``human-study.duckdb`` beside the
            results store.
    """

    path: Path
    human_study_path: Path

    @classmethod
    def resolve(
        cls, path: str | os.PathLike[str] | None = None, human_study_path: str | None = None
    ) -> StoreLocation:
        store = Path(path) if path else DEFAULT_STORE
        store = store.expanduser().resolve()
        hs = Path(human_study_path).expanduser().resolve() if human_study_path else None
        return cls(store, hs or store.with_name(HUMAN_STUDY_FILE))

    @property
    def folder(self) -> Path:
        """The folder that sample image paths are relative to."""
        return self.path.parent

    def fingerprint(self) -> tuple[Any, ...]:
        """Changes whenever either store (or its WAL) changes on disk; a cache key."""
        return (
            str(self.path),
            _file_state(self.path),
            _file_state(_wal(self.path)),
            str(self.human_study_path),
            _file_state(self.human_study_path),
            _file_state(_wal(self.human_study_path)),
        )


@dataclass
class OpenNote:
    """How the store was opened, for a banner in the app."""

    snapshot_of: str | None = None  # which file was read through a snapshot
    lock_holder_pid: str | None = None
    taken_at: datetime | None = None
    human_study_error: str | None = None

    @property
    def is_snapshot(self) -> bool:
        return self.snapshot_of is not None


def _snapshot(path: Path, into: Path, attempts: int = 5) -> Path:
    """Copy a DuckDB file and its WAL into ``into``; return the copy once it opens and is whole
    (a copy taken mid-write is retaken)."""
    last: Exception | None = None
    for attempt in range(attempts):
        copy = into / f"{path.stem}-{attempt}{path.suffix}"
        shutil.copyfile(path, copy)
        if _wal(path).exists():
            try:
                shutil.copyfile(_wal(path), _wal(copy))
            except FileNotFoundError:  # checkpointed away while we copied: the file has it all
                pass
        try:
            with connect(copy, read_only=True, timeout=0, describe="snapshot") as con:
                con.execute("SELECT 1").fetchall()
                # a copy taken while the writer grows the file can open yet be cut short
                check_complete(con, copy, f"snapshot of {path}")
            return copy
        except (duckdb.Error, StoreUnreadableError) as error:  # torn copy: take another
            last = error
            logger.info("snapshot %d of %s did not open: %s", attempt, path, error)
            time.sleep(0.2 * (attempt + 1))
    raise StoreUnavailable(f"could not take a readable snapshot of {path}: {last}")


@dataclass
class StoreReader:
    """One read-only session over the store; open lazily, close when the page is drawn.

    Args:
        location: the store files.
        retries: read-only open attempts while another process holds the write lock, before
            falling back to a snapshot.
        backoff_s: first wait between attempts (doubles each time).
    """

    location: StoreLocation
    retries: int = 5
    backoff_s: float = 0.15
    note: OpenNote = field(default_factory=OpenNote)
    _con: duckdb.DuckDBPyConnection | None = field(default=None, init=False, repr=False)
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, init=False, repr=False)
    _tables: set[str] | None = field(default=None, init=False, repr=False)
    _hs_attached: bool = field(default=False, init=False, repr=False)

    # -- opening -----------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.location.path.is_file()

    @property
    def _lock_wait_s(self) -> float:
        """How long the attempts of ``retries`` / ``backoff_s`` (doubling) wait in all."""
        return self.backoff_s * (2 ** max(0, self.retries - 1) - 1)

    def _connect_read_only(self, path: Path, describe: str) -> duckdb.DuckDBPyConnection:
        return connect(path, read_only=True, timeout=self._lock_wait_s, first_delay=self.backoff_s,
                       max_delay=float("inf"), describe=describe)

    def _tmpdir(self) -> Path:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fcr-explorer-")
        return Path(self._tmp.name)

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        if self._con is None:
            self._con = self._open()
        return self._con

    def _open(self) -> duckdb.DuckDBPyConnection:
        path = opened = self.location.path
        try:
            con = self._connect_read_only(path, "results store")
        except StoreLockedError as locked:
            logger.info("store %s is locked by PID %s; reading a snapshot", path, locked.holder_pid)
            opened = copy = _snapshot(path, self._tmpdir())
            con = connect(copy, read_only=True, timeout=0, describe="snapshot of the results store")
            self.note.snapshot_of = str(path)
            self.note.lock_holder_pid = locked.holder_pid
            self.note.taken_at = datetime.now(timezone.utc)
        except StoreUnreadableError as error:
            raise StoreUnavailable(str(error)) from None
        try:
            check_complete(con, opened, "results store" if opened == path else f"snapshot of {path}")
        except StoreUnreadableError as error:
            con.close()
            raise StoreUnavailable(str(error)) from None
        _add_later_columns(con)
        self._attach_human_study(con)
        return con

    def _attach_human_study(self, con: duckdb.DuckDBPyConnection) -> None:
        hs = self.location.human_study_path
        if not hs.is_file():
            return

        def attach(target: Path) -> None:
            con.execute(f"ATTACH '{_sql_str(target)}' AS {HUMAN_STUDY_ALIAS} (READ_ONLY)")

        try:
            try:
                retry_while_locked(lambda: attach(hs), timeout=self._lock_wait_s, first_delay=self.backoff_s,
                                   max_delay=float("inf"), describe=f"human-study file {hs}")
            except StoreLockedError:
                # The study app keeps its votes store open for writing: read a snapshot.
                attach(_snapshot(hs, self._tmpdir()))
            self._hs_attached = True
        except (duckdb.Error, StoreUnavailable) as exc:
            self.note.human_study_error = str(exc)
            logger.warning("could not attach %s: %s", hs, exc)

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- schema ------------------------------------------------------------------------------
    def tables(self) -> set[str]:
        """Names of the tables present (human-study ones prefixed ``hs.``)."""
        if self._tables is None:
            rows = self.con.execute(
                "SELECT database_name, table_name FROM duckdb_tables() "
                "WHERE schema_name = 'main'"
            ).fetchall()
            main = self.con.execute("SELECT current_database()").fetchall()[0][0]
            self._tables = {
                name if db == main else f"{db}.{name}" for db, name in rows
            }
        return self._tables

    def has(self, table: str) -> bool:
        return table in self.tables()

    def kind(self) -> tuple[str, list[str]]:
        """Which file the store path holds (:func:`fcr_eval.store.db.database_kind`)."""
        return database_kind(self.con)

    @property
    def human_study_schema(self) -> str | None:
        """Where the human-study analysis is: ``"hs"`` (its own file, attached), ``"main"``
        (tables in the results store itself, when they hold rows) or ``None``."""
        if self.has(f"{HUMAN_STUDY_ALIAS}.human_study_results"):  # opens the store if needed
            return HUMAN_STUDY_ALIAS
        if self.has("human_study_results") and self.con.execute(
            "SELECT count(*) FROM (SELECT 1 FROM human_study_results LIMIT 1)"
        ).fetchall()[0][0]:
            return "main"
        return None

    @property
    def has_human_study(self) -> bool:
        return self.human_study_schema is not None

    # -- queries -----------------------------------------------------------------------------
    def frame(self, sql: str, params: list[Any] | dict[str, Any] | None = None) -> pl.DataFrame:
        """Run a query and return its result as a polars frame."""
        return self.con.sql(sql, params=params).pl()


def _sql_str(path: Path) -> str:
    return str(path).replace("'", "''")


#: ``runs`` columns that later store migrations added, with their types: a store no writer has
#: migrated yet (the explorer never migrates; it opens read-only) reads them as NULL.
LATER_RUN_COLUMNS: dict[str, str] = {"lambda_oc": "DOUBLE"}


def _add_later_columns(con: duckdb.DuckDBPyConnection) -> None:
    """Shadow an old store's ``runs`` with a temporary view that adds the missing later columns as
    NULL, so every query reads one schema (the file is not touched)."""
    db = con.execute("SELECT current_database()").fetchone()[0]
    have = {r[0] for r in con.execute(
        "SELECT column_name FROM duckdb_columns() WHERE database_name = ? AND schema_name = 'main' "
        "AND table_name = 'runs'", [db]).fetchall()}
    if not have:
        return
    missing = [f"NULL::{typ} AS {col}" for col, typ in LATER_RUN_COLUMNS.items() if col not in have]
    if missing:
        con.execute(f'CREATE TEMP VIEW runs AS SELECT *, {", ".join(missing)} FROM "{_sql_ident(db)}".main.runs')


def _sql_ident(name: str) -> str:
    return name.replace('"', '""')
