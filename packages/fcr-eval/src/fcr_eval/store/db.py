"""Opening DuckDB files: the one helper the results store, the human-study store and the results
explorer share.

DuckDB lets one process at a time open a file for writing, and while it is open for writing no
*other* process can open it at all, not even read-only. Every caller here therefore opens a
connection for a short piece of work and closes it again; :func:`connect` retries while another
process holds the file (exponential back-off up to ``timeout`` seconds) and then raises
:class:`StoreLockedError` naming the holder. A path that cannot be a database — a directory, a
file of other bytes, a file (or folder) that does not exist when opened for reading — raises
:class:`StoreUnreadableError` with what is wrong and what to do, never DuckDB's raw error, and
opening for reading never creates a file.

:func:`transaction` is the one BEGIN / COMMIT / ROLLBACK block.

Example:
    >>> with connect("results/fcr.duckdb", read_only=True, timeout=5) as con:
    ...     con.execute("SELECT count(*) FROM runs").fetchone()
    >>> with connect("results/fcr.duckdb") as con, transaction(con):
    ...     con.execute("DELETE FROM criteria WHERE experiment_id = ?", ["exp-1"])
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import duckdb

__all__ = [
    "StoreError",
    "StoreLockedError",
    "StoreSchemaError",
    "StoreUnreadableError",
    "connect",
    "transaction",
    "retry_while_locked",
    "is_lock_conflict",
    "lock_holder",
    "utcnow",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class StoreError(RuntimeError):
    """Base class of every error a DuckDB store (results store, human-study store) raises."""


class StoreLockedError(StoreError):
    """Another process holds the DuckDB file (DuckDB allows one writing process per file).

    ``holder_pid`` is the process DuckDB named as the holder, when it named one.
    """

    def __init__(self, message: str, *, holder_pid: str | None = None) -> None:
        super().__init__(message)
        self.holder_pid = holder_pid


class StoreSchemaError(StoreError):
    """The file's schema version is not the one this code reads."""


class StoreUnreadableError(StoreError):
    """The path is not a DuckDB database that can be opened: a directory, a file of other bytes,
    or (for reading) a file or folder that does not exist."""


def utcnow() -> _dt.datetime:
    """Now in UTC as a naive timestamp (how every store keeps its TIMESTAMP columns)."""
    return _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)


_LOCK_TEXT = re.compile(r"could not set lock|conflicting lock", re.IGNORECASE)
_HOLDER = re.compile(r"held in (.*?)\s*\(PID (\d+)\)")
_PID = re.compile(r"PID (\d+)")


def is_lock_conflict(error: BaseException) -> bool:
    """Whether a DuckDB error says another process holds the file's lock."""
    return bool(_LOCK_TEXT.search(str(error)))


def lock_holder(error: BaseException) -> str | None:
    """The PID DuckDB names in a lock-conflict error, if any."""
    match = _PID.search(str(error))
    return match.group(1) if match else None


def _holder_text(error: BaseException) -> str:
    match = _HOLDER.search(str(error))
    if match:
        return f"{match.group(1)} (PID {match.group(2)})"
    pid = lock_holder(error)
    return f"PID {pid}" if pid else "another process"


def retry_while_locked(call: Callable[[], T], *, timeout: float, first_delay: float = 0.05,
                       max_delay: float = 1.0, describe: str = "database") -> T:
    """Run ``call()`` until it stops failing on DuckDB's file lock, for up to ``timeout`` s.

    Any other error propagates at once. After the deadline the last lock error is raised as
    :class:`StoreLockedError` naming the holding process.

    Args:
        call: e.g. ``lambda: duckdb.connect(path)`` or an ``ATTACH`` statement.
        timeout: seconds to keep retrying (``0`` tries once).
        first_delay / max_delay: the back-off's first wait and its cap (it doubles each time).
        describe: what is being opened, for the message (e.g. ``"results store x.duckdb"``).

    Example:
        >>> con = retry_while_locked(lambda: duckdb.connect("x.duckdb"), timeout=10)
    """
    deadline = time.monotonic() + max(0.0, float(timeout))
    delay = max(1e-3, float(first_delay))
    while True:
        try:
            return call()
        except duckdb.Error as e:
            if not is_lock_conflict(e):
                raise
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StoreLockedError(
                    f"{describe} is held by {_holder_text(e)} and stayed busy for {timeout:.1f} s. "
                    "DuckDB allows one process per file while it writes: wait for that process to "
                    "finish (or stop it), or use another file; readers should open it read-only "
                    f"and keep connections short. DuckDB said: {e}",
                    holder_pid=lock_holder(e),
                ) from None
            logger.debug("%s busy, retrying in %.2f s: %s", describe, delay, e)
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, max_delay)


