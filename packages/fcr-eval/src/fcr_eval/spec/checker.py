"""The generic checker of experiment files: values checked against a spec dataclass's fields,
errors and warnings located at ``file:line``.

:class:`Checker` builds a table into its frozen dataclass (unknown keys with a close match,
missing keys, types, finite numbers, nested tables) and raises :class:`ExperimentFileError` at the
line the key is written on — in ``[profiles.<name>.<table>]`` when the chosen profile sets it.
It knows no table of its own: each table's module (``spec.models``, ``spec.variations``, …)
holds its dataclass and its checks, and :mod:`fcr_eval.spec.experiment` loads the file.

Example::

    chk = Checker(Locator(path, text), profile=None)
    sampling = chk.build(SamplingSpec, raw.get("sampling", {}), "sampling")
    chk.one_of(sampling.scheduler, SCHEDULERS, "sampling.scheduler", "sampling", "scheduler")
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import logging
import math
import re
import typing
from pathlib import Path
from typing import Any

from fcr_eval.spec.names import NAME_RULE, name_problem

__all__ = ["ExperimentFileError", "SpecFieldError", "Locator", "Checker", "deep_merge", "check_profile_names",
           "INT_MAX"]

#: The largest integer a setting may hold: counts and step numbers reach torch and numpy as 32-bit
#: integers, and the results store keeps seeds in 32-bit INTEGER columns (runs.seed, samples.seed).
INT_MAX = 2**31 - 1

logger = logging.getLogger(__name__)


class ExperimentFileError(ValueError):
    """An experiment file is malformed; the message names file:line, the key and what is allowed."""


class SpecFieldError(ValueError):
    """A spec's own ``__post_init__`` check failed; ``key`` names the offending field (for
    ``file:line``). The table's loader turns it into an :class:`ExperimentFileError`."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


@functools.cache
def _nested_table(cls: type, field_name: str) -> type | None:
    """The spec dataclass a field holds as a nested table (``EarlyStoppingSpec | None``), or ``None``."""
    hint = typing.get_type_hints(cls).get(field_name)
    for t in typing.get_args(hint) or (hint,):
        if isinstance(t, type) and dataclasses.is_dataclass(t):
            return t
    return None


class Locator:
    """Best-effort ``file:line`` for a key path (tomllib gives no positions)."""

    def __init__(self, path: Path, text: str):
        self.path, self.lines = path, text.splitlines()

    def _header_line(self, section: str, index: int | None) -> int | None:
        pat = re.compile(rf"^\s*\[\[\s*{re.escape(section)}\s*\]\]" if index is not None
                         else rf"^\s*\[\s*{re.escape(section)}\s*\]")
        hits = [i for i, ln in enumerate(self.lines) if pat.match(ln)]
        if index is not None:
            return hits[index] if index < len(hits) else None
        return hits[0] if hits else None

    def line(self, section: str | None, key: str | None, index: int | None = None) -> int | None:
        start = 0
        end = len(self.lines)
        if section:
            h = self._header_line(section, index)
            if h is None:
                for i, ln in enumerate(self.lines):  # inline table / dotted key
                    if re.match(rf"^\s*{re.escape(section.split('.')[-1])}\s*=", ln):
                        return i + 1
                return None
            start = h
            for j in range(h + 1, len(self.lines)):
                if re.match(r"^\s*\[", self.lines[j]):
                    end = j
                    break
            if key is None:
                return h + 1
        if key is None:
            return None
        pat = re.compile(rf"^\s*\"?{re.escape(key)}\"?\s*=")
        for i in range(start, end):
            if pat.match(self.lines[i]):
                return i + 1
        return (start + 1) if section else None

    def where(self, section: str | None, key: str | None = None, index: int | None = None) -> str:
        ln = self.line(section, key, index)
        return f"{self.path}:{ln}" if ln else str(self.path)


