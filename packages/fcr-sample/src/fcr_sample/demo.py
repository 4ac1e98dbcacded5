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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="fcr-sample-demo", description=__doc__)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
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
            strides=(5, 10),
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
