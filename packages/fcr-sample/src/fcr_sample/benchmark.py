"""Sampling speed of the caches against the FLOP bound from the UNet's own FLOP split.

Encoder caching skips the encoder on non-key steps, so at stride k the *FLOP* speed-up is
bounded by ``1 / (dec + enc / k)`` where ``enc`` and ``dec`` are the encoder's and decoder's
shares of one UNet forward. Parallel decoding can beat that bound in wall-clock time because
batched decoders use the hardware better; it cannot beat it in FLOPs. This module measures both
on a bare UNet + DDIM loop with classifier-free guidance (the text encoder and VAE cost the same
with or without a cache, so they are left out).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from .deep_cache import DeepCacheConfig, apply_deep_cache, remove_deep_cache
from .encoder_cache import EncoderCacheConfig, apply_encoder_cache, remove_encoder_cache
from .hooks import get_cache_stats, reset_cache_stats
from .sampling import denoise
from .unet_parts import (
    prepare_conditioning,
    residuals_consumed,
    run_down_blocks,
    run_encoder,
    run_up_blocks,
)

logger = logging.getLogger(__name__)

__all__ = ["FlopSplit", "flop_split", "BenchmarkRow", "benchmark_sampling", "format_table"]


@dataclass(frozen=True)
class FlopSplit:
    total: float  # FLOPs of one full UNet forward at the benchmark's batch
    encoder: float  # conv_in + down blocks + mid block (+ time embedding)

    @property
    def encoder_share(self) -> float:
        return self.encoder / self.total

    def fd_bound(self, stride: int) -> float:
        """FLOP speed-up bound of FD-k: ``1 / (dec + enc / k)``."""
        e = self.encoder_share
        return 1.0 / ((1.0 - e) + e / stride)


def _count(fn: Callable[[], object]) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


@torch.no_grad()
def flop_split(unet, sample: torch.Tensor, text: torch.Tensor, timestep: int = 500) -> FlopSplit:
    """Count the FLOPs of one forward and of its encoder half with torch's flop counter."""
    total = _count(lambda: unet(sample, timestep, encoder_hidden_states=text))
    encoder = _count(
        lambda: run_encoder(unet, sample, prepare_conditioning(unet, sample, timestep, text))
    )
    return FlopSplit(total=total, encoder=encoder)


@torch.no_grad()
def deepcache_partial_flops(unet, sample, text, branch: int, timestep: int = 500) -> float:
    """FLOPs of DeepCache's shallow path (its cached steps) at ``branch``."""
    cut = len(unet.up_blocks) - 1 - branch
    n_res = residuals_consumed(unet, cut)
    shape = tuple(sample.shape[-2:])
    cond = prepare_conditioning(unet, sample, timestep, text)
    enc = run_encoder(unet, sample, cond)
    deep = run_up_blocks(unet, enc.mid, enc.down_block_res_samples, cond, shape, stop_block=cut)

    def shallow():
        c = prepare_conditioning(unet, sample, timestep, text)
        _, res = run_down_blocks(unet, sample, c, num_blocks=branch + 1)
        run_up_blocks(unet, deep, res[:n_res], c, shape, start_block=cut)

    return _count(shallow)


@dataclass
class BenchmarkRow:
    method: str
    sec_per_image: float
    speedup: float = 1.0
    flop_bound: float | None = None
    unet_calls: int = 0
    encoder_forwards: int = 0
    decoder_batches: int = 0
    max_abs_diff: float = 0.0  # final latents vs no cache (a sanity check, not a quality metric)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _sample(unet, scheduler, latents, text, steps, guidance) -> torch.Tensor:
    null, cond = text.chunk(2)  # ``text`` holds the unconditional states first, as CFG batches them
    return denoise(unet, scheduler, latents, cond, null, steps=steps, guidance_scale=guidance)


