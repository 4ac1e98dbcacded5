"""Quality at speed: FD-k and DeepCache-N, uniform, calibrated and adaptive, on the embedded default's real weights.

    OMP_NUM_THREADS=1 uv run python benchmarks/quality_at_speed.py --threads 1 --out runs/bench/quality.md

Every variant samples the same class labels from the same x_T (one seed per batch) with the
shipped base UNet (``fcr_train.embedded``), DDIM-20 and CFG 2.0 as mini-exp-1 does. Per variant:
class agreement (the shipped Fashion-MNIST classifier, ``fcr_eval.metrics.class_agreement``) with a 95 %
t-interval over samples, KID on EfficientNet-Lite0 features at 112² against real Fashion-MNIST
test images (``fcr_eval.metrics.kid``; not Inception), the paired pixel MSE to the uncached sample of
the same x_T (``fcr_eval.metrics.paired``), and s/img on this machine. The batches are interleaved over
variants, so machine load hits all of them alike. The Pareto column marks the variants on the
Pareto front of (GFLOPs/img, class agreement).

**Calibrated and adaptive caches** (issue 26). ``--calibrated CACHE BUDGET OBJECTIVE`` adds FD's /
DeepCache's schedule of BUDGET full steps chosen by ``fcr_sample.calibrate_schedule`` (OBJECTIVE
``feature``: the cached features' relative change) or ``fcr_sample.calibrate_schedule_from_error``
(``error``: the attribution's propagated error), calibrated on a separate set (``--calibration-samples``
labels from seed 7, never the evaluation's x_T); ``--adaptive CACHE THRESHOLD`` adds the adaptive
cache. Such a row is **beyond the uniform front** (●) when its class agreement is higher than that of
every uniform variant (no cache, FD-k, DeepCache-N) at least as fast, each by a paired 95 % t-interval
over the samples (same x_T and labels) that excludes 0; the column shows the difference to the best
of those uniform variants. "At least as fast" and the Pareto column use the FLOPs per image of the
forwards each variant really ran (its counters times the encoder / decoder / DeepCache shallow-path
FLOPs of this UNet): deterministic, where wall-clock on a loaded shared machine is not (a first run
had two variants of the same full-step count 2× apart in s/img). The s/img column is still measured.

Verdicts, stated before the run (commit of this docstring precedes the table in docs/benchmarks.md):

* The goal is a row beyond the uniform DeepCache front. The most likely candidate is DeepCache on a
  schedule calibrated by the propagated error: on the mechanism study's evidence (~90 % of FD-10's
  final error enters in the first served segment) it should spend its full steps early. With
  200–300 samples a paired interval is about ±0.05–0.06 wide; a gain smaller than that is reported
  INCONCLUSIVE, not as a win.
* The adaptive cache's conv_in signal measures how far x_t moved; a pilot on 100 samples (seed 1000)
  showed it refreshes *late*-heavy (threshold 0.2 → full steps 0, 4, 7, 10, 13, 15, 17, 19), the
  opposite of where the error enters. Expected: adaptive rows at or below the uniform front, not beyond.
* Feature-change calibration comes out close to uniform on this base (a pilot on 20 calibration
  samples: DeepCache budget 8 → 0, 1, 3, 6, 10, 13, 16, 19); expected: on the front within noise,
  not beyond.

``--weights LABEL=FOLDER`` (repeatable) adds fine-tuned weights (a ``save_pretrained`` folder, e.g.
a fine-tune's ``final_unet`` from ``fcr_eval_weights.json``): every variant then runs on every
weights, interleaved in the same batches; the pixel MSE is to the same weights' uncached sample.
Every weights has the same architecture, so a variant's cost is the same on all of them: the speed
axis is the variant's s/img pooled over the weights (the per-weights figures differ by machine noise
only), and a fine-tuned row is "beyond the base front" when its class agreement is higher than that
of every base variant at least as fast, each by a paired 95 % t-interval over the samples (same x_T
and labels) that excludes 0; the table shows the difference to the best of those base variants:

    uv run python benchmarks/quality_at_speed.py --threads 2 --samples 300 --fd 5 10 20 \\
        --deepcache 5 0 --deepcache 10 0 \\
        --weights control=results/runs/mini-exp-1-oc/finetune/ft-lam0.00-.../checkpoints/.../unet ...
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_cli import UserError, parser, report_file, run, weights_architecture  # noqa: E402  (same folder)
from fcr_common.cli_errors import float_in, int_at_least  # noqa: E402

#: Fashion-MNIST's test split: the KID reference comes from it.
TEST_IMAGES = 10_000


#: The calibration set: labels 0..9 repeated, x_T from this seed (the evaluation uses 1000 + batch).
CALIBRATION_SEED = 7
OBJECTIVES = ("feature", "error")


def variants(fd_strides, deepcache, calibrated=(), adaptive=()) -> dict[str, tuple | None]:
    """label → (apply, remove, uniform); ``None`` for no cache. ``calibrated``: ``(label, config)``
    pairs already calibrated; ``adaptive``: ``(cache, threshold)``."""
    from fcr_sample import (
        AdaptiveCacheConfig,
        DeepCacheConfig,
        EncoderCacheConfig,
        apply_adaptive_cache,
        apply_deep_cache,
        apply_encoder_cache,
        remove_adaptive_cache,
        remove_deep_cache,
        remove_encoder_cache,
    )

    out: dict[str, tuple | None] = {"no cache": None}
    for k in fd_strides:
        # Sequential decoding: same images as parallel, and the faster of the two at batch 100 on
        # one CPU thread (design.md §5); the label says so.
        cfg = EncoderCacheConfig(stride=k, parallel_decoding=False)
        out[cfg.label] = (lambda u, c=cfg: apply_encoder_cache(u, c), remove_encoder_cache, True)
    for n, b in deepcache:
        cfg = DeepCacheConfig(cache_interval=n, cache_branch_id=b)
        out[cfg.label] = (lambda u, c=cfg: apply_deep_cache(u, c), remove_deep_cache, True)
    for label, cfg in calibrated:
        if isinstance(cfg, DeepCacheConfig):
            out[label] = (lambda u, c=cfg: apply_deep_cache(u, c), remove_deep_cache, False)
        else:
            out[label] = (lambda u, c=cfg: apply_encoder_cache(u, c), remove_encoder_cache, False)
    for cache, threshold in adaptive:
        cfg = AdaptiveCacheConfig(threshold=threshold, cache=cache)
        out[cfg.label] = (lambda u, c=cfg: apply_adaptive_cache(u, c), remove_adaptive_cache, False)
    return out


def calibrate(base, calibrated, *, samples: int, steps: int, guidance: float, emit) -> list[tuple[str, object]]:
    """``(label, config)`` per ``(cache, budget, objective)``, calibrated on the calibration set."""
    import torch
    from fcr_sample import calibrate_schedule, calibrate_schedule_from_error
    from fcr_train.embedded import make_scheduler, sample_images

    labels = torch.arange(samples) % len(base.classes)
    found = {}
    for cache, budget, objective in calibrated:
        if objective == "feature":
            found[cache, budget, objective] = calibrate_schedule(
                base.unet, cache, budget, num_steps=steps, scheduler=make_scheduler("ddim"),
                run=lambda: sample_images(base, labels, steps=steps, guidance_scale=guidance,
                                          generator=torch.Generator().manual_seed(CALIBRATION_SEED)))
    cfg = base.unet.config
    for cache in sorted({c for c, _, o in calibrated if o == "error"}):  # one measurement, every budget
        budgets = [b for c, b, o in calibrated if c == cache and o == "error"]
        x_T = torch.randn((samples, cfg.in_channels, cfg.sample_size, cfg.sample_size),
                          generator=torch.Generator().manual_seed(CALIBRATION_SEED))
        scheds = calibrate_schedule_from_error(
            base.unet, make_scheduler("ddim"), x_T, base.class_states(labels),
            base.null_states.expand(samples, -1, -1), cache=cache, budget=budgets, steps=steps,
            guidance_scale=guidance, progress=True)
        found.update({(cache, b, "error"): s for b, s in zip(budgets, scheds, strict=True)})
    out = []
    for cache, budget, objective in calibrated:
        sched = found[cache, budget, objective]
        label = f"{sched.label}-{objective}"
        emit(f"calibrated {label}: full steps {list(sched.steps)} (objective {sched.served_change:.3f}, uniform "
             f"{'n/a' if sched.uniform_change is None else f'{sched.uniform_change:.3f}'}; {samples} samples, "
             f"seed {CALIBRATION_SEED})")
        out.append((label, sched.config(**({"parallel_decoding": False} if cache == "fd" else {}))))
    return out


def _dominates(b: tuple[float, float], a: tuple[float, float]) -> bool:
    """``b`` is at least as fast and as agreeing as ``a``, and better on one of them."""
    (sb, qb), (sa, qa) = b, a
    return sb <= sa and qb >= qa and (sb < sa or qb > qa)


def pareto(points: dict) -> set:
    """Labels not dominated in (lower seconds, higher agreement) by any other point."""
    return {a for a, pa in points.items() if not any(_dominates(pb, pa) for b, pb in points.items() if b != a)}


def _forward_flops(unet, deepcache) -> dict[str, float]:
    """FLOPs of one UNet row's encoder, decoder and DeepCache shallow path (the branch of the runs)."""
    import torch
    from fcr_sample import DeepCacheConfig
    from fcr_sample.benchmark import deepcache_partial_flops, flop_split

    cfg = unet.config
    x = torch.zeros(1, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    text = torch.zeros(1, 8, cfg.cross_attention_dim)
    split = flop_split(unet, x, text)
    branches = {b for _, b in deepcache} or {0}
    if len(branches) > 1:
        raise UserError("the FLOP cost axis takes one DeepCache branch per run; pass --deepcache rows of one branch")
    partial = deepcache_partial_flops(unet, x, text, DeepCacheConfig(cache_branch_id=branches.pop()))
    return {"encoder": split.encoder, "decoder": split.total - split.encoder, "partial": partial}


def _beyond(w, label, candidates, per, points, pooled, tolerance, mean_ci) -> tuple[str, str]:
    """Row (w, label) against the base variants among ``candidates`` at least as fast (s/img at most
    ``tolerance`` × the row's): the paired difference to the best of them, and ● when every
    difference's 95 % interval lies above 0."""
    faster = [v for v in candidates if pooled[v] <= pooled[label] * tolerance and (w != "base" or v != label)]
    if not faster:
        return "none as fast", ""
    diffs = {v: mean_ci(per[w, label] - per["base", v]) for v in faster}
    best = max(faster, key=lambda v: points["base", v][1])
    d = diffs[best]
    mark = "●" if all(c.low > 0 for c in diffs.values()) else ""
    return f"{d.mean:+.3f} ({d.low:+.3f}–{d.high:+.3f}) vs {best}", mark


def _weights_arg(text: str) -> tuple[str, Path]:
    label, sep, folder = text.partition("=")
    if not sep or not label or not folder:
        raise argparse.ArgumentTypeError(f"--weights {text!r}: expected LABEL=FOLDER")
    return label, Path(folder)


def _calibrated_arg(text: str) -> tuple[str, int, str]:
    parts = text.split(":")
    if len(parts) != 3 or parts[0] not in ("deepcache", "fd") or parts[2] not in OBJECTIVES or not parts[1].isdigit():
        raise argparse.ArgumentTypeError(f"--calibrated {text!r}: expected CACHE:BUDGET:OBJECTIVE, CACHE deepcache "
                                         f"or fd, BUDGET a whole number of full steps, OBJECTIVE one of {OBJECTIVES}")
    return parts[0], int(parts[1]), parts[2]


def _adaptive_arg(text: str) -> tuple[str, float]:
    cache, sep, value = text.partition(":")
    try:
        threshold = float(value)
    except ValueError:
        threshold = -1.0
    if not sep or cache not in ("deepcache", "fd") or not threshold >= 0:
        raise argparse.ArgumentTypeError(f"--adaptive {text!r}: expected CACHE:THRESHOLD, CACHE deepcache or fd, "
                                         "THRESHOLD a number >= 0")
    return cache, threshold


def _check_arguments(args) -> None:
    """Every value, checked before a model loads (the weights by their files only)."""
    if too_many := [b for _, b, _ in args.calibrated if not 1 <= b <= args.steps]:
        raise UserError(f"--calibrated budget(s) {too_many}: a budget is 1..--steps ({args.steps}) full steps")
    if args.samples % args.batch:
        raise UserError(f"--samples {args.samples} must be a multiple of --batch {args.batch} (one x_T seed per "
                        "batch, shared by every variant)")
    if too_long := [k for k in args.fd if k > args.steps]:
        raise UserError(f"--fd {too_long}: a stride larger than --steps {args.steps} is the same run as a stride of "
                        f"{args.steps}; pass strides up to {args.steps}")
    if too_long := [n for n, _ in args.deepcache if n > args.steps]:
        raise UserError(f"--deepcache interval(s) {too_long}: an interval larger than --steps {args.steps} is the "
                        f"same run as {args.steps}; pass intervals up to {args.steps}")
    if args.n_reference > TEST_IMAGES:
        raise UserError(f"--n-reference {args.n_reference} is more than the {TEST_IMAGES} Fashion-MNIST test images")
    labels = [label for label, _ in args.weights]
    if "base" in labels:
        raise UserError("--weights: the label 'base' is the shipped model's; pick another label")
    if dup := sorted({x for x in labels if labels.count(x) > 1}):
        raise UserError(f"--weights: the label(s) {dup} are given twice; every weights needs its own label")
    from fcr_train.embedded import BASE_WEIGHTS_DIR

    _, base = weights_architecture(BASE_WEIGHTS_DIR, "the shipped base weights")
    for label, folder in args.weights:
        config, arch = weights_architecture(folder, f"--weights {label}:")
        if arch != base:
            raise UserError(
                f"--weights {label}: {folder} is a UNet of another architecture than the base (block_out_channels "
                f"{config.get('block_out_channels')}, layers_per_block {config.get('layers_per_block')}, ...). "
                "Quality at speed gives each variant one cost, pooled over the weights, which holds only for one "
                "architecture; benchmark that UNet on its own")


def main(argv=None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--samples", type=int_at_least(1), default=500, help="samples per variant (same x_T for all)")
    ap.add_argument("--batch", type=int_at_least(1), default=100)
    ap.add_argument("--steps", type=int_at_least(2), default=20)
    ap.add_argument("--guidance", type=float_in(0), default=2.0)
    ap.add_argument("--fd", type=int_at_least(2), nargs="*", default=[5, 10, 20], help="FD strides")
    ap.add_argument("--deepcache", type=int_at_least(0), nargs=2, action="append", metavar=("N", "BRANCH"),
                    help="DeepCache interval (>= 2) and branch (default: 3 0, 5 0, 10 0, 5 3)")
    ap.add_argument("--calibrated", type=_calibrated_arg, action="append", default=[],
                    metavar="CACHE:BUDGET:OBJECTIVE", help="a calibrated schedule, e.g. deepcache:7:error (repeatable)")
    ap.add_argument("--adaptive", type=_adaptive_arg, action="append", default=[], metavar="CACHE:THRESHOLD",
                    help="the adaptive cache, e.g. deepcache:0.2 (repeatable)")
    ap.add_argument("--calibration-samples", type=int_at_least(1), default=20,
                    help="calibration set size (labels 0..9 repeated, seed 7)")
    ap.add_argument("--n-reference", type=int_at_least(2), default=1000, help="real test images for KID")
    ap.add_argument("--feature-size", type=int_at_least(32), default=112, help="EfficientNet-Lite0 input size")
    ap.add_argument("--threads", type=int_at_least(1), default=None)
    ap.add_argument("--out", default=None, help="also write the report (Markdown) to this file")
    ap.add_argument("--weights", type=_weights_arg, action="append", default=[], metavar="LABEL=FOLDER",
                    help="fine-tuned UNet weights (of the base's architecture) to run every variant on too (repeatable)")
    args = ap.parse_args(argv)
    args.deepcache = [tuple(x) for x in args.deepcache] if args.deepcache else [(3, 0), (5, 0), (10, 0), (5, 3)]
    if bad := [n for n, _ in args.deepcache if n < 2]:
        raise UserError(f"--deepcache interval(s) {bad}: an interval must be at least 2 (1 recomputes every step)")
    _check_arguments(args)
    out = report_file(args.out)
    _benchmark(args, out, argv)
    return 0


def _benchmark(args, out: Path | None, argv) -> None:
    import numpy as np
    import torch
    from fcr_eval.analysis.stats import mean_ci
    from fcr_eval.metrics.class_agreement import class_agreement, load_fashion_mnist_classifier
    from fcr_eval.metrics.extractors import EfficientNetLite0Extractor
    from fcr_eval.metrics.kid import kernel_distance
    from fcr_eval.metrics.paired import pixel_mse
    from fcr_sample import get_cache_stats
    from fcr_train.embedded import load_embedded_base, load_fashion_mnist, sample_images
    from sampler_speed import Report  # same folder; one report format
    from tqdm import tqdm

    deepcache = args.deepcache
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_embedded_base()
    report = Report("quality at speed", f"cpu {platform.machine()}, {torch.get_num_threads()} torch thread(s)", argv)
    emit = report.emit
    calibrated = calibrate(base, args.calibrated, samples=args.calibration_samples, steps=args.steps,
                           guidance=args.guidance, emit=emit)
    table = variants(args.fd, deepcache, calibrated, args.adaptive)
    for label, hooks in table.items():  # a DeepCache branch this UNet does not have fails here, not mid-run
        if hooks is not None:
            try:
                hooks[0](base.unet)
            except ValueError as e:
                raise UserError(f"{label}: {e}") from None
            hooks[1](base.unet)
    models = {"base": base, **{label: load_embedded_base(folder) for label, folder in args.weights}}
    clf = load_fashion_mnist_classifier()
    extractor = EfficientNetLite0Extractor(image_size=args.feature_size)
    real_u8, _ = load_fashion_mnist("test")
    real = torch.from_numpy(real_u8[: args.n_reference].copy()).float().div(255).unsqueeze(1)
    real_feats = extractor.extract(real).features
    emit(f"embedded base {base.weights_path}; DDIM-{args.steps}, CFG {args.guidance}; {args.samples} samples per "
         f"variant in batches of {args.batch}; KID reference: first {args.n_reference} Fashion-MNIST test images; "
         f"features {extractor.name} ({extractor.preprocessing})")
    for label, folder in args.weights:
        emit(f"weights {label}: {folder}")

    cells = [(w, v) for w in models for v in table]
    labels = torch.arange(args.samples) % len(base.classes)
    images: dict[tuple[str, str], list[torch.Tensor]] = {c: [] for c in cells}
    seconds: dict[tuple[str, str], float] = dict.fromkeys(cells, 0.0)
    full: dict[tuple[str, str], int] = dict.fromkeys(cells, 0)  # full UNet forwards, over the batches
    flops: dict[tuple[str, str], float] = dict.fromkeys(cells, 0.0)  # per CFG row, over the batches
    cost = _forward_flops(base.unet, deepcache)
    n_batches = args.samples // args.batch
    with tqdm(total=n_batches * len(cells), desc="sampling") as bar:
        for b in range(n_batches):
            sl = slice(b * args.batch, (b + 1) * args.batch)
            for w, label in cells:  # interleaved: every weights × variant once per batch
                model, hooks = models[w], table[label]
                bar.set_postfix_str(f"{w} {label}")
                if hooks is not None:
                    hooks[0](model.unet)
                try:
                    t0 = time.perf_counter()
                    x = sample_images(model, labels[sl], steps=args.steps, guidance_scale=args.guidance,
                                      generator=torch.Generator().manual_seed(1000 + b))
                    seconds[w, label] += time.perf_counter() - t0
                    if hooks is not None:
                        st = get_cache_stats(model.unet)
                        full[w, label] += st.full_forwards
                        flops[w, label] += (st.encoder_forwards * cost["encoder"] + st.decoder_forwards
                                            * cost["decoder"] + st.partial_forwards * cost["partial"])
                    else:
                        full[w, label] += args.steps
                        flops[w, label] += args.steps * (cost["encoder"] + cost["decoder"])
                finally:
                    if hooks is not None:
                        hooks[1](model.unet)
                images[w, label].append(x)
                bar.update()

    # one cost per variant: the same architecture under every weights (differences are noise)
    pooled = {v: sum(seconds[w, v] for w in models) / (len(models) * args.samples) for v in table}
    rows, points, per = [], {}, {}
    for w, label in cells:
        x = torch.cat(images[w, label])
        agree, per_image = class_agreement(x, labels, clf)
        per[w, label] = per_image.float().numpy()
        ci = mean_ci(per[w, label])
        kid = kernel_distance(real_feats, extractor.extract(x).features, num_subsets=100)
        mse = pixel_mse(x.numpy(), torch.cat(images[w, "no cache"]).numpy())  # to the same weights' own
        points[w, label] = (pooled[label], agree)
        rows.append((w, label, seconds[w, label] / args.samples, pooled["no cache"] / pooled[label], ci, kid,
                     float(np.mean(mse)), full[w, label] / n_batches))
    uniform = [v for v in table if table[v] is None or table[v][2]]
    # the cost axis of the Pareto and beyond-uniform-front columns: FLOPs per image from the forwards
    # each variant really ran (deterministic; wall-clock on a loaded shared machine is not)
    rows_per_image = 2 if args.guidance != 1 else 1  # CFG runs the unconditional row too
    gflops = {v: flops["base", v] / n_batches * rows_per_image / 1e9 for v in table}
    front = pareto({v: (gflops[v], points["base", v][1]) for v in table})
    front = {("base", v) for v in front}
    emit("\n| weights | variant | full steps / run | GFLOPs / img | s/img (this run) | speed-up (variant, pooled) | class agreement "
         "(95 % CI) | KID ×10³ (± std over subsets) | pixel MSE to own no cache | Pareto | agreement − best "
         "uniform base variant at least as fast (paired 95 % CI) | beyond uniform front | agreement − best base "
         "variant at least as fast (fine-tuned weights) | beyond base front |")
    emit("|---|---|---:|---:|---:|---:|---:|---:|---:|:---:|---:|:---:|---:|:---:|")
    for w, label, s_img, speed, ci, kid, mse, n_full in rows:
        u_diff, u_mark = _beyond(w, label, uniform, per, points, gflops, 1.0, mean_ci) \
            if w == "base" and label not in uniform else ("", "")
        diff, mark = _beyond(w, label, list(table), per, points, pooled, 1.0, mean_ci) if w != "base" else ("", "")
        emit(f"| {w} | {label} | {n_full:.1f} | {gflops[label]:.2f} | {s_img:.3f} | {speed:.2f}× | {ci.mean:.3f} ({ci.low:.3f}–{ci.high:.3f}) | "
             f"{kid.value * 1e3:.2f} ± {kid.std * 1e3:.2f} | {mse:.4f} | {'●' if (w, label) in front else ''} | "
             f"{u_diff} | {u_mark} | {diff} | {mark} |")
    report.finish(out)


if __name__ == "__main__":
    sys.exit(run(main))
