"""What produced a number: code version and package versions (stored with every run and verdict).

Example:
    >>> code_version()
    'git:3bfe74e-dirty fcr-eval=0.1.0 fcr-sample=0.1.0 fcr-train=0.1.0 torch=2.15.0 diffusers=0.42.1'
"""

from __future__ import annotations

import functools
import subprocess
from importlib import metadata
from pathlib import Path

__all__ = ["code_version", "package_versions"]

_PACKAGES = ("fcr-eval", "fcr-sample", "fcr-train", "torch", "diffusers")


def package_versions(packages=_PACKAGES) -> dict[str, str]:
    """Installed versions of ``packages`` ('missing' for absent ones)."""
    out = {}
    for p in packages:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "missing"
    return out


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``git describe`` of the checkout this code runs from (if any) plus package versions."""
    parts = []
    try:
        desc = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=10"], cwd=Path(__file__).parent,
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        if desc:
            parts.append(f"git:{desc}")
    except (OSError, subprocess.SubprocessError):
        pass
    parts += [f"{k}={v}" for k, v in package_versions().items()]
    return " ".join(parts)
