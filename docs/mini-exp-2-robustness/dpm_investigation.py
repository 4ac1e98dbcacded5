"""Why did fcr-0.10-dpmsolver-fd-10 score 0.235 class agreement in mini-exp-2? (see results.md)

Samples the same prompts from the same initial noise with the runner's own sampling loop
(``fcr_eval.run.runner.sample_batch``) and scheduler factory (``fcr_eval.run.contexts.
make_sampling_scheduler``) and varies one thing at a time: weights (base / FCR fine-tune),
scheduler (DDIM-20 / DPM-Solver++-20 as the runner builds it / DPM-Solver++-20 with x̂0 clipped
to [-1, 1]), cache (none / FD-1 / FD-5 / FD-10, parallel and sequential decoding).

    OMP_NUM_THREADS=1 uv run --no-sync python docs/mini-exp-2-robustness/dpm_investigation.py \
        --finetune results/runs/mini-exp-2/finetune/ft-lam0.10-d10-all-s0-2cf3b250/checkpoints/step_0000150/unet

About 25 s per configuration of 100 images on one shared CPU core (22 configurations per seed;
``--seeds 0,1`` took 17 min).
Add ``--grid docs/mini-exp-2-robustness/dpm_investigation.png`` for the figure.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel
from fcr_eval.metrics.class_agreement import class_agreement, load_fashion_mnist_classifier
from fcr_eval.run.contexts import make_sampling_scheduler
from fcr_eval.run.runner import sample_batch
from fcr_sample import (
    EncoderCacheConfig,
    apply_encoder_cache,
    get_cache_stats,
    remove_encoder_cache,
)
from fcr_train.embedded import load_embedded_base, make_scheduler

CONFIGS = [
    ("ddim", None), ("ddim", EncoderCacheConfig(stride=5)), ("ddim", EncoderCacheConfig(stride=10)),
    ("dpm-as-run", None), ("dpm-as-run", EncoderCacheConfig(stride=10)),
    ("dpm-x0clip", None), ("dpm-x0clip", EncoderCacheConfig(stride=1)),
    ("dpm-x0clip", EncoderCacheConfig(stride=5)), ("dpm-x0clip", EncoderCacheConfig(stride=5, parallel_decoding=False)),
    ("dpm-x0clip", EncoderCacheConfig(stride=10)), ("dpm-x0clip", EncoderCacheConfig(stride=10, parallel_decoding=False)),
]


def scheduler(kind: str):
    config = make_scheduler("ddim").config  # the embedded context's scheduler_config()
    if kind == "ddim":
        return make_sampling_scheduler("ddim", config)
    if kind == "dpm-as-run":
        return make_sampling_scheduler("dpm-solver++", config)
    # DDIM's clip_sample=True in DPM-Solver++ terms: dynamic thresholding with s clamped to [1, 1]
    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2,
                                                   thresholding=True, sample_max_value=1.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--finetune", required=True, help="the FCR fine-tune's unet/ folder")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--seeds", default="0")
    p.add_argument("--grid", default=None, help="write the comparison figure (FCR weights, first seed) here")
    args = p.parse_args()
    torch.set_num_threads(1)
    base, clf = load_embedded_base(), load_fashion_mnist_classifier()
    tpl = base.templates.index("a photo of a {}")
    labels = torch.arange(args.n) % len(base.classes)
    cond, null = base.class_states(labels, template=tpl), base.null_states.expand(args.n, -1, -1)
    unets = {"base": base.unet.eval(), "fcr-0.10": UNet2DConditionModel.from_pretrained(args.finetune).eval()}
    saved = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        x_T = torch.randn((args.n, 1, 28, 28), generator=torch.Generator().manual_seed(seed))  # as the runner
        for wname, unet in unets.items():
            ref: dict[tuple[str, str], torch.Tensor] = {}
            for kind, cfg in CONFIGS:
                if cfg:
                    apply_encoder_cache(unet, cfg)
                try:
                    with torch.no_grad():
                        imgs = sample_batch(unet, scheduler(kind), x_T, cond, null, 20, 2.0)
                    enc = get_cache_stats(unet).encoder_forwards if cfg else 20
                finally:
                    if cfg:
                        remove_encoder_cache(unet)
                acc, _ = class_agreement(imgs, labels, clf)
                label = cfg.label if cfg else "no-cache"
                ref[(kind, label)] = imgs
                note = ""
                if label.endswith("-seq"):
                    note = f"max|parallel - sequential| = {float((imgs - ref[(kind, label[:-4])]).abs().max()):.1e}"
                elif cfg:
                    note = f"mean|x - no-cache| = {float((imgs - ref[(kind, 'no-cache')]).abs().mean()):.3f}"
                print(f"seed {seed}  {wname:8s} {kind:10s} {label:10s} agreement {acc:.3f}  encoder passes {enc:2d}  {note}",
                      flush=True)
                saved[f"{seed}|{wname}|{kind}|{label}"] = imgs[:40]
    if args.grid:
        first = args.seeds.split(",")[0]
        save_figure(saved, first, Path(args.grid))


ROWS = [("DDIM-20, no cache", "ddim|no-cache"), ("DDIM-20, FD-10", "ddim|FD-10"),
        ("DPM++ as run, no cache", "dpm-as-run|no-cache"), ("DPM++ as run, FD-10", "dpm-as-run|FD-10"),
        ("DPM++ x0-clip, no cache", "dpm-x0clip|no-cache"), ("DPM++ x0-clip, FD-10", "dpm-x0clip|FD-10")]


def save_figure(saved: dict, seed: str, path: Path, per_row: int = 20, scale: int = 2) -> None:
    """One row per configuration, the same initial noise in each column (classes cycle 0..9)."""
    from PIL import Image, ImageDraw

    h, pad, label_w, top = 28 * scale, 2, 150, 14
    fig = Image.new("L", (label_w + per_row * (h + pad), top + len(ROWS) * (h + pad)), 255)
    draw = ImageDraw.Draw(fig)
    draw.text((4, 1), f"FCR(0.10) fine-tune, seed {seed}, same x_T per column; columns cycle through the 10 classes",
              fill=0)
    for r, (name, key) in enumerate(ROWS):
        y = top + r * (h + pad)
        draw.text((4, y + h // 2 - 6), name, fill=0)
        imgs = saved[f"{seed}|fcr-0.10|{key}"][:per_row, 0].clamp(0, 1)
        for j, img in enumerate(imgs):
            tile = Image.fromarray((img.numpy() * 255).round().astype("uint8"))
            fig.paste(tile.resize((h, h), Image.NEAREST), (label_w + j * (h + pad), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.save(path, optimize=True)


if __name__ == "__main__":
    main()
