"""Names and the paths built from them: the one rule every id of an experiment file follows, and
the one check that a path built from ids stays under its root.

An id (experiment, variation after ``{placeholder}`` expansion, contrast, profile, model, data
set, robustness protocol, human-study id) becomes a folder or file name: run folders, fine-tune
folders, sample PNGs, plots and grids are named after them. So an id is a *name*, never a path:
1 to 64 characters, letters, digits, ``.``, ``_`` and ``-``, starting with a letter or digit
(no ``/``, no ``..``, no NUL, short enough for every file system's 255-byte limit once prefixed).

Example:
    >>> name_problem("fd-10")            # None: a good name
    >>> name_problem("../escape")
    "'../escape' is not a name: ..."
    >>> safe_child(Path("results"), "runs", "exp-1", "fd-10")
    PosixPath('results/runs/exp-1/fd-10')
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["NAME_PATTERN", "NAME_MAX", "NAME_RULE", "name_problem", "is_name", "safe_child", "PathEscapeError"]

#: The longest id: leaves room for the prefixes and suffixes added to it (``s<seed>``, ``-n<N>``...)
#: within a 255-byte file name.
NAME_MAX = 64
#: An id, as a regular expression (full match).
NAME_PATTERN = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{NAME_MAX - 1}}}")
#: The rule in words, for messages.
NAME_RULE = (f"1-{NAME_MAX} characters: letters, digits, '.', '_' or '-', starting with a letter or digit "
             "(an id names a folder, so no '/', '..', spaces or control characters)")


class PathEscapeError(ValueError):
    """A path built from ids or user strings would leave its root."""


def is_name(value: object) -> bool:
    """Whether ``value`` is a string that follows :data:`NAME_PATTERN` (and is not ``.``/``..``)."""
    return isinstance(value, str) and bool(NAME_PATTERN.fullmatch(value)) and value not in (".", "..")


def name_problem(value: object) -> str | None:
    """What is wrong with ``value`` as an id, or ``None`` when it is a good name.

    Example:
        >>> name_problem("x" * 300)
        "'xxxx…' (300 characters) is too long: ids are at most 64 characters"
    """
    if not isinstance(value, str):
        return f"{value!r} is not a string"
    if is_name(value):
        return None
    if not value:
        return "'' is empty"
    if len(value) > NAME_MAX:
        return f"{value[:24]!r}… ({len(value)} characters) is too long: ids are at most {NAME_MAX} characters"
    return f"{value!r} is not a name"


def safe_child(root: str | os.PathLike, *parts: str) -> Path:
    """``root / parts...`` (as given, not resolved), after checking that it stays under ``root``.

    Every part must be a single path component (no separator, not ``.``/``..``, no NUL) and the
    resolved path (symbolic links followed) must lie inside the resolved root. Nothing is created.

    Args:
        root: the folder the path must stay in (need not exist yet).
        parts: path components, e.g. ``("runs", exp.id, variation.id, "s0")``.

    Raises:
        PathEscapeError: naming the part and the root.

    Example:
        >>> safe_child("results", "samples", "exp-1", "fd-10", "s0")
    """
    base = Path(root).resolve()
    for part in parts:
        text = str(part)
        if (not text or text in (".", "..") or "\x00" in text or "/" in text
                or (os.sep != "/" and os.sep in text) or (os.altsep and os.altsep in text)):
            raise PathEscapeError(f"{text!r} cannot be a folder or file name under {base} (it must be one path "
                                  "component: no '/', not '.' or '..'); ids follow " + NAME_RULE)
    joined = Path(root).joinpath(*map(str, parts))
    out = joined.resolve()
    if out != base and base not in out.parents:
        raise PathEscapeError(f"{joined} resolves to {out}, outside {base}; a path built from ids must stay "
                              "under its folder")
    return joined