def _check_path(path: Path, read_only: bool, describe: str, missing_hint: str) -> None:
    if path.is_dir():
        raise StoreUnreadableError(
            f"{describe} {path} is a directory, not a DuckDB file; pass the database file "
            f"itself (e.g. {path / 'fcr.duckdb'})"
        )
    if not read_only:
        if not path.parent.is_dir():
            raise StoreUnreadableError(
                f"the folder of {describe} {path} does not exist ({path.parent}); create it or "
                "pass a path in an existing folder"
            )
        return
    if not path.exists():
        if not path.parent.is_dir():
            raise StoreUnreadableError(
                f"no {describe} at {path}: its folder {path.parent} does not exist; {missing_hint}"
            )
        raise StoreUnreadableError(f"no {describe} at {path}; {missing_hint} (nothing was created)")


def connect(path: str | os.PathLike, *, read_only: bool = False, timeout: float = 30.0,
            first_delay: float = 0.05, max_delay: float = 1.0, describe: str = "database",
            missing_hint: str = "check the path") -> duckdb.DuckDBPyConnection:
    """Open the DuckDB file ``path``, waiting while another process holds it.

    Writers (``read_only=False``) create the file if it is missing (its folder must exist);
    readers never create anything.

    Args:
        path: the DuckDB file.
        read_only: open for queries only; the file must exist.
        timeout: seconds to keep retrying while another process holds the file.
        first_delay / max_delay: back-off between attempts (see :func:`retry_while_locked`).
        describe: what the file is, for messages (``"results store"``, ``"study file"``).
        missing_hint: what to do when a file opened for reading does not exist.

    Returns:
        An open connection; close it (or use it as a context manager) when done.

    Raises:
        StoreUnreadableError: a directory, a file that is not a DuckDB database (or one written
            by an incompatible DuckDB), or — for reading — a missing file or folder.
        StoreLockedError: another process held the file for longer than ``timeout``.

    Example:
        >>> with connect("results/fcr.duckdb", read_only=True) as con:
        ...     con.execute("SELECT 1").fetchall()
        [(1,)]
    """
    path = Path(path)
    _check_path(path, read_only, describe, missing_hint)
    try:
        return retry_while_locked(
            lambda: duckdb.connect(str(path), read_only=read_only), timeout=timeout,
            first_delay=first_delay, max_delay=max_delay, describe=f"{describe} {path}",
        )
    except duckdb.Error as e:
        text = str(e)
        if "not a valid DuckDB database" in text:
            what = "is not a DuckDB database (its bytes are something else, or it is damaged)"
        elif "version" in text.lower():
            what = "was written by an incompatible DuckDB version"
        else:
            what = "cannot be opened"
        raise StoreUnreadableError(
            f"{describe} {path} {what}. Point to the right file, or move this one aside and "
            f"let a writer create a new store there. DuckDB said: {text.splitlines()[0]}"
        ) from None


@contextlib.contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """``BEGIN`` … ``COMMIT`` around the block; ``ROLLBACK`` if it raises (then re-raises).

    Once the block has exited normally the commit is durable (DuckDB's write-ahead log).

    Example:
        >>> with transaction(con):
        ...     con.execute("INSERT INTO votes VALUES (?)", ["a"])
    """
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")
