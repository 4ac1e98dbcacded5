"""The human study's own DuckDB file (default ``results/human-study.duckdb``).

It holds the study definition (pairs, the study's images, secrets), raters, presentations,
votes and the analysis tables the results explorer reads (``human_study_results``,
``human_study_scores``, ``human_study_summary``; see ``docs/results-store.md``). It is never the
results store: DuckDB allows one writing process per file, and the experiment runner writes that
one.

Concurrency. Inside the serving process every statement goes through ONE connection guarded by
a lock, so concurrent raters are serialised at the database and a vote is committed before the
call that stored it returns. Across processes the file is shared by taking turns, as the results
store does: the connection is opened on demand and closed after ``idle_close_s`` seconds without
use, so the explorer (read-only) or ``fcr-human-study analyse`` can open the file whenever the
study is idle. A busy file is retried for ``lock_timeout`` seconds.

Durability. DuckDB writes a commit to its write-ahead log before ``COMMIT`` returns; a server
killed with SIGKILL replays the log at the next open and loses no committed vote.

Example:
    >>> store = StudyStore("results/human-study.duckdb")
    >>> store.query("SELECT count(*) FROM votes")
    [(0,)]
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import duckdb
from fcr_eval.store.db import (
    KNOWN_DATABASES,
    StoreError,
    StoreLockedError,
    StoreUnreadableError,
    check_complete,
    connect,
    database_kind,
    describe_database,
    transaction,
    utcnow,
)
from fcr_eval.store.migrations import apply_migrations, read_schema_version

__all__ = [
    "DEFAULT_STUDY_PATH",
    "SCHEMA_VERSION",
    "StudyStoreError",
    "StudyStoreLockedError",
    "StudyStoreUnreadableError",
    "NotAStudyFileError",
    "STUDY_TABLES",
    "StudyStore",
    "images_dir_for",
    "utcnow",
]

logger = logging.getLogger(__name__)

DEFAULT_STUDY_PATH = Path("results/human-study.duckdb")


class StudyStoreError(StoreError):
    """Base class of the errors of the study store (a :class:`fcr_eval.store.db.StoreError`)."""


class StudyStoreLockedError(StudyStoreError, StoreLockedError):
    """Another process holds the study file for longer than ``lock_timeout``."""


class StudyStoreUnreadableError(StudyStoreError, StoreUnreadableError):
    """The study path is a directory, not a DuckDB file, or missing when opened for reading."""


class NotAStudyFileError(StudyStoreUnreadableError):
    """The path is a file but not a study file: not a DuckDB database at all, or a DuckDB database
    without the study's tables (the results store, say). Nothing is written to it."""


#: Tables every study file has (migration 1): a DuckDB file without them is not a study file.
STUDY_TABLES = KNOWN_DATABASES["human-study file"]
# Bytes 8-12 of every DuckDB database file (after an 8-byte checksum).
_DUCKDB_MAGIC = b"DUCK"


def _not_a_study(path: Path, why: str) -> NotAStudyFileError:
    return NotAStudyFileError(
        f"{path} is not a study file: {why}. A study file is the DuckDB file `fcr-human-study build --out` "
        f"writes (tables {', '.join(STUDY_TABLES)}, ...); point to one, or build one")


