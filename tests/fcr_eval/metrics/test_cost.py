"""Cost metrics: FLOPs against hand counts, timing and memory bookkeeping."""

from __future__ import annotations

import time

import pytest
import torch
from fcr_eval.metrics.cost import (
    count_flops,
    describe_device,
    finetune_compute_fraction,
    measure_peak_memory,
    time_per_image,
    training_flops,
)


def test_count_flops_matches_hand_count():
    lin = torch.nn.Linear(16, 8, bias=False)
    assert count_flops(lambda: lin(torch.ones(4, 16))) == 2 * 4 * 16 * 8
    conv = torch.nn.Conv2d(3, 5, 3, padding=1, bias=False)
    assert count_flops(lambda: conv(torch.ones(2, 3, 8, 8))) == 2 * 2 * 5 * 8 * 8 * 3 * 3 * 3


def test_time_per_image_divides_by_images_and_skips_warmup():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.2 if len(calls) == 1 else 0.02)  # a slow first (warm-up) call

    t = time_per_image(fn, images_per_call=4, warmup=1, repeats=3)
    assert len(calls) == 4
    assert 0.004 <= t.sec_per_image < 0.03  # ~0.02 s / 4 images, the 0.2 s warm-up excluded
    assert t.n_images == 12 and t.device.startswith("cpu")


def test_peak_memory_sees_a_large_allocation():
    base, kind = measure_peak_memory(lambda: None)
    peak, _ = measure_peak_memory(lambda: (torch.ones(40_000_000) + 1, time.sleep(0.05)))  # ~320 MB
    assert kind == "process_rss" and peak - base > 100e6


def test_compute_fraction():
    pre = training_flops(1e9, 1e6)
    ft = training_flops(1e9, 1e4, extra_forward_flops_per_sample=0.33e9)
    assert ft == pytest.approx(3 * 1.33e9 * 1e4)
    assert finetune_compute_fraction(ft, pre) == pytest.approx(0.0133)
    with pytest.raises(ValueError, match="positive"):
        finetune_compute_fraction(1.0, 0.0)


def test_describe_device_cpu():
    assert describe_device("cpu").startswith("cpu: ")


def test_to_timing_record_takes_cache_counters():
    from fcr_eval.metrics.cost import TimingResult, to_timing_record

    t = TimingResult(0.5, 0.01, 8, 3, 1, "cpu: 2 cores")
    rec = to_timing_record(t, flops_per_image=1e9, peak_memory=(123, "process_rss"),
                           forward_counts={"unet_calls": 20, "encoder_forwards": 4, "decoder_forwards": 20})
    assert (rec.batch_size, rec.n_images, rec.warmup, rec.encoder_forwards, rec.memory_kind) == (8, 24, 1, 4, "process_rss")
