"""The study server's private temp folder: Gradio's cache and the admin's CSV exports, removed
when the server stops.

Gradio keeps what it serves (image copies, exported files) in ``GRADIO_TEMP_DIR``, by default one
folder shared by every Gradio app on the machine and never emptied. ``fcr-human-study serve`` gives
each server its own folder, ``fcr-human-study-<pid>-<random>``, under the system's temp folder
(or under ``GRADIO_TEMP_DIR`` when the user set one), removes it when the server stops (Ctrl-C,
SIGTERM, an error) and, at start, removes the folders of servers that were killed (their pid no
longer runs) so that a SIGKILL leaves nothing behind for long.

Example:
    >>> with server_temp_folder() as tmp:
    ...     os.environ["GRADIO_TEMP_DIR"] = str(tmp / "gradio")
    ...     serve(...)
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["PREFIX", "server_temp_folder", "stop_on_sigterm", "sweep_stale_folders"]

logger = logging.getLogger(__name__)

PREFIX = "fcr-human-study-"
_NAME = re.compile(rf"^{re.escape(PREFIX)}(\d+)-[A-Za-z0-9_]+$")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: running
        return True
    return True


def sweep_stale_folders(base: Path) -> list[Path]:
    """Remove this user's server folders in ``base`` whose server no longer runs; returns them."""
    removed = []
    for path in base.glob(f"{PREFIX}*"):
        m = _NAME.match(path.name)
        if not m or not path.is_dir() or path.is_symlink():
            continue
        try:
            if path.stat().st_uid != os.getuid() or _running(int(m.group(1))):
                continue
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        logger.info("removed %s, left by a server that was killed", path)
        removed.append(path)
    return removed


@contextlib.contextmanager
def server_temp_folder(base: str | os.PathLike | None = None) -> Iterator[Path]:
    """A new private folder for one server process, removed on exit (whatever the exit).

    Args:
        base: where to make it; ``GRADIO_TEMP_DIR`` if set, else the system's temp folder.
    """
    base = Path(base or os.environ.get("GRADIO_TEMP_DIR") or tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    sweep_stale_folders(base)
    path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Inside, SIGTERM stops the process as Ctrl-C does (``KeyboardInterrupt``), so that servers
    close and ``finally`` blocks run (the default SIGTERM ends the process on the spot)."""

    def interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
