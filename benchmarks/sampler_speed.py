"""Benchmark: seconds per image of FD-k (sequential / parallel decoding) and DeepCache vs no cache.

    uv run python benchmarks/sampler_speed.py                       # CPU, small SD-shaped UNet
    uv run python benchmarks/sampler_speed.py --unet sd15 --device cuda --dtype fp16 --batch 1 8

Prints a Markdown table per batch size with the FLOP bound 1/(dec + enc/k) computed from the
UNet's own FLOP split. Speed-ups are ratios measured within one run on one machine.
"""

from __future__ import annotations

import argparse
import platform

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from fcr_sample.benchmark import benchmark_sampling, format_table
from fcr_sample.testing import sd15_unet_config, small_unet_config, tiny_unet_config
from tqdm import tqdm

CONFIGS = {"tiny": tiny_unet_config, "small": small_unet_config, "sd15": sd15_unet_config}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--unet", choices=sorted(CONFIGS), default="small")
    ap.add_argument(
        "--resolution", type=int, default=None, help="latent size (default: the config's)"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--strides", type=int, nargs="+", default=[5, 10, 15, 20])
    ap.add_argument("--max-parallel-steps", type=int, default=10)
    ap.add_argument(
        "--deepcache",
        type=int,
        nargs=2,
        action="append",
        metavar=("N", "BRANCH"),
        help="DeepCache interval and branch (default: 5 0)",
    )
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    device = torch.device(args.device)
    overrides = {"sample_size": args.resolution} if args.resolution else {}
    torch.manual_seed(0)
    unet = (
        UNet2DConditionModel(**CONFIGS[args.unet](**overrides))
        .to(device, DTYPES[args.dtype])
        .eval()
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    n_params = sum(p.numel() for p in unet.parameters()) / 1e6
    print(
        f"# UNet '{args.unet}' ({n_params:.1f}M params, latent {unet.config.sample_size}²), {args.dtype}, "
        f"DDIM-{args.steps}, CFG {args.guidance}, device {describe_device(device)}, torch {torch.__version__}"
    )
    for batch in args.batch:
        n_variants = 1 + 2 * len(args.strides) + len(args.deepcache or [(5, 0)])
        with tqdm(total=n_variants, desc=f"batch {batch}", leave=False) as bar:
            rows, split = benchmark_sampling(
                unet,
                scheduler,
                batch=batch,
                steps=args.steps,
                guidance=args.guidance,
                strides=args.strides,
                max_parallel_steps=args.max_parallel_steps,
                deepcache=args.deepcache or [(5, 0)],
                repeats=args.repeats,
                progress=lambda m: (bar.set_postfix_str(m), bar.update()),
            )
        print(
            f"\n## batch {batch}: one forward = {split.total / 1e9 / (2 * batch):.2f} GFLOPs/image, "
            f"encoder share {split.encoder_share:.1%}"
        )
        print(format_table(rows))


if __name__ == "__main__":
    main()
