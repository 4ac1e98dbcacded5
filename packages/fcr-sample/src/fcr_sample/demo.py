"""``fcr-sample-demo``: a quick look at encoder caching on a small random UNet (CPU, ~1 minute).

Samples the same seeded latents with no cache, FD-5/FD-10 (sequential and parallel decoding) and
the DeepCache comparator, and prints seconds per image, speed-up, the FLOP bound and the
forward counters. Weights are random: this shows speed and bookkeeping, not image quality.
"""

from __future__ import annotations

import argparse
import logging

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from tqdm import tqdm

from .benchmark import benchmark_sampling, format_table
from .testing import small_unet_config

#: The FD strides the demo compares; every run needs at least as many steps as the largest.
STRIDES = (5, 10)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="fcr-sample-demo", description=__doc__)
    ap.add_argument("--steps", type=int, default=50, help=f"DDIM steps, >= {max(STRIDES)} [%(default)s]")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats per variant, >= 1 [%(default)s]")
    args = ap.parse_args(argv)
    # the configs would refuse these at the first UNet call; say it before the models are built
    if args.steps < max(STRIDES):
        ap.error(f"--steps {args.steps} is smaller than the largest FD stride shown ({max(STRIDES)}); "
                 f"pass --steps {max(STRIDES)} or more")
    if args.repeats < 1:
        ap.error(f"--repeats {args.repeats} must be at least 1")
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**small_unet_config(sample_size=16)).eval()
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    with tqdm(total=6, desc="sampling variants") as bar:
        rows, split = benchmark_sampling(
            unet,
            scheduler,
            steps=args.steps,
            strides=STRIDES,
            repeats=args.repeats,
            progress=lambda m: (bar.set_postfix_str(m), bar.update()),
        )
    print(
        f"\nsmall SD-shaped UNet, random weights, DDIM-{args.steps} with CFG, batch 1, CPU "
        f"({torch.get_num_threads()} threads); encoder = {split.encoder_share:.1%} of a forward's FLOPs\n"
    )
    print(format_table(rows))


if __name__ == "__main__":
    main()
