"""Benchmark: parallel against sequential decoding of the encoder cache, by image batch size.

    OMP_NUM_THREADS=1 uv run python benchmarks/parallel_decoding.py --threads 1 --rounds 3

Parallel decoding runs the decoders of a key step's group as one batch. On an accelerator that
is what makes Faster Diffusion pay; on a CPU a large batch of images already fills the decoder,
and batching its steps on top made FD-10 slower than sequential decoding (design.md §5). The
default (``max_parallel_bytes="auto"``) sizes decoder batches by the size of the decoder's
activations, so this script compares, on the embedded default's UNet architecture (random
weights: speed does not depend on weight values), DDIM-20 with CFG, at batch 1, 8 and 64:

* no cache;
* FD-k with sequential decoding;
* FD-k with parallel decoding capped by steps alone (``max_parallel_bytes=None``, the old default);
* FD-k with the default parallel decoding (capped by steps and size).

Variants are interleaved round by round (each round starts at a different variant); the table
gives s/img as median with min–max over rounds, the per-round speed-up against no cache, the
decoder batches per run, and the largest |Δ| between the default's and sequential decoding's
final states (batching only reorders float sums).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from fcr_sample import (
    EncoderCacheConfig,
    apply_encoder_cache,
    denoise,
    get_cache_stats,
    remove_encoder_cache,
)

sys.path.insert(0, str(Path(__file__).parent))
from bench_cli import UserError, parser, report_file, run  # noqa: E402  (same folder)
from fcr_common.cli_errors import float_in, int_at_least  # noqa: E402
from sampler_speed import Report, describe_device  # noqa: E402  (one owner of the report header)


def embedded_unet() -> UNet2DConditionModel:
    from fcr_train.embedded import EMBEDDED_UNET_CONFIG

    torch.manual_seed(0)
    return UNet2DConditionModel(**EMBEDDED_UNET_CONFIG).eval()


def variants(stride: int) -> dict[str, EncoderCacheConfig | None]:
    return {
        "no cache": None,
        f"FD-{stride} sequential": EncoderCacheConfig(stride=stride, parallel_decoding=False),
        f"FD-{stride} parallel, ≤10 steps (old default)": EncoderCacheConfig(
            stride=stride, max_parallel_bytes=None
        ),
        f"FD-{stride} parallel, default (size-capped)": EncoderCacheConfig(stride=stride),
    }


def run_once(unet, config, x_T, cond, null, steps, guidance) -> tuple[float, torch.Tensor, int | None]:
    if config is not None:
        apply_encoder_cache(unet, config)
    try:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = denoise(unet, DDIMScheduler(), x_T, cond, null, steps=steps, guidance_scale=guidance)
        sec = time.perf_counter() - t0
        batches = get_cache_stats(unet).decoder_batches if config is not None else None
    finally:
        if config is not None:
            remove_encoder_cache(unet)
    return sec, out, batches


def main(argv=None) -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int_at_least(1), nargs="+", default=[1, 8, 64])
    p.add_argument("--rounds", type=int_at_least(1), default=3)
    p.add_argument("--steps", type=int_at_least(2), default=20)
    p.add_argument("--stride", type=int_at_least(2), default=10)
    p.add_argument("--guidance", type=float_in(0), default=3.0)
    p.add_argument("--tokens", type=int_at_least(1), default=16, help="text states per prompt")
    p.add_argument("--threads", type=int_at_least(1), default=None)
    p.add_argument("--out", default=None, help="also write the report to this file")
    args = p.parse_args(argv)
    if args.stride > args.steps:
        raise UserError(f"--stride {args.stride} is larger than --steps {args.steps}; pass at most {args.steps}")
    report_path = report_file(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    unet = embedded_unet()
    cfg = unet.config
    report = Report("parallel decoding", describe_device(torch.device("cpu")), argv)
    report.emit(f"embedded UNet architecture ({sum(q.numel() for q in unet.parameters()) / 1e6:.2f}M "
                f"parameters, {cfg.sample_size}² × {cfg.in_channels}), DDIM-{args.steps}, CFG "
                f"{args.guidance}, {args.rounds} timed rounds after one warm-up\n")
    vs = variants(args.stride)
    names = list(vs)
    g = torch.Generator().manual_seed(0)
    inputs = {}
    for b in args.batches:
        x_T = torch.randn(b, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
        text = torch.randn(2, b, args.tokens, cfg.cross_attention_dim, generator=g)
        inputs[b] = (x_T, text[0], text[1])
    times = {(b, n): [] for b in args.batches for n in names}
    outs, batches = {}, {}
    for r in range(-1, args.rounds):  # round -1: warm-up, untimed
        for b in args.batches:
            order = names[r % len(names):] + names[: r % len(names)] if r >= 0 else names
            for n in order:
                sec, out, nb = run_once(unet, vs[n], *inputs[b], args.steps, args.guidance)
                if r < 0:
                    outs[b, n], batches[b, n] = out, nb
                else:
                    times[b, n].append(sec / b)
            if r >= 0:
                print(f"round {r + 1}/{args.rounds}, batch {b} done", file=sys.stderr, flush=True)
    report.emit("| batch | variant | s/img (median, min–max) | speed-up vs no cache (median, min–max) "
                "| decoder batches / run | max abs Δ vs sequential |")
    report.emit("|---:|---|---:|---:|---:|---:|")
    for b in args.batches:
        ref = times[b, names[0]]
        for n in names:
            t = times[b, n]
            ratios = [a / c for a, c in zip(ref, t, strict=True)]
            delta = float((outs[b, n] - outs[b, names[1]]).abs().max()) if vs[n] is not None else float("nan")
            report.emit(
                f"| {b} | {n} | {statistics.median(t):.4f} ({min(t):.4f}–{max(t):.4f}) | "
                f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f}) | "
                f"{batches[b, n] if batches[b, n] is not None else '–'} | "
                f"{'–' if vs[n] is None else f'{delta:.2g}'} |"
            )
    report.finish(report_path)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
