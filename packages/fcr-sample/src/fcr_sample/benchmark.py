"""Sampling speed of the caches against the FLOP bound from the UNet's own FLOP split.

Encoder caching skips the encoder on non-key steps, so at stride k the *FLOP* speed-up is
bounded by ``1 / (dec + enc / k)`` where ``enc`` and ``dec`` are the encoder's and decoder's
shares of one UNet forward. Parallel decoding can beat that bound in wall-clock time because
batched decoders use the hardware better; it cannot beat it in FLOPs. This module measures both
on a bare UNet + DDIM loop with classifier-free guidance (the text encoder and VAE cost the same
with or without a cache, so they are left out).

:func:`benchmark_pipelines` compares whole pipeline calls instead — fcr's caches next to peer
packages (DeepCache, T-GATE) that only exist as pipeline wrappers — interleaved round by round on
one pipeline, with the same x_T for every variant.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .deep_cache import DeepCacheConfig, apply_deep_cache, remove_deep_cache
from .encoder_cache import EncoderCacheConfig, apply_encoder_cache, remove_encoder_cache
from .hooks import get_cache_stats, reset_cache_stats
from .measure import count_flops, synchronize, time_calls
from .sampling import denoise
from .unet_parts import prepare_conditioning, run_encoder

logger = logging.getLogger(__name__)

__all__ = [
    "FlopSplit",
    "flop_split",
    "BenchmarkRow",
    "benchmark_sampling",
    "format_table",
    "PipelineVariant",
    "PipelineRow",
    "benchmark_pipelines",
    "format_pipeline_table",
]


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
    return float(count_flops(fn))


@torch.no_grad()
def flop_split(unet, sample: torch.Tensor, text: torch.Tensor, timestep: int = 500) -> FlopSplit:
    """Count the FLOPs of one forward and of its encoder half with torch's flop counter."""
    total = _count(lambda: unet(sample, timestep, encoder_hidden_states=text))
    encoder = _count(
        lambda: run_encoder(unet, sample, prepare_conditioning(unet, sample, timestep, text))
    )
    return FlopSplit(total=total, encoder=encoder)


@torch.no_grad()
def deepcache_partial_flops(unet, sample, text, config: DeepCacheConfig, timestep: int = 500) -> float:
    """FLOPs of one DeepCache cached step (the shallow path that still runs) under ``config``."""
    hook = apply_deep_cache(unet, DeepCacheConfig(cache_interval=2, cache_branch_id=config.cache_branch_id))
    try:
        hook.tracker.start([timestep, timestep - 1])
        unet(sample, timestep, encoder_hidden_states=text)  # the full step stores the deep features
        return _count(lambda: unet(sample, timestep - 1, encoder_hidden_states=text))
    finally:
        remove_deep_cache(unet)


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


_sync = synchronize


@torch.no_grad()
def _sample(unet, scheduler, latents, text, steps, guidance) -> torch.Tensor:
    null, cond = text.chunk(2)  # ``text`` holds the unconditional states first, as CFG batches them
    return denoise(unet, scheduler, latents, cond, null, steps=steps, guidance_scale=guidance)


def _time(fn, device, repeats: int) -> float:
    # one warm-up call (allocator, cuDNN autotune, lazy init), then the median of the timed ones
    return statistics.median(time_calls(fn, repeats=repeats, device=device, warmup=1))


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
        partial = deepcache_partial_flops(unet, torch.cat([latents, latents]), text, cfg)
        n_full = len(cfg.key_steps_for(steps))
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


# -- peers side by side: whole pipeline calls, interleaved rounds ---------------------------------


def _no_change(pipe) -> None:
    return None


@dataclass(frozen=True)
class PipelineVariant:
    """One way of sampling with a pipeline, for :func:`benchmark_pipelines`.

    Attributes:
        label: the row's name.
        enable / disable: attach and detach the method (called around every timed call, so
            variants can be interleaved on one pipeline; ``disable`` must restore it exactly).
        call: ``call(pipe, **kwargs)`` for methods with their own entry point (T-GATE's
            ``pipe.tgate``); default ``pipe(**kwargs)``.
    """

    label: str
    enable: Callable[[Any], None] = _no_change
    disable: Callable[[Any], None] = _no_change
    call: Callable[..., Any] | None = None


