"""One writer at a time: a lock file that names its holder and survives a ``kill -9``.

``fcr-train finetune`` writes one output folder and ``fcr-eval run`` one results store (plus its
run and fine-tune folders); two processes doing either at once would interleave checkpoints and
compute every run twice. :class:`ProcessLock` guards such a place with a lock file holding the
holder's pid, host, command and start time:

* **Atomic.** The record is written to a temporary file first and then hard-linked to the lock
  path, which fails if the path exists (the same guarantee as ``O_EXCL``) — so the lock file is
  never seen half-written, and of two processes that try at once exactly one succeeds.
* **Stale locks are taken over.** A lock whose holder is on this host and no longer runs (its
  pid is gone, a zombie, or now a different process that started later) is stale: the next
  ``acquire`` replaces it. Checking and replacing happen under an ``flock`` on the lock's folder,
  so two processes that find the same stale lock cannot both take it over. A holder on another
  host is never presumed dead (its pid means nothing here); the error says to delete the file by
  hand once that process is known to be gone.
* **A clear refusal.** :class:`LockHeldError` names the holder (pid, host, since when, command)
  and what to do.

Example:
    >>> with ProcessLock("runs/fcr/.fcr-train.lock", what="output folder runs/fcr").acquire(wait=60):
    ...     train(...)
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import secrets
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows; there, takeover is not guarded
    fcntl = None

__all__ = ["ProcessLock", "LockHolder", "LockHeldError"]

logger = logging.getLogger(__name__)

# Tests set this in a subprocess to widen the window between finding a stale lock and replacing
# it, to show that the folder flock lets only one taker through.
_takeover_pause_s = 0.0


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its last ')'
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[19]  # field 22 of the whole line: starttime


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] == "Z"


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # runs, as another user
        return True
    return not _is_zombie(pid)


@dataclass(frozen=True)
class LockHolder:
    """Who holds a lock: what the lock file records."""

    pid: int
    host: str
    command: str
    started_at: str  # ISO 8601, UTC
    token: str  # tells this holding apart from a later one by the same pid
    process_start: str | None = None  # /proc start time of pid, where there is a /proc

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, since {self.started_at} (command: {self.command})"

    def is_stale(self) -> bool:
        """Whether the holder is known to be gone: on this host, and its pid no longer runs
        the process that took the lock."""
        if self.host != socket.gethostname():
            return False
        if not _pid_running(self.pid):
            return True
        now = _process_start(self.pid)
        return self.process_start is not None and now is not None and now != self.process_start

    @classmethod
    def of_this_process(cls, command: str | None = None) -> LockHolder:
        return cls(pid=os.getpid(), host=socket.gethostname(),
                   command=command if command is not None else " ".join(sys.argv) or sys.executable,
                   started_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                   token=secrets.token_hex(8), process_start=_process_start(os.getpid()))


class LockHeldError(RuntimeError):
    """The lock is held by another live process (or its file cannot be read).

    Attributes:
        path: the lock file.
        holder: the :class:`LockHolder` it records (``None`` if the file is unreadable).
    """

    def __init__(self, path: Path, holder: LockHolder | None, what: str, waited_s: float,
                 wait_hint: str | None = None) -> None:
        self.path, self.holder = path, holder
        waited = f" after waiting {waited_s:.0f} s" if waited_s > 0 else ""
        if holder is None:
            message = (f"{what} is locked{waited}, and the lock file {path} cannot be read. If no other "
                       f"process is writing there, delete {path} and try again.")
        elif holder.host != socket.gethostname():
            message = (f"{what} is in use by {holder.describe()}{waited}. That process runs on another "
                       f"host, so this one cannot tell whether it still runs: wait for it to finish, or, "
                       f"once it is known to be gone, delete {path} and try again.")
        else:
            wait = f", wait for it ({wait_hint})" if wait_hint else ""
            message = (f"{what} is in use by {holder.describe()}{waited}. Wait for it to finish (or stop "
                       f"it: kill {holder.pid}){wait}, or use another place; "
                       "a lock left by a process that died is taken over automatically.")
        super().__init__(message)


class ProcessLock:
    """An inter-process lock on ``path`` (a lock file), held by at most one process.

    Args:
        path: the lock file; its folder is created if needed.
        what: what the lock guards, for messages (e.g. ``"results store results/fcr.duckdb"``).
        command: recorded as the holder's command (default: this process's ``sys.argv``).
        wait_hint: how the caller's user waits for the holder (e.g. ``"pass --wait SECONDS"``),
            named in the refusal; ``None``: not offered.

    Example:
        >>> lock = ProcessLock("results/fcr.duckdb.writer.lock", what="results store results/fcr.duckdb")
        >>> lock.acquire(wait=False)       # LockHeldError at once if another process holds it
        >>> lock.release()
    """

    def __init__(self, path: str | os.PathLike, *, what: str | None = None, command: str | None = None,
                 wait_hint: str | None = None) -> None:
        self.path = Path(path)
        self.wait_hint = wait_hint
        self.what = what or f"the lock {self.path}"
        self.command = command
        self._mine: LockHolder | None = None

    def __repr__(self) -> str:
        return f"ProcessLock({str(self.path)!r}{', held' if self.held else ''})"

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._mine is not None

    def holder(self) -> LockHolder | None:
        """The current holder as the lock file records it (``None``: free or unreadable)."""
        current = _read(self.path)
        return current if isinstance(current, LockHolder) else None

    # -- taking and giving back -------------------------------------------------------------
    def acquire(self, wait: bool | float = False, *, poll_s: float = 0.25) -> ProcessLock:
        """Take the lock, replacing a stale one.

        Args:
            wait: ``False`` (or 0) refuses at once if another process holds the lock; a number
                waits up to that many seconds; ``True`` waits as long as it takes.
            poll_s: seconds between attempts while waiting.

        Returns:
            ``self`` (so ``with lock.acquire(...):`` works).

        Raises:
            LockHeldError: the lock is held by a live process (after ``wait``), or its file
                cannot be read.
        """
        if self._mine is not None:
            return self
        limit = None if wait is True else max(0.0, float(wait or 0))
        t0 = time.monotonic()
        told = False
        while True:
            holder, readable = self._try_take()
            if holder is None and readable:
                return self
            waited = time.monotonic() - t0
            if not readable or (limit is not None and waited >= limit):
                raise LockHeldError(self.path, holder, self.what, waited, self.wait_hint)
            if not told:
                logger.warning("%s is in use by %s; waiting%s", self.what, holder.describe(),
                               "" if limit is None else f" up to {limit:.0f} s")
                told = True
            time.sleep(poll_s if limit is None else max(0.0, min(poll_s, limit - waited)))

    def release(self) -> None:
        """Give the lock back (a no-op if this object does not hold it). A lock file that no
        longer records this holder (someone removed it and took over) is left alone."""
        mine, self._mine = self._mine, None
        if mine is None:
            return
        with self._folder_guard():
            current = _read(self.path)
            if isinstance(current, LockHolder) and current.token == mine.token:
                self.path.unlink()
            else:
                logger.warning("%s: the lock file %s no longer names this process (now: %s); left as it is",
                               self.what, self.path,
                               current.describe() if isinstance(current, LockHolder) else "no readable holder")

    def __enter__(self) -> ProcessLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- internals --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _folder_guard(self) -> Iterator[None]:
        """Exclusive ``flock`` on the lock's folder while the lock file is checked and changed."""
        if fcntl is None:  # pragma: no cover
            yield
            return
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _try_take(self) -> tuple[LockHolder | None, bool]:
        """One attempt: ``(None, True)`` when taken, else ``(holder, readable)``."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = LockHolder.of_this_process(self.command)
        tmp = self.path.with_name(f"{self.path.name}.{me.pid}.{me.token}.tmp")
        with open(tmp, "x", encoding="utf-8") as f:
            json.dump(asdict(me), f)
            f.flush()
            os.fsync(f.fileno())
        try:
            with self._folder_guard():
                holder = None
                for _ in range(3):  # the file may vanish between the link and the read (removed by hand)
                    if _link(tmp, self.path):
                        self._mine = me
                        return None, True
                    holder = _read(self.path)
                    if holder is not _MISSING:
                        break
                if holder is _UNREADABLE or holder is _MISSING:
                    return None, False
                if not holder.is_stale():
                    return holder, True
                if _takeover_pause_s:
                    time.sleep(_takeover_pause_s)
                self.path.unlink()
                if not _link(tmp, self.path):  # cannot happen under the guard; be safe anyway
                    current = _read(self.path)
                    return (current, True) if isinstance(current, LockHolder) else (None, False)
                logger.warning("%s: took over the stale lock of %s (that process is gone)",
                               self.what, holder.describe())
                self._mine = me
                return None, True
        finally:
            tmp.unlink(missing_ok=True)


def _link(src: Path, dst: Path) -> bool:
    try:
        os.link(src, dst)
    except FileExistsError:
        return False
    return True


_MISSING = object()
_UNREADABLE = object()


def _read(path: Path) -> LockHolder | object:
    """The holder the lock file records, or ``_MISSING`` / ``_UNREADABLE``."""
    try:
        return LockHolder(**json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return _MISSING
    except (OSError, ValueError, TypeError):
        return _UNREADABLE
