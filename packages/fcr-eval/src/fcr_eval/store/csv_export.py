"""CSV that a spreadsheet opens as data: text cells never start a formula.

A cell that starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return is read as a formula
by Excel, LibreOffice and Google Sheets (``=HYPERLINK(...)``, ``=cmd|...``): CSV injection
(OWASP). Labels, prompts and ids in our exports come from whoever invited a rater or wrote an
experiment, so every *text* cell that starts with one of those characters gets a leading ``'``,
which spreadsheets show as text and hide. Numbers are written as numbers (a negative seed stays
``-3``). Every CSV the toolkit writes from stored rows goes through here (the human study's votes,
the explorer's downloads).

Example:
    >>> spreadsheet_safe("=HYPERLINK(\\"http://x\\")")
    '\\'=HYPERLINK("http://x")'
    >>> write_csv("votes.csv", rows, ["rater_id", "rater_label", "choice"])
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["FORMULA_START", "spreadsheet_safe", "write_csv"]

#: A text cell starting with one of these is a formula to a spreadsheet (a regex, for polars too).
FORMULA_START = r"^[=+\-@\t\r]"
_FORMULA = re.compile(FORMULA_START)


def spreadsheet_safe(value: Any) -> Any:
    """``value`` with a leading ``'`` if it is text a spreadsheet would run as a formula; any
    other value unchanged."""
    if isinstance(value, str) and _FORMULA.match(value):
        return "'" + value
    return value


def write_csv(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    """Write ``rows`` (dicts with ``columns``) as CSV with :func:`spreadsheet_safe` text cells."""
    path = Path(path)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns))
        w.writeheader()
        w.writerows({k: spreadsheet_safe(v) for k, v in row.items()} for row in rows)
    return path
