"""Measuring primitives shared by every benchmark and by the experiment runner's cost metrics:
device synchronisation, FLOP counting and synchronised wall-clock timing of repeated calls.

Example:
    >>> seconds = time_calls(lambda: pipe("a cat"), repeats=3, device="cuda")
    >>> count_flops(lambda: torch.nn.Linear(4, 3)(torch.ones(2, 4)))
    48
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["synchronize", "count_flops", "time_calls"]


def synchronize(device: str | torch.device) -> None:
    """Wait for queued kernels on ``device`` (a no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def count_flops(fn: Callable[[], Any]) -> int:
    """Total FLOPs of one call of ``fn`` (``torch.utils.flop_counter``; multiply-add = 2 FLOPs;
    matmuls, convolutions and attention, i.e. what dominates a UNet), without autograd."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def time_calls(fn: Callable[[], Any], *, repeats: int, device: str | torch.device = "cpu",
               warmup: int = 1) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones; the device is
    synchronised before the first timed call and after every call, so queued GPU work counts."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        seconds.append(time.perf_counter() - t0)
    return seconds