class Checker:
    """Checks values and raises :class:`ExperimentFileError` at ``file:line``.

    ``over`` is the chosen profile's table: a key that the profile sets is located in
    ``[profiles.<name>.<section>]``, not in the base table it overrides. ``quiet`` silences the
    warnings (the other profiles are checked too, without repeating the chosen one's warnings).
    """

    def __init__(self, loc: Locator, profile: str | None, over: dict | None = None, quiet: bool = False):
        self.loc, self.profile, self.over, self.quiet = loc, profile, over or {}, quiet

    def _place(self, section: str | None, key: str | None, index: int | None) -> tuple:
        """Where a key is written: in the profile's table when the profile sets it."""
        if not self.over or self.profile is None:
            return section, key, index
        prefix = f"profiles.{self.profile}"
        if section is None:
            return (prefix, key, None) if key in self.over else (section, key, index)
        node: Any = self.over
        for part in section.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and (key is None or key in node):
            return f"{prefix}.{section}", key, None
        if isinstance(node, list) and index is not None:
            return f"{prefix}.{section}", key, index
        return section, key, index

    def where(self, section: str | None, key: str | None = None, index: int | None = None) -> str:
        return self.loc.where(*self._place(section, key, index))

    def fail(self, msg: str, section: str | None = None, key: str | None = None, index: int | None = None):
        suffix = f" (profile {self.profile!r})" if self.profile else ""
        raise ExperimentFileError(f"{self.where(section, key, index)}: {msg}{suffix}")

    def warn(self, msg: str, section: str | None = None, key: str | None = None, index: int | None = None):
        if not self.quiet:
            logger.warning("%s: %s", self.where(section, key, index), msg)

    def name(self, value: Any, what: str, section: str | None, key: str | None = "id", index: int | None = None):
        """``value`` must be an id (:mod:`fcr_eval.spec.names`): it names folders and files."""
        problem = name_problem(value)
        if problem:
            self.fail(f"{what} = {problem}; an id is {NAME_RULE}", section, key, index)

    def number(self, v: Any, name: str, section, key, index) -> None:
        """``v`` (and every number inside a list or table) must be finite and representable."""
        if isinstance(v, bool):
            return
        if isinstance(v, float) and not math.isfinite(v):
            self.fail(f"{name} = {v} is not a finite number (TOML's nan and inf are refused: every setting is a "
                      "real value)", section, key, index)
        if isinstance(v, int) and abs(v) > INT_MAX:
            self.fail(f"{name} = {v} is past what the toolkit can represent: integers are at most 2**31 - 1 = "
                      f"{INT_MAX}", section, key, index)
        if isinstance(v, dict):
            for k, x in v.items():
                self.number(x, f"{name}.{k}", section, key, index)
        if isinstance(v, list):
            for x in v:
                self.number(x, f"{name}[]", section, key, index)

    def build(self, cls, raw: Any, section: str, index: int | None = None, label: str | None = None, **extra):
        label = label or section
        if not isinstance(raw, dict):
            self.fail(f"[{label}] must be a table, got {type(raw).__name__}", section, None, index)
        names = {f.name: f for f in dataclasses.fields(cls)}
        for k in raw:
            if k not in names or k in extra:
                close = difflib.get_close_matches(k, list(names), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                allowed = ", ".join(n for n in names if n not in extra)
                self.fail(f"unknown key {label}.{k}{hint} Allowed keys: {allowed}", section, k, index)
        missing = [n for n, f in names.items() if n not in raw and n not in extra
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            self.fail(f"[{label}] is missing required key(s) {missing}", section, None, index)
        values = {}
        for k, v in raw.items():
            self.number(v, f"{label}.{k}", section, k, index)
            values[k] = self.coerce(names[k].type, v, f"{label}.{k}", section, k, index,
                                    nested=_nested_table(cls, k))
        try:
            return cls(**values, **extra)
        except (SpecFieldError, ExperimentFileError):
            raise
        except (TypeError, ValueError) as e:  # a spec's own __post_init__ check
            self.fail(f"[{label}]: {e}", section, None, index)

    def coerce(self, typ: Any, v: Any, name: str, section, key, index, nested: type | None = None):
        t = str(typ).replace(" ", "")
        optional = "None" in t
        if v is None and optional:
            return None
        if nested is not None:
            if v is False and optional:  # a profile switches an optional table off: `early_stopping = false`
                return None
            return self.build(nested, v, f"{section}.{key}" if section else key, label=name)

        def bad(want: str):
            self.fail(f"{name} = {v!r} is not {want}", section, key, index)

        base = t.replace("|None", "")
        if base == "bool":
            if not isinstance(v, bool):
                bad("true or false")
            return v
        if base == "int":
            if isinstance(v, bool) or not isinstance(v, int):
                bad("an integer")
            return v
        if base == "float":
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                bad("a number")
            return float(v)
        if base == "str":
            if not isinstance(v, str):
                bad("a string")
            return v
        if base == "dict":
            if not isinstance(v, dict):
                bad("a table")
            return dict(v)
        if base.startswith("tuple[tuple[str,str]"):
            if not isinstance(v, list) or not all(isinstance(p, list) and len(p) == 2 for p in v):
                bad("a list of [variation_a, variation_b] pairs")
            return tuple(tuple(str(x) for x in p) for p in v)
        if base.startswith("tuple["):
            inner = base[len("tuple["):].split(",")[0]
            if not isinstance(v, list):
                bad(f"a list of {inner}")
            return tuple(self.coerce(inner, x, name, section, key, index) for x in v)
        return v

    def one_of(self, value, allowed, name, section, key, index=None):
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.fail(f"{name} = {value!r} is not allowed{hint}; use one of {list(allowed)}", section, key, index)


def deep_merge(base: dict, over: dict) -> dict:
    """``base`` with ``over`` merged in, table by table (a profile over the file)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out



def check_profile_names(chk: Checker, names: tuple[str, ...] | None, what: str, profiles: dict, section: str,
                        index: int) -> None:
    """Every name in a variation's or contrast's ``profiles = [...]`` is a profile of the file."""
    unknown = [p for p in names or () if p not in profiles]
    if unknown:
        chk.fail(f"{what} names {', '.join(map(repr, unknown))}, which the file does not define; its profiles are "
                 f"{sorted(profiles) or 'none'} (a [profiles.<name>] table makes one)", section, "profiles", index)
