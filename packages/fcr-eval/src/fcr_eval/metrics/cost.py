"""Cost metrics: seconds per image, FLOPs, peak memory, fine-tune vs pre-train compute.

* :func:`time_per_image` — wall-clock per image, device-synchronised, after untimed warm-up.
* :func:`count_flops` — FLOPs of one call through ``torch.utils.flop_counter.FlopCounterMode``
  (counts matmuls/convolutions/attention, i.e. what dominates a UNet; 1 multiply-add = 2 FLOPs).
* :func:`measure_peak_memory` — CUDA peak allocated bytes on a GPU (``cuda_peak``), else the
  process's peak resident set size sampled during the call (``process_rss``).
* :func:`training_flops` / :func:`finetune_compute_fraction` — fine-tuning compute relative to
  pre-training compute (design.md §1: ≤ 3 %).

UNet / encoder / decoder forward counts come from ``fcr_sample.get_cache_stats`` (the cache
counts them where they happen); a run without a cache makes one full forward per UNet call.

Example:
    >>> t = time_per_image(lambda: sample(8), images_per_call=8, warmup=1, repeats=3)
    >>> t.sec_per_image, t.device
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# The timing and FLOP-counting primitives are fcr-sample's (its benchmarks use the same ones);
# re-exported here as the runner's cost API.
from fcr_sample.measure import count_flops, synchronize, time_calls

__all__ = [
    "TimingResult",
    "describe_device",
    "synchronize",
    "time_per_image",
    "count_flops",
    "measure_peak_memory",
    "training_flops",
    "finetune_compute_fraction",
    "SD_V1_PRETRAIN_A100_HOURS",
    "to_timing_record",
]

logger = logging.getLogger(__name__)

#: Stable Diffusion v1 pre-training compute as stated on its model card ("Hardware: 32 x 8 x A100
#: GPUs ... Hours used: 150000"); compare fine-tuning A100-hours against it.
SD_V1_PRETRAIN_A100_HOURS = 150_000.0


def describe_device(device: str | torch.device = "cpu") -> str:
    """Human-readable device, stored with every timing: ``"cpu: 2 cores"``, ``"cuda: NVIDIA H100 ..."``.

    Example:
        >>> describe_device("cpu")
        'cpu: 2 cores (torch threads 2)'
    """
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu: {cores} cores (torch threads {torch.get_num_threads()})"


@dataclass(frozen=True)
class TimingResult:
    """Seconds per image (mean over ``repeats`` timed calls) and how it was measured."""

    sec_per_image: float
    std: float
    images_per_call: int
    repeats: int
    warmup: int
    device: str

    @property
    def n_images(self) -> int:
        return self.images_per_call * self.repeats


def time_per_image(fn: Callable[[], Any], images_per_call: int, *, warmup: int = 1, repeats: int = 3,
                   device: str | torch.device = "cpu") -> TimingResult:
    """Time ``fn`` (which generates ``images_per_call`` images) after ``warmup`` untimed calls.

    The device is synchronised before starting and after each call, so asynchronous CUDA work is
    counted. Store the result as a :class:`~fcr_eval.store.TimingRecord` with
    ``batch_size=images_per_call``.

    Example:
        >>> time_per_image(lambda: pipe(prompts[:8]), images_per_call=8, device="cuda").sec_per_image
    """
    if images_per_call < 1 or repeats < 1 or warmup < 0:
        raise ValueError("images_per_call and repeats must be >= 1, warmup >= 0")
    per_image = [s / images_per_call for s in time_calls(fn, repeats=repeats, device=device, warmup=warmup)]
    t = torch.tensor(per_image, dtype=torch.float64)
    return TimingResult(float(t.mean()), float(t.std()) if repeats > 1 else 0.0, images_per_call, repeats,
                        warmup, describe_device(device))


class _RssSampler(threading.Thread):
    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True)
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self._stop_event = threading.Event()
        self.peak = self._proc.memory_info().rss

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop_event.wait(self._interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)
        return self.peak


def measure_peak_memory(fn: Callable[[], Any], device: str | torch.device = "cpu",
                        interval: float = 0.005) -> tuple[int, str]:
    """Peak memory of one call of ``fn``: ``(bytes, kind)``.

    On CUDA, ``kind='cuda_peak'``: ``torch.cuda.max_memory_allocated`` after resetting the peak
    (includes the weights already on the device). Elsewhere ``kind='process_rss'``: the whole
    process's resident set size, sampled every ``interval`` seconds during the call.

    Example:
        >>> nbytes, kind = measure_peak_memory(lambda: pipe(prompts), device="cuda")
    """
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return int(torch.cuda.max_memory_allocated(device)), "cuda_peak"
    sampler = _RssSampler(interval)
    sampler.start()
    try:
        fn()
    finally:
        peak = sampler.stop()
    return int(peak), "process_rss"


def training_flops(forward_flops_per_sample: float, samples_seen: float, *, backward_multiplier: float = 3.0,
                   extra_forward_flops_per_sample: float = 0.0) -> float:
    """Training compute ≈ (forward + backward) FLOPs × samples seen.

    ``backward_multiplier=3`` counts the backward pass as twice the forward (Kaplan et al. 2020).
    FCR's second branch is an encoder-only pass: give its FLOPs as
    ``extra_forward_flops_per_sample`` (it is differentiated too, so it gets the same multiplier).

    Example:
        >>> training_flops(803e9, 128 * 10_000, extra_forward_flops_per_sample=0.33 * 803e9)
    """
    return float(backward_multiplier * (forward_flops_per_sample + extra_forward_flops_per_sample) * samples_seen)


def finetune_compute_fraction(finetune_compute: float, pretrain_compute: float) -> float:
    """Fine-tune compute as a fraction of pre-training compute (same unit: FLOPs or GPU-hours).

    Example:
        >>> finetune_compute_fraction(1500.0, SD_V1_PRETRAIN_A100_HOURS)
        0.01
    """
    if pretrain_compute <= 0:
        raise ValueError(f"pre-training compute must be positive, got {pretrain_compute}")
    if finetune_compute < 0:
        raise ValueError(f"fine-tuning compute must be >= 0, got {finetune_compute}")
    return float(finetune_compute / pretrain_compute)


def to_timing_record(timing: TimingResult | None, *, flops_per_image: float | None = None,
                     peak_memory: tuple[int, str] | None = None, forward_counts: Any = None,
                     batch_size: int | None = None, device=None):
    """Build the store's :class:`~fcr_eval.records.TimingRecord` from a :class:`TimingResult`, or,
    with ``timing=None``, a record of counts, FLOPs and memory only (``batch_size`` and ``device``
    then given; ``sec_per_image`` stays empty because an interleaved session times the sampler).

    Args:
        flops_per_image: from :func:`count_flops` of one sampling run ÷ its images.
        peak_memory: ``(bytes, kind)`` from :func:`measure_peak_memory`.
        forward_counts: forward counters of ONE sampling run — ``fcr_sample.get_cache_stats(pipe)``
            after ``reset_cache_stats`` and one run, or a dict with ``unet_calls``,
            ``encoder_forwards``, ``decoder_forwards`` (without a cache all three equal the steps).

    Example:
        >>> to_timing_record(t, flops_per_image=count_flops(run) / 8, peak_memory=measure_peak_memory(run),
        ...                  forward_counts=get_cache_stats(pipe))
    """
    from fcr_eval.records import TimingRecord

    counts = forward_counts.as_dict() if hasattr(forward_counts, "as_dict") else dict(forward_counts or {})
    nbytes, kind = peak_memory if peak_memory is not None else (None, None)
    if timing is None:
        return TimingRecord(
            batch_size=int(batch_size), sec_per_image=None, unet_calls=counts.get("unet_calls"),
            encoder_forwards=counts.get("encoder_forwards"), decoder_forwards=counts.get("decoder_forwards"),
            flops_per_image=flops_per_image, peak_memory_bytes=nbytes, memory_kind=kind,
            device=describe_device(device), n_images=int(batch_size), warmup=1)
    return TimingRecord(
        batch_size=timing.images_per_call, sec_per_image=timing.sec_per_image,
        unet_calls=counts.get("unet_calls"), encoder_forwards=counts.get("encoder_forwards"),
        decoder_forwards=counts.get("decoder_forwards"), flops_per_image=flops_per_image,
        peak_memory_bytes=nbytes, memory_kind=kind, device=timing.device, n_images=timing.n_images,
        warmup=timing.warmup,
    )
