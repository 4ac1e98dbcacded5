"""Opening DuckDB files: the one helper the results store, the human-study store and the results
explorer share.

DuckDB lets one process at a time open a file for writing, and while it is open for writing no
*other* process can open it at all, not even read-only. Every caller here therefore opens a
connection for a short piece of work and closes it again; :func:`connect` retries while another
process holds the file (exponential back-off up to ``timeout`` seconds) and then raises
:class:`StoreLockedError` naming the holder. A path that cannot be a database — a directory (or
a path written with a trailing ``/``), a named pipe or other non-file, a file of other bytes, a
file (or folder) that does not exist when opened for reading, a
file or folder that cannot be written when opened for writing — raises
:class:`StoreUnreadableError` with what is wrong and what to do, never DuckDB's raw error (nor a
hang on a pipe), and opening for reading never creates a file.

:func:`database_kind` says which of the toolkit's files an open database is (the results store,
a human-study file, an empty database, or someone else's tables), so that each store refuses
the other's file, and any foreign one, before it migrates or writes anything;
:func:`check_complete` refuses a file cut off before the end of its data.

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
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import duckdb

__all__ = [
    "KNOWN_DATABASES",
    "StoreError",
    "StoreLockedError",
    "StoreSchemaError",
    "StoreUnreadableError",
    "check_complete",
    "connect",
    "database_kind",
    "describe_database",
    "store_path",
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


#: The DuckDB files the toolkit writes, by the tables that mark them (the first table of each is
#: its main one): the results store (fcr-eval) and a human-study file (fcr-human-study).
KNOWN_DATABASES: dict[str, tuple[str, ...]] = {
    "results store": ("runs", "schema_version"),
    "human-study file": ("study", "pairs", "votes"),
}
_KIND_TEXT = {
    "results store": "a results store (fcr-eval's runs and metrics)",
    "human-study file": "a human-study file (fcr-human-study's pairs and votes)",
}
# DuckDB's file layout: a 4 KiB main header and two 4 KiB database headers, then the blocks.
_HEADER_BYTES = 3 * 4096


def database_kind(con: duckdb.DuckDBPyConnection) -> tuple[str, list[str]]:
    """Which file an open database is, and its tables: ``("results store", ...)``,
    ``("human-study file", ...)``, ``("empty", [])`` or ``("other", [its tables])``.

    Example:
        >>> database_kind(duckdb.connect(":memory:"))
        ('empty', [])
    """
    tables = sorted({r[0] for r in con.execute(  # this file's own tables, not those of an attached one
        "SELECT table_name FROM information_schema.tables WHERE table_catalog = current_database()").fetchall()})
    for kind, marks in KNOWN_DATABASES.items():
        if set(marks) <= set(tables):
            return kind, tables
    return ("empty" if not tables else "other"), tables


def describe_database(kind: str, tables: list[str]) -> str:
    """What :func:`database_kind` found, in words: ``"a DuckDB database with other tables (a, b)"``."""
    if kind in _KIND_TEXT:
        return _KIND_TEXT[kind]
    if kind == "empty":
        return "an empty DuckDB database"
    shown = ", ".join(tables[:6]) + (", ..." if len(tables) > 6 else "")
    return f"a DuckDB database with other tables ({shown})"


def store_path(path: str | os.PathLike, describe: str = "database", example: str = "fcr.duckdb") -> Path:
    """``path`` as a :class:`~pathlib.Path`, refusing one written as a folder (``results/``):
    ``Path`` drops the trailing ``/``, and a writer would create a *file* of the folder's name.

    Raises:
        StoreUnreadableError: the path ends with a path separator.
    """
    text = os.fspath(path)
    if isinstance(text, str) and text.endswith(("/", os.sep)) and text.strip("/" + os.sep):
        raise StoreUnreadableError(
            f"{describe} {text} names a folder (it ends with '/'); pass the database file itself, e.g. "
            f"{Path(text) / example}")
    return Path(text)


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


_NOT_FILES = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
              (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _check_path(path: Path, read_only: bool, describe: str, missing_hint: str) -> None:
    if path.is_dir():
        raise StoreUnreadableError(
            f"{describe} {path} is a directory, not a DuckDB file; pass the database file "
            f"itself (e.g. {path / 'fcr.duckdb'})"
        )
    if path.exists() and not path.is_file():  # opening a pipe would block until a writer comes
        mode = path.stat().st_mode
        what = next((text for test, text in _NOT_FILES if test(mode)), "not a regular file")
        raise StoreUnreadableError(f"{describe} {path} is {what}, not a DuckDB file; pass the database file itself")
    if not read_only:
        if not path.parent.is_dir():
            raise StoreUnreadableError(
                f"the folder of {describe} {path} does not exist ({path.parent}); create it or "
                "pass a path in an existing folder"
            )
        # A writer creates the file, its write-ahead log (and the runner its lock file) beside it.
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise StoreUnreadableError(
                f"{describe} {path} cannot be written: its folder {path.parent} is read-only (a writer creates the "
                "file and its write-ahead log there); pass a path in a folder you can write, or make that one "
                "writable")
        if path.exists() and not os.access(path, os.W_OK):
            raise StoreUnreadableError(
                f"{describe} {path} is read-only; writing needs a file you can write. Make it writable, or pass "
                "another path (reading commands open it read-only)")
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
    path = store_path(path, describe)
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


def check_complete(con: duckdb.DuckDBPyConnection, path: str | os.PathLike, describe: str = "database") -> None:
    """Refuse a file that ends before the last block its tables' data lives in: cut off by a copy
    or a full disk. DuckDB opens such a file (its catalog is at the front) and fails only when a
    query reaches a missing block — and a writer would write into it. The blocks come from
    ``pragma_storage_info`` of every table of the file (free blocks past the data may be trimmed
    from the file's end, so its header's block count is not what the file must hold).

    Call it once when a store is opened for a piece of work, not on every connection.

    Raises:
        StoreUnreadableError: the file is shorter than its data.
    """
    path = Path(path)
    (block_size,), = con.execute("SELECT block_size FROM pragma_database_size() "
                                 "WHERE database_name = current_database()").fetchall()
    last = -1
    for (table,) in con.execute("SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() "
                                "AND schema_name = 'main'").fetchall():
        (block,), = con.execute("SELECT max(block_id) FROM pragma_storage_info(?) WHERE persistent",
                                [table]).fetchall()
        if block is not None:
            last = max(last, int(block))
    needed = _HEADER_BYTES + (last + 1) * int(block_size)
    size = path.stat().st_size
    if last >= 0 and size < needed:
        raise StoreUnreadableError(
            f"{describe} {path} is cut off: its tables' data reaches block {last} ({needed:,} bytes) but the file "
            f"has {size:,} bytes (a copy cut short, or a full disk). Restore it from a complete copy, or point to "
            "another file; nothing was written")


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