def _is_duckdb_file(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(12)[8:12] == _DUCKDB_MAGIC
    except OSError:
        return False


def _why_not_a_study(con: duckdb.DuckDBPyConnection, *, empty_is_ok: bool) -> str | None:
    """Why the open database is not a study file, or ``None`` when it has the study's tables (or
    has no table at all and ``empty_is_ok``: a writer makes it a study)."""
    kind, tables = database_kind(con)
    if kind == "human-study file" or (kind == "empty" and empty_is_ok):
        return None
    return f"it is {describe_database(kind, tables)}"


def _check_whole(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    try:
        check_complete(con, path, "study file")
    except StoreUnreadableError as e:
        raise StudyStoreUnreadableError(str(e)) from None


def images_dir_for(path: str | os.PathLike) -> Path:
    """The study's image folder: ``<folder of the file>/<file stem>/images``.

    Only this folder is ever served to raters.
    """
    p = Path(path).resolve()
    return p.parent / p.stem / "images"


def _migration_1(con: duckdb.DuckDBPyConnection) -> None:
    """The study, its pairs and images, raters, presentations, votes, analysis tables."""
    con.execute(
        """
        CREATE TABLE study (
            study_id VARCHAR PRIMARY KEY,
            created_at TIMESTAMP,
            source_store VARCHAR,        -- the results store the samples came from
            experiment_id VARCHAR,
            variations JSON,             -- the variation ids compared
            n_pairs INTEGER,             -- all pairs, attention checks included
            n_attention INTEGER,
            pairs_per_rater INTEGER,
            config JSON,                 -- the build options
            code_version VARCHAR,
            signing_key VARCHAR,         -- HMAC key of presentation tokens; never leaves the server
            admin_secret_hash VARCHAR    -- sha256 of the admin secret
        )"""
    )
    con.execute(
        """
        CREATE TABLE study_images (
            image_id VARCHAR PRIMARY KEY,     -- opaque, also the file name
            file VARCHAR NOT NULL,            -- relative to the study file's folder
            kind VARCHAR NOT NULL,            -- 'sample' | 'broken' (attention check)
            source_run_id VARCHAR,
            source_image_path VARCHAR,        -- relative to the results store's folder
            width INTEGER,
            height INTEGER
        )"""
    )
    con.execute(
        """
        CREATE TABLE pairs (
            pair_id VARCHAR PRIMARY KEY,      -- opaque; the only pair name a browser sees
            study_id VARCHAR NOT NULL,
            position INTEGER NOT NULL,
            prompt_id VARCHAR,
            prompt VARCHAR,
            seed INTEGER,
            variation_a VARCHAR NOT NULL,
            variation_b VARCHAR NOT NULL,
            run_a VARCHAR,
            run_b VARCHAR,
            image_a VARCHAR NOT NULL,
            image_b VARCHAR NOT NULL,
            is_attention BOOLEAN NOT NULL,
            expected VARCHAR                  -- 'a' | 'b' for attention checks, else NULL
        )"""
    )
    con.execute(
        """
        CREATE TABLE raters (
            rater_id VARCHAR PRIMARY KEY,
            token_hash VARCHAR NOT NULL UNIQUE,  -- sha256 of the invitation token
            label VARCHAR,
            created_at TIMESTAMP
        )"""
    )
    con.execute(
        """
        CREATE TABLE presentations (
            presentation_id VARCHAR PRIMARY KEY,
            rater_id VARCHAR NOT NULL,
            pair_id VARCHAR NOT NULL,
            left_side VARCHAR NOT NULL,       -- which of the pair's images is shown left: 'a' | 'b'
            issued_at TIMESTAMP
        )"""
    )
    # One vote per (rater, pair) and per presentation: a replayed or duplicated vote cannot be
    # stored twice, whatever the application code does.
    con.execute(
        """
        CREATE TABLE votes (
            rater_id VARCHAR NOT NULL,
            pair_id VARCHAR NOT NULL,
            presentation_id VARCHAR NOT NULL UNIQUE,
            choice VARCHAR NOT NULL,          -- 'a' | 'b' | 'tie' | 'both_bad' (pair sides)
            clicked VARCHAR NOT NULL,         -- 'left' | 'right' | 'tie' | 'both_bad' (what was clicked)
            left_side VARCHAR NOT NULL,
            voted_at TIMESTAMP NOT NULL,
            PRIMARY KEY (rater_id, pair_id)
        )"""
    )
    con.execute(
        """
        CREATE TABLE human_study_results (
            study_id VARCHAR, variation_a VARCHAR, variation_b VARCHAR,
            n_a INTEGER, n_b INTEGER, n_tie INTEGER, n_both_bad INTEGER,
            win_rate_a DOUBLE, ci_low DOUBLE, ci_high DOUBLE, p_value DOUBLE,
            analysed_at TIMESTAMP
        )"""
    )
    con.execute(
        """
        CREATE TABLE human_study_scores (
            study_id VARCHAR, variation VARCHAR, bt_score DOUBLE, ci_low DOUBLE, ci_high DOUBLE
        )"""
    )
    con.execute(
        """
        CREATE TABLE human_study_summary (
            study_id VARCHAR, n_votes INTEGER, n_votes_used INTEGER, n_raters INTEGER,
            n_raters_excluded INTEGER, krippendorff_alpha DOUBLE, fleiss_kappa DOUBLE,
            n_items_agreement INTEGER, min_attention_accuracy DOUBLE, bootstrap INTEGER,
            details JSON, code_version VARCHAR, analysed_at TIMESTAMP
        )"""
    )
    con.execute("CREATE INDEX idx_presentations_rater ON presentations(rater_id)")


MIGRATIONS: tuple[Callable[[duckdb.DuckDBPyConnection], None], ...] = (_migration_1,)
SCHEMA_VERSION = len(MIGRATIONS)


def _migrate(con: duckdb.DuckDBPyConnection) -> None:
    apply_migrations(
        con, list(enumerate(MIGRATIONS, start=1)),
        newer_error=lambda current, latest: StudyStoreError(
            f"the study file is at schema version {current}; this fcr-human-study knows only "
            f"up to {latest}: upgrade it (uv sync)"),
    )


class StudyStore:
    """The study file at ``path``: one lock-guarded connection per process, opened on demand.

    Args:
        path: the DuckDB file (created, with its folder, unless ``read_only``).
        read_only: open for queries only (the file must exist).
        idle_close_s: close the connection after this many idle seconds so other processes can
            open the file; ``0`` closes it after every use (one-shot commands).
        lock_timeout: seconds to keep retrying while another process holds the file.
    """

    def __init__(self, path: str | os.PathLike = DEFAULT_STUDY_PATH, *, read_only: bool = False,
                 idle_close_s: float = 0.0, lock_timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self.idle_close_s = float(idle_close_s)
        self.lock_timeout = float(lock_timeout)
        self._lock = threading.RLock()
        self._con: duckdb.DuckDBPyConnection | None = None
        self._last_use = 0.0
        self._closer: threading.Thread | None = None
        self._closed = False
        try:
            self._check_and_migrate()
        except BaseException:
            self.close()  # a refused file keeps no connection (nor an idle-close thread)
            raise

    def _check_and_migrate(self) -> None:
        if self.read_only:
            with self.connection() as con:
                _check_whole(con, self.path)
                why = _why_not_a_study(con, empty_is_ok=False)
                if why:
                    raise _not_a_study(self.path, why)
                v = read_schema_version(con)
            if v != SCHEMA_VERSION:
                raise StudyStoreError(
                    f"{self.path} is at schema version {v}, this code reads {SCHEMA_VERSION}; "
                    + ("upgrade fcr-human-study (uv sync)" if v > SCHEMA_VERSION else
                       f"`fcr-human-study serve --study {self.path}` migrates it when it starts (readers never "
                       "migrate)"))
        else:
            if not self.path.is_dir():  # a directory is refused by _open() with a clear error
                self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.connection() as con:
                # before the migrations: they would write the study's tables into a foreign file
                _check_whole(con, self.path)
                why = _why_not_a_study(con, empty_is_ok=True)
                if why:
                    raise _not_a_study(self.path, why)
                _migrate(con)

    def __repr__(self) -> str:
        return f"StudyStore({str(self.path)!r}{', read-only' if self.read_only else ''})"

    @property
    def root(self) -> Path:
        """The folder of the study file; ``study_images.file`` is relative to it."""
        return self.path.resolve().parent

    @property
    def images_dir(self) -> Path:
        return images_dir_for(self.path)

    # -- connection -------------------------------------------------------------------------

    def _open(self) -> duckdb.DuckDBPyConnection:
        try:
            return connect(self.path, read_only=self.read_only, timeout=self.lock_timeout,
                           first_delay=0.02, max_delay=0.5, describe="study file",
                           missing_hint="build one with `fcr-human-study build`")
        except StoreLockedError as e:
            raise StudyStoreLockedError(str(e)) from None
        except StoreUnreadableError as e:
            if self.path.is_file() and not _is_duckdb_file(self.path):
                raise _not_a_study(self.path, "it is not a DuckDB database (its bytes are something else, "
                                              "or it is damaged)") from None
            raise StudyStoreUnreadableError(str(e)) from None

    @contextlib.contextmanager
    def connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """The process's connection, held under the store's lock for the ``with`` block."""
        with self._lock:
            if self._closed:
                raise StudyStoreError(f"{self!r} is closed")
            if self._con is None:
                self._con = self._open()
            try:
                yield self._con
            finally:
                self._last_use = time.monotonic()
                if self.idle_close_s <= 0:
                    self._close_now()
                else:
                    self._ensure_closer()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A transaction on the process's connection: committed on exit, rolled back on error.

        Once the block has exited normally the commit is durable (DuckDB's WAL).
        """
        with self.connection() as con, transaction(con):
            yield con

    def _close_now(self) -> None:
        if self._con is not None:
            try:
                self._con.close()
            finally:
                self._con = None

    def _ensure_closer(self) -> None:
        if self._closer is not None and self._closer.is_alive():
            return

        def run() -> None:
            while True:
                time.sleep(self.idle_close_s / 2)
                with self._lock:
                    if self._con is None or self._closed:
                        return
                    if time.monotonic() - self._last_use >= self.idle_close_s:
                        self._close_now()
                        return

        self._closer = threading.Thread(target=run, name="study-store-idle-close", daemon=True)
        self._closer.start()

    def close(self) -> None:
        """Close the connection for good."""
        with self._lock:
            self._close_now()
            self._closed = True

    # -- helpers ----------------------------------------------------------------------------

    def query(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple]:
        """Run one statement and return all rows."""
        with self.connection() as con:
            return con.execute(sql, list(params or [])).fetchall()

    def query_dicts(self, sql: str, params: Sequence[Any] | None = None) -> list[dict[str, Any]]:
        """Run one statement and return rows as dicts."""
        with self.connection() as con:
            cur = con.execute(sql, list(params or []))
            cols = [d[0] for d in cur.description]
            return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]

    def has_study(self) -> bool:
        return bool(self.query("SELECT count(*) FROM study")[0][0])