@dataclass
class PipelineRow:
    """Timings of one variant over the timed rounds, and its images from the warm-up round.

    ``speedups[r]`` is the reference variant's time in round ``r`` over this variant's: a ratio
    within one round, so slow phases of a shared machine hit both sides of it.
    """

    label: str
    seconds_per_image: list[float]
    speedups: list[float]
    images: torch.Tensor
    peak_memory_bytes: int | None = None

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds_per_image)

    @property
    def median_speedup(self) -> float:
        return statistics.median(self.speedups)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def benchmark_pipelines(
    pipe,
    variants: list[PipelineVariant],
    call_kwargs: dict[str, Any],
    *,
    rounds: int = 3,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[PipelineRow]:
    """Time whole ``pipe(...)`` calls of several variants, interleaved round by round.

    Every call gets a fresh generator seeded with ``seed`` (the same x_T for every variant) and
    ``output_type="pt"``. One untimed warm-up round provides each variant's images; then each of
    ``rounds`` timed rounds calls every variant once, starting at a different variant each round
    so that no variant always runs first. The first variant is the reference of the speed-ups.

    Args:
        pipe: a diffusers pipeline.
        variants: what to compare; ``variants[0]`` is the reference (usually no cache).
        call_kwargs: the pipeline call's arguments (prompt or ``prompt_embeds``, steps, guidance);
            the batch is read from the images the calls return.
        rounds: timed rounds (>= 1).
        seed: seed of every call's generator.
        progress: called with a short message before each call.

    Example:
        >>> rows = benchmark_pipelines(pipe, [PipelineVariant("no cache"), PipelineVariant(
        ...     "FD-10", lambda p: apply_encoder_cache(p, EncoderCacheConfig(stride=10)),
        ...     remove_encoder_cache)], {"prompt": "a cat", "num_inference_steps": 50})
    """
    if not variants:
        raise ValueError("benchmark_pipelines needs at least one variant")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    labels = [v.label for v in variants]
    if len(set(labels)) != len(labels):
        raise ValueError(f"variant labels must be distinct, got {labels}")
    device = pipe.unet.device
    say = progress or (lambda _msg: None)

    def call(v: PipelineVariant) -> tuple[float, torch.Tensor, int | None]:
        v.enable(pipe)
        try:
            gen = torch.Generator(device="cpu").manual_seed(seed)
            kwargs = {**call_kwargs, "generator": gen, "output_type": "pt"}
            _sync(device)
            _peak_reset(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = v.call(pipe, **kwargs) if v.call is not None else pipe(**kwargs)
            _sync(device)
            sec = time.perf_counter() - t0
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        finally:
            v.disable(pipe)
        return sec, out.images.detach().float().cpu(), peak

    images: dict[str, torch.Tensor] = {}
    for v in variants:
        say(f"warm-up: {v.label}")
        images[v.label] = call(v)[1]
    times: dict[str, list[float]] = {v.label: [] for v in variants}
    peaks: dict[str, int | None] = {v.label: None for v in variants}
    for r in range(rounds):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for v in order:
            say(f"round {r + 1}/{rounds}: {v.label}")
            sec, _, peak = call(v)
            times[v.label].append(sec / len(images[v.label]))
            if peak is not None:
                peaks[v.label] = max(peak, peaks[v.label] or 0)
    ref = times[variants[0].label]
    return [
        PipelineRow(
            v.label,
            times[v.label],
            [a / b for a, b in zip(ref, times[v.label], strict=True)],
            images[v.label],
            peaks[v.label],
        )
        for v in variants
    ]


def format_pipeline_table(rows: list[PipelineRow], *, same_as: dict[str, str] | None = None) -> str:
    """A Markdown table: s/img (median, min–max over rounds), speed-up vs the first row (median,
    min–max of the per-round ratios), max |Δ| of the images against the first row, and peak
    memory where measured.

    ``same_as`` maps a row to another row whose images it should reproduce (ours → the package's);
    the max |Δ| between those two is added as a column.
    """
    same_as = same_as or {}
    ref = rows[0]
    by_label = {r.label: r for r in rows}
    mem = any(r.peak_memory_bytes is not None for r in rows)
    head = "| variant | s/img (median, min–max) | speed-up vs " + ref.label + " (median, min–max) | max abs Δ image vs " + ref.label
    head += " | max abs Δ image vs twin |" if same_as else " |"
    head += " peak GiB |" if mem else ""
    lines = [head, "|---|---:|---:|---:|" + ("---|" if same_as else "") + ("---:|" if mem else "")]
    for r in rows:
        s = r.seconds_per_image
        line = (
            f"| {r.label} | {r.median_seconds:.3f} ({min(s):.3f}–{max(s):.3f}) | "
            f"{r.median_speedup:.2f}× ({min(r.speedups):.2f}–{max(r.speedups):.2f}) | "
            f"{float((r.images - ref.images).abs().max()):.3g} |"
        )
        if same_as:
            twin = by_label.get(same_as.get(r.label, ""))
            line += (
                f" {float((r.images - twin.images).abs().max()):.2g} vs {twin.label} |"
                if twin is not None
                else " – |"
            )
        if mem:
            gib = r.peak_memory_bytes / 2**30 if r.peak_memory_bytes is not None else float("nan")
            line += f" {gib:.2f} |"
        lines.append(line)
    return "\n".join(lines)