def _time(fn, device, repeats: int) -> float:
    fn()  # warm-up (allocator, cuDNN autotune, lazy init)
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def benchmark_sampling(
    unet,
    scheduler,
    *,
    batch: int = 1,
    steps: int = 50,
    guidance: float = 7.5,
    strides: Iterable[int] = (5, 10, 15, 20),
    parallel_modes: Iterable[bool] = (False, True),
    max_parallel_steps: int | None = 10,
    deepcache: Iterable[tuple[int, int]] = ((5, 0),),
    text_len: int = 77,
    repeats: int = 3,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[BenchmarkRow], FlopSplit]:
    """Seconds per image of no cache, FD-k (sequential and parallel) and DeepCache on one UNet.

    Every variant samples the same seeded latents and text states, so speed-ups are ratios
    measured within one run of this function. Returns the rows and the UNet's FLOP split.
    """
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    g = torch.Generator(device="cpu").manual_seed(seed)
    size = unet.config.sample_size
    latents = torch.randn(batch, unet.config.in_channels, size, size, generator=g).to(device, dtype)
    text = torch.randn(2 * batch, text_len, unet.config.cross_attention_dim, generator=g).to(
        device, dtype
    )

    split = flop_split(unet, torch.cat([latents, latents]), text)
    rows: list[BenchmarkRow] = []
    say = progress or (lambda _msg: None)

    say("no cache")
    ref = _sample(unet, scheduler, latents, text, steps, guidance)
    base = (
        _time(
            lambda: _sample(unet, scheduler, latents, text, steps, guidance), device, repeats
        )
        / batch
    )
    rows.append(BenchmarkRow("no cache", base, 1.0, 1.0, steps, steps, steps))

    def run_variant(label, apply, remove, bound):
        say(label)
        apply(unet)
        try:
            out = _sample(unet, scheduler, latents, text, steps, guidance)
            sec = (
                _time(
                    lambda: _sample(unet, scheduler, latents, text, steps, guidance),
                    device,
                    repeats,
                )
                / batch
            )
            reset_cache_stats(unet)  # counters of exactly one run
            _sample(unet, scheduler, latents, text, steps, guidance)
            stats = get_cache_stats(unet)
        finally:
            remove(unet)
        rows.append(
            BenchmarkRow(
                label,
                sec,
                base / sec,
                bound,
                stats.unet_calls,
                stats.encoder_forwards,
                stats.decoder_batches,
                float((out.float() - ref.float()).abs().max()),
            )
        )

    for k in strides:
        for parallel in parallel_modes:
            cfg = EncoderCacheConfig(
                stride=k, parallel_decoding=parallel, max_parallel_steps=max_parallel_steps
            )
            run_variant(
                cfg.label,
                lambda u, c=cfg: apply_encoder_cache(u, c),
                remove_encoder_cache,
                split.fd_bound(k),
            )
    for interval, branch in deepcache:
        cfg = DeepCacheConfig(cache_interval=interval, cache_branch_id=branch)
        partial = deepcache_partial_flops(unet, torch.cat([latents, latents]), text, branch)
        n_full = len(range(0, steps, interval))
        bound = steps * split.total / (n_full * split.total + (steps - n_full) * partial)
        run_variant(cfg.label, lambda u, c=cfg: apply_deep_cache(u, c), remove_deep_cache, bound)
    return rows, split


def format_table(rows: list[BenchmarkRow]) -> str:
    """A Markdown table of benchmark rows."""
    lines = [
        "| method | s/img | speed-up | FLOP bound | UNet calls | encoder fwd | decoder batches | max abs Δ latents |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        bound = f"{r.flop_bound:.2f}×" if r.flop_bound is not None else "–"
        lines.append(
            f"| {r.method} | {r.sec_per_image:.4f} | {r.speedup:.2f}× | {bound} | {r.unet_calls} | "
            f"{r.encoder_forwards} | {r.decoder_batches} | {r.max_abs_diff:.3g} |"
        )
    return "\n".join(lines)
