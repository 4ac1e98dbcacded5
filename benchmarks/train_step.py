"""Step time of FCR, output-consistency and rollout fine-tuning versus plain fine-tuning (λ = 0), as a ratio.

One "step" = loss forward + backward + AdamW update, as in ``fcr_train.trainer``. The
variants are timed interleaved (A, B, C, A, B, C, ...) so that load from other processes on a
shared machine hits them alike; the median per variant is reported. The output-consistency
variants (``fcr_train.output_consistency``, FD and DeepCache stale paths) aim at ≤ 2× a plain
step: one extra encoder (DeepCache: full, no-grad) pass and one stale-path decoder pass at most.
The rollout variants (``fcr_train.rollout``) run k stale and k fresh steps per rollout row; their
cost grows with k and the rollout rows (``rollout_cost_factor`` is the plan's estimate, printed
beside the measured ratio).

    uv run python benchmarks/train_step.py                 # CPU, embedded UNet (28x28, batch 32)
    uv run python benchmarks/train_step.py --device cuda   # + SD-v1.5-architecture UNet at 512^2 (64^2 latents), random weights
    uv run python benchmarks/train_step.py --batch-size 4 --repeats 2 --tiny   # smoke run (tiny UNet)

Prints a table and a JSON record (config, hardware, code version) for docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from fcr_common.provenance import code_version
from fcr_train.embedded import EMBEDDED_UNET_CONFIG, SCHEDULER_CONFIG, TINY_UNET_CONFIG
from fcr_train.loss import FCRConfig, fcr_loss
from fcr_train.output_consistency import OutputConsistencyConfig, output_consistency_loss
from fcr_train.provenance import hardware
from fcr_train.rollout import RolloutConfig, rollout_cost_factor, rollout_loss, sampling_scheduler

# SD v1.5 UNet architecture (859.5M parameters); random weights are valid for timing.
SD15_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

VARIANTS = {
    "plain (lam=0)": FCRConfig(lam=0.0),
    "FCR lam=0.1, batched encoders": FCRConfig(lam=0.1, batched=True),
    "FCR lam=0.1, two encoder passes": FCRConfig(lam=0.1, batched=False),
    "FCR lam=0.1, stop-grad (no_grad pass)": FCRConfig(lam=0.1, stop_grad=True),
    # Δ in DDIM-20 steps over T = 1000; the stale pass runs under no_grad ("recomputed")
    "OC lam=0.1, FD, recomputed": OutputConsistencyConfig(lam=0.1, cache="fd"),
    "OC lam=0.1, FD, all": OutputConsistencyConfig(lam=0.1, cache="fd", trainable="all"),
    "OC lam=0.1, DeepCache b0, recomputed": OutputConsistencyConfig(lam=0.1, cache="deepcache"),
    # rollouts on the DDIM-20 grid, key steps toward high noise; k = 9 is FD-10's / DeepCache-N10's segment
    "rollout FD, k=4, 8 rows": RolloutConfig(lam=0.5, k=4, cache="fd", rollout_rows=8),
    "rollout FD, k=9, 4 rows": RolloutConfig(lam=0.5, k=9, cache="fd", rollout_rows=4),
    "rollout FD, k=9, 8 rows": RolloutConfig(lam=0.5, k=9, cache="fd", rollout_rows=8),
    "rollout DeepCache b0, k=4, 8 rows": RolloutConfig(lam=0.5, k=4, cache="deepcache", rollout_rows=8),
    "rollout DeepCache b0, k=9, 4 rows": RolloutConfig(lam=0.5, k=9, cache="deepcache", rollout_rows=4),
    "rollout DeepCache b0, k=9, 8 rows": RolloutConfig(lam=0.5, k=9, cache="deepcache", rollout_rows=8),
    "rollout DeepCache b0, k=9, 8 rows, CFG 2": RolloutConfig(lam=0.5, k=9, cache="deepcache", rollout_rows=8,
                                                               guidance_scale=2.0),
}
PLAIN = "plain (lam=0)"


def _loss(unet, scheduler, x0, text, cfg, g, samplers):
    if isinstance(cfg, RolloutConfig):  # the sampler is built once per run, as in the trainer
        sampler = samplers.setdefault(cfg.sampler_steps, sampling_scheduler(scheduler, cfg))
        null = torch.zeros_like(text[:1]) if cfg.guidance_scale != 1.0 else None
        return rollout_loss(unet, scheduler, x0, text, cfg, null_states=null, generator=g, sampler=sampler)
    if isinstance(cfg, OutputConsistencyConfig):
        return output_consistency_loss(unet, scheduler, x0, text, cfg, generator=g)
    return fcr_loss(unet, scheduler, x0, text, cfg, generator=g)


def time_variants(unet, scheduler, x0, text, repeats: int, warmup: int, device, autocast_dtype=None,
                  only: str | None = None) -> dict[str, list[float]]:
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-6)
    g = torch.Generator().manual_seed(0)
    chosen = {k: v for k, v in VARIANTS.items() if k == PLAIN or only is None or only.lower() in k.lower()}
    times: dict[str, list[float]] = {k: [] for k in chosen}
    samplers: dict = {}

    def step(cfg):
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = _loss(unet, scheduler, x0, text, cfg, g, samplers)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for r in range(warmup + repeats):
        for name, cfg in chosen.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(cfg)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def report(title: str, times: dict[str, list[float]], meta: dict) -> dict:
    base = statistics.median(times[PLAIN])
    print(f"\n{title}")
    print(f"{'variant':<42} {'median s/step':>14} {'ratio vs lam=0':>15} {'ratio min-max':>15} {'planned':>8}")
    rows = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        # per-round ratios against the plain step of the same round (interleaved): their spread
        # shows how much the machine's load moved the comparison
        per_round = [a / b for a, b in zip(ts, times[PLAIN], strict=True)]
        cfg = VARIANTS.get(name)
        planned = rollout_cost_factor(cfg, meta["batch_size"]) if isinstance(cfg, RolloutConfig) else None
        rows[name] = {"median_s": round(med, 4), "ratio": round(med / base, 3), "n": len(ts),
                      "ratio_min": round(min(per_round), 3), "ratio_max": round(max(per_round), 3),
                      "planned_ratio": None if planned is None else round(planned, 2)}
        print(f"{name:<42} {med:>14.4f} {med / base:>15.3f} {min(per_round):>7.2f}-{max(per_round):<7.2f}"
              f" {'' if planned is None else f'{planned:>8.2f}'}")
    oc = {k: v["ratio"] for k, v in rows.items() if k.startswith("OC ")}
    if oc:
        worst = max(oc, key=oc.get)
        print(f"output consistency vs plain step: worst median ratio {oc[worst]:.2f} ({worst}); target <= 2")
    return {"title": title, **meta, "results": rows}


def main(argv=None) -> int:
    from bench_cli import parser, report_file
    from fcr_common.cli_errors import int_at_least
    from fcr_eval.plan.validation import check_device

    p = parser(__doc__)
    p.add_argument("--device", default="cpu", help="cpu or cuda [%(default)s]")
    p.add_argument("--batch-size", type=int_at_least(1), default=32, help="embedded-UNet batch [%(default)s]")
    p.add_argument("--repeats", type=int_at_least(1), default=10, help="timed rounds per variant [%(default)s]")
    p.add_argument("--sd-batch-size", type=int_at_least(1), default=4,
                   help="SD-v1.5-architecture batch on GPU [%(default)s]")
    p.add_argument("--threads", type=int_at_least(1), default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="also write the records to this file")
    p.add_argument("--tiny", action="store_true", help="the tiny test UNet at 8x8 instead of the embedded one (smoke runs)")
    p.add_argument("--only", default=None, help="time only the variants whose name contains this (and the plain step), e.g. rollout")
    args = p.parse_args(argv)
    check_device(args.device)
    out = report_file(args.json, "--json")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    records = []
    meta = {"code": code_version(), "hardware": hardware(device), "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}

    torch.manual_seed(0)
    ucfg, size, text_shape, model = (TINY_UNET_CONFIG, 8, (4, 8), "tiny") if args.tiny else \
        (EMBEDDED_UNET_CONFIG, 28, (16, 384), "embedded")
    unet = UNet2DConditionModel(**ucfg).to(device).train()
    sched = DDPMScheduler(**SCHEDULER_CONFIG)
    x0 = torch.rand(args.batch_size, 1, size, size, device=device) * 2 - 1
    text = torch.randn(args.batch_size, *text_shape, device=device)
    times = time_variants(unet, sched, x0, text, args.repeats, warmup=2, device=device, only=args.only)
    records.append(report(f"{model} UNet ({size}x{size}, batch {args.batch_size}) on {device.type}", times,
                          {"model": model, "batch_size": args.batch_size, "device": str(device), **meta}))

    if device.type == "cuda":
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG).to(device).train()
        unet.enable_gradient_checkpointing() if os.environ.get("FCR_BENCH_GC") else None
        sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        b = args.sd_batch_size
        x0 = torch.randn(b, 4, 64, 64, device=device)
        text = torch.randn(b, 77, 768, device=device)
        times = time_variants(unet, sched, x0, text, max(5, args.repeats // 2), warmup=2, device=device,
                              autocast_dtype=torch.bfloat16, only=args.only)
        peak = torch.cuda.max_memory_allocated() / 2**30
        records.append(report(f"SD-v1.5-architecture UNet, 512^2 (64^2 latents), batch {b}, bf16 autocast, {meta['hardware'].get('gpu')}",
                              times, {"model": "sd15-architecture-random", "batch_size": b, "peak_mem_gib": round(peak, 2), **meta}))
    else:
        print("\nGPU part (SD-v1.5-architecture UNet at 512^2): run with --device cuda on a GPU machine.")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w") as f:
            json.dump(records, f, indent=1, default=str)
    print("\n" + json.dumps(records, indent=1, default=str))
    return 0


if __name__ == "__main__":
    from bench_cli import run

    sys.exit(run(main))
