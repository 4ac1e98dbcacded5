"""What produced a number: the code version (the checkout's ``git describe`` and the installed
package versions), stored with every run, verdict, fine-tune and benchmark.

Example:
    >>> code_version()
    'git:3bfe74e-dirty fcr-eval=0.1.0 fcr-sample=0.1.0 fcr-train=0.1.0 torch=2.15.0 diffusers=0.42.1'
"""

from __future__ import annotations

import functools
import subprocess
from importlib import metadata
from pathlib import Path

__all__ = ["code_version", "git_describe", "package_versions", "PACKAGES"]

#: The installed versions a code version names.
PACKAGES = ("fcr-eval", "fcr-sample", "fcr-train", "torch", "diffusers")


def package_versions(packages=PACKAGES) -> dict[str, str]:
    """Installed versions of ``packages`` ('missing' for absent ones)."""
    out = {}
    for p in packages:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "missing"
    return out


def git_describe(path: str | Path | None = None) -> str | None:
    """``git describe --always --dirty`` of the checkout holding ``path`` (default: this code), or
    ``None`` outside a checkout."""
    where = Path(path) if path is not None else Path(__file__).parent
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=10"], cwd=where,
                             capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``git:<describe>`` of the checkout this code runs from (if any) plus package versions."""
    desc = git_describe()
    parts = [f"git:{desc}"] if desc else []
    parts += [f"{k}={v}" for k, v in package_versions().items()]
    return " ".join(parts)
