"""What produced a training run: the code version (:func:`fcr_common.provenance.code_version`),
hardware and command line, stored in each run folder's ``config.json``."""

from __future__ import annotations

import os
import platform
import sys
import time

import torch
from fcr_common.provenance import code_version

__all__ = ["hardware", "run_provenance"]


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
