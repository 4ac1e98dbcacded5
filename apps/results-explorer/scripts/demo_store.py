"""A realistic demo results store, written through fcr-eval's own writer.

It stands in for mini-exp-1 (and a small mini-exp-2) where the experiment runner's real results
are not at hand: the numbers are *made up* to look like the embedded default's
(EfficientNet-Lite0 FD on Fashion-MNIST), and every run's ``params`` says ``"demo": true`` (the
app marks such runs in its sidebar). ``screenshots.py --demo`` uses it. It has per-sample metrics
(cache error, PSNR, class log-probability) and mini-exp-1's contrasts, computed from them by
fcr-eval's own contrast code. A dev tool: it lives beside the screenshots script, not in the
shipped package.

    uv run python apps/results-explorer/scripts/demo_store.py /tmp/demo/fcr.duckdb
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import logging
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
from fcr_eval.analysis.contrasts import ContrastSpec, compute_contrasts
from fcr_eval.report.board import evaluate_store_criteria
from fcr_eval.spec.criteria import CriteriaConfig
from fcr_eval.spec.vocabulary import INDEPENDENT_FINETUNES
from fcr_eval.store import (
    FeatureStat,
    MetricRecord,
    PerPromptScore,
    ResultsStore,
    RunRecord,
    RunResult,
    SampleMetrics,
    SampleRecord,
    TimingRecord,
    make_run_id,
)
from scipy.stats import binomtest

logger = logging.getLogger(__name__)

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
FASHION_LABELS = Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")
CLASSES = ("T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
           "bag", "ankle boot")
FE = "efficientnet_lite0"
PRE = "resize_bilinear_224_imagenet_norm"
CODE_VERSION = "fcr 0.1.0 (demo)"


@dataclass(frozen=True)
class DemoVariation:
    variation_id: str
    sampler: str
    stride: int | None
    lambda_fcr: float | None
    fd: float  # EfficientNet-Lite0 FD, mean over seeds
    sec: float  # seconds per image at batch 1
    variance: float  # σ²_Δ averaged over Δ = 1..10
    agreement: float  # prompt–class agreement
    delta_max: int | None = None
    scheduler: str = "ddim"
    resolution: int = 32
    model: str = "embedded-unet"
    dataset: str = "fashion-mnist"


MINI_EXP_1 = (
    DemoVariation("ddim-50-full", "none", None, None, 17.9, 0.0820, 0.0415, 0.912),
    DemoVariation("fd-5-baseline", "fd", 5, None, 18.8, 0.0610, 0.0415, 0.905),
    DemoVariation("fd-10-baseline", "fd", 10, None, 23.6, 0.0561, 0.0415, 0.874),
    DemoVariation("fd-15-baseline", "fd", 15, None, 29.7, 0.0544, 0.0415, 0.842),
    DemoVariation("deepcache-5", "deepcache", 5, None, 19.6, 0.0489, 0.0415, 0.899),
    DemoVariation("fcr-l0.00-fd-10", "fd", 10, 0.0, 23.1, 0.0562, 0.0409, 0.876, 10),
    DemoVariation("fcr-l0.05-fd-10", "fd", 10, 0.05, 20.7, 0.0559, 0.0301, 0.893, 10),
    DemoVariation("fcr-l0.10-fd-10", "fd", 10, 0.10, 19.5, 0.0560, 0.0236, 0.899, 10),
    DemoVariation("fcr-l0.20-fd-10", "fd", 10, 0.20, 19.2, 0.0561, 0.0187, 0.889, 10),
    DemoVariation("fcr-l0.10-fd-15", "fd", 15, 0.10, 22.4, 0.0545, 0.0236, 0.881, 10),
)
MINI_EXP_2 = (
    DemoVariation("fd-5-baseline-64px", "fd", 5, None, 24.1, 0.231, 0.0462, 0.881,
                  resolution=64, model="embedded-unet-emoji", dataset="noto-emoji"),
    DemoVariation("fcr-l0.10-fd-10-64px", "fd", 10, 0.10, 25.3, 0.205, 0.0259, 0.872, 10,
                  resolution=64, model="embedded-unet-emoji", dataset="noto-emoji"),
    DemoVariation("fcr-l0.10-dpmpp-fd-10-64px", "fd", 10, 0.10, 26.0, 0.118, 0.0259, 0.866, 10,
                  scheduler="dpmsolver++", resolution=64, model="embedded-unet-emoji",
                  dataset="noto-emoji"),
    DemoVariation("fd-10-baseline-64px", "fd", 10, None, 30.9, 0.203, 0.0462, 0.838,
                  resolution=64, model="embedded-unet-emoji", dataset="noto-emoji"),
)
BLOCKS = ("down_blocks.0", "down_blocks.1", "mid_block")
#: The paired claims of the demo's mini-exp-1, as an experiment file's [[contrasts]] name them.
CONTRASTS = (
    ContrastSpec("stride-gap", "difference", "cache_mse", candidate="fd-10-baseline",
                 baseline="fd-5-baseline", n_resamples=2000),
    ContrastSpec("fcr-effect", "difference", "cache_mse", candidate="fcr-l0.10-fd-10",
                 baseline="fcr-l0.00-fd-10", threshold=0.0, direction="at_most", n_resamples=2000),
    ContrastSpec("fcr-recovers-gap", "recovered_fraction", "cache_mse", candidate="fcr-l0.10-fd-10",
                 baseline="fcr-l0.00-fd-10", target="fd-5-baseline", threshold=0.3,
                 direction="at_least", n_resamples=2000),
    ContrastSpec("fcr-class-logprob", "difference", "class_logprob", candidate="fcr-l0.10-fd-10",
                 baseline="fd-5-baseline", threshold=-0.02, direction="at_least", n_resamples=2000),
)


def _sample_metrics(v: DemoVariation, seed: int, n: int, reference: str) -> list[SampleMetrics]:
    """Made-up per-sample values: cache error grows with the stride and shrinks with λ; every
    variation of a seed shares the per-sample difficulty (the same x_T and prompt)."""
    hard = np.random.default_rng(1000 + seed).random(n)  # shared by the variations of a seed
    own = np.random.default_rng(zlib.crc32(f"{v.variation_id}/{seed}".encode())).random(n)
    if v.stride is None:
        mse = np.zeros(n)
    else:
        scale = 0.0009 * v.stride * (1.6 if v.sampler == "deepcache" else 1.0) / (1 + 4 * (v.lambda_fcr or 0))
        mse = scale * (0.4 + hard + 0.3 * own)
    with np.errstate(divide="ignore"):
        psnr = -10 * np.log10(mse)
    logprob = np.log(np.clip(v.agreement * (0.6 + 0.8 * hard) - 0.1 * own, 1e-3, 1))
    prompts = [f"p{k:04d}" for k in range(n)]
    return [SampleMetrics("cache_mse", mse, prompts, seeds=seed, reference=reference),
            SampleMetrics("cache_psnr", psnr, prompts, seeds=seed, reference=reference),
            SampleMetrics("class_logprob", logprob, prompts, seeds=seed, feature_extractor="fashion_mnist_cnn")]


def _fashion_images(n: int) -> tuple[np.ndarray, np.ndarray] | None:
    if not (FASHION_MNIST.is_file() and FASHION_LABELS.is_file()):
        return None
    with gzip.open(FASHION_MNIST) as f:
        images = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FASHION_LABELS) as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
    return images[:n * 20], labels[:n * 20]


def _image(base: np.ndarray, degrade: float, rng: np.random.Generator, size: int):
    from PIL import Image

    img = base.astype(np.float32) / 255.0
    img = np.clip(img + rng.normal(0, 0.04 + 0.5 * degrade, img.shape), 0, 1)
    rgb = np.stack([img * 0.95, img * 0.9, img], axis=-1)
    pil = Image.fromarray((rgb * 255).astype(np.uint8), "RGB")
    return pil.resize((size, size), Image.NEAREST)


def _procedural(label: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:28, 0:28]
    cx, cy = 14 + rng.normal(0, 1), 14 + rng.normal(0, 1)
    r = 6 + label % 5
    return (255 * (((xx - cx) ** 2 + (yy - cy) ** 2) < r * r)).astype(np.uint8)


def build_demo_store(
    path: str | Path,
    seeds: tuple[int, ...] = (0, 1, 2),
    n_prompts: int = 10,
    sample_seeds: tuple[int, ...] = (0, 1),
    per_prompt: int = 200,
    with_images: bool = True,
    human_study: bool = True,
) -> Path:
    """Write the demo experiments into ``path`` (and ``human-study.duckdb`` beside it).

    Returns the store path. Existing runs are skipped (the writer's rule).
    """
    path = Path(path)
    store = ResultsStore(path)
    rng = np.random.default_rng(1234)
    data = _fashion_images(n_prompts)
    prompts = []
    for i in range(n_prompts):
        label = int(data[1][i]) if data else i % len(CLASSES)
        prompts.append((f"p{i:03d}", f"a photo of a {CLASSES[label]}", label, i))
    started = dt.datetime(2026, 11, 24, 3, 0, 0)
    minute = 0
    for experiment, variations, exp_seeds in (("mini-exp-1", MINI_EXP_1, seeds),
                                              ("mini-exp-2", MINI_EXP_2, seeds[:2])):
        for v in variations:
            for seed in exp_seeds:
                config = {"experiment": experiment, "variation": v.variation_id, "seed": seed,
                          "stride": v.stride, "lambda": v.lambda_fcr, "demo": True}
                run_id = make_run_id(experiment, v.variation_id, seed, config)
                fd = v.fd + rng.normal(0, 0.35 + 0.02 * v.fd)
                agreement = float(np.clip(v.agreement + rng.normal(0, 0.006), 0, 1))
                sec = v.sec * (1 + rng.normal(0, 0.03))
                var_scale = v.variance * (1 + rng.normal(0, 0.04))
                minute += 7
                run = RunRecord(
                    run_id=run_id, experiment_id=experiment, variation_id=v.variation_id,
                    seed=seed, model=v.model, dataset=v.dataset, sampler=v.sampler,
                    stride=v.stride, parallel_decoding=(v.sampler == "fd") or None,
                    lambda_fcr=v.lambda_fcr, delta_max=v.delta_max,
                    blocks="all" if v.lambda_fcr is not None else None,
                    scheduler=v.scheduler, resolution=v.resolution, num_inference_steps=50,
                    guidance_scale=3.0, params={"demo": True, "prompt_set": "fashion-mnist-val"},
                    config=config, code_version=CODE_VERSION, device="cpu: 2 cores",
                    started_at=started + dt.timedelta(minutes=minute - 6),
                    finished_at=started + dt.timedelta(minutes=minute),
                )
                steps = 50
                keys = steps if v.stride is None else math.ceil(steps / v.stride)
                metrics = [
                    MetricRecord("fd_efficientnet_lite0", fd, FE, PRE, 500),
                    MetricRecord("kid_efficientnet_lite0", fd / 900 + rng.normal(0, 2e-4), FE,
                                 PRE, 500),
                    MetricRecord("precision", 0.71 - fd / 200 + rng.normal(0, 0.01), FE, PRE, 500),
                    MetricRecord("recall", 0.62 - fd / 250 + rng.normal(0, 0.01), FE, PRE, 500),
                    MetricRecord("class_agreement", agreement, "fmnist_classifier",
                                 "none", 500),
                ]
                if v.lambda_fcr is not None:
                    metrics.append(MetricRecord("finetune_compute_fraction", 0.016, "none",
                                                "none", 0, {"finetune_steps": 400}))
                timings = [
                    TimingRecord(bs, sec / (1.0 if bs == 1 else 2.6), unet_calls=steps,
                                 encoder_forwards=keys, decoder_forwards=steps,
                                 flops_per_image=3.1e8 * (0.33 * keys / steps + 0.67),
                                 peak_memory_bytes=int((612 + (4 if v.lambda_fcr else 0)
                                                        + 3 * bs) * 2**20),
                                 memory_kind="process_rss", n_images=64, warmup=3)
                    for bs in (1, 8)
                ]
                feats = []
                for delta in range(1, 11):
                    shape = (delta / 5.5) ** 0.85
                    for block, w in (("all", 1.0), *zip(BLOCKS, (0.6, 1.1, 1.5), strict=False)):
                        feats.append(FeatureStat(block, delta,
                                                 var_scale * shape * w * (1 + rng.normal(0, 0.02)),
                                                 256))
                per_prompt_rows = [
                    PerPromptScore("class_agreement", f"p{k:04d}",
                                   float(rng.random() < agreement))
                    for k in range(per_prompt)
                ]
                samples = []
                if with_images:
                    degrade = max(0.0, (fd - 17.5) / 30)
                    folder = path.parent / "samples" / experiment / v.variation_id / f"s{seed}"
                    folder.mkdir(parents=True, exist_ok=True)
                    for pid, prompt, label, idx in prompts:
                        for sseed in sample_seeds:
                            img_rng = np.random.default_rng(idx * 100 + sseed)
                            base = (data[0][idx + sseed * n_prompts] if data
                                    else _procedural(label, img_rng))
                            noise_rng = np.random.default_rng(
                                zlib.crc32(f"{v.variation_id}/{seed}/{pid}/{sseed}".encode()))
                            img = _image(base, degrade, noise_rng, v.resolution * 2)
                            file = folder / f"{pid}-{sseed}.png"
                            img.save(file)
                            samples.append(SampleRecord(pid, prompt, sseed,
                                                        str(file.relative_to(path.parent)),
                                                        img.width, img.height, CLASSES[label]))
                reference = make_run_id(experiment, variations[0].variation_id, seed, {
                    "experiment": experiment, "variation": variations[0].variation_id, "seed": seed,
                    "stride": variations[0].stride, "lambda": variations[0].lambda_fcr, "demo": True})
                store.write_run(RunResult(run, metrics, per_prompt_rows, timings, feats, samples,
                                          _sample_metrics(v, seed, per_prompt, reference)))
    # The demo's seeds stand for independent fine-tunes (one per seed), so its contrasts are decided.
    store.write_contrasts("mini-exp-1", compute_contrasts(
        CONTRASTS, store.sample_metrics(experiment_id="mini-exp-1"),
        replication={c.id: INDEPENDENT_FINETUNES for c in CONTRASTS}), code_version=CODE_VERSION)
    _write_criteria(store)
    if human_study:
        write_demo_human_study(path.parent / "human-study.duckdb")
    return path


def _write_criteria(store: ResultsStore) -> None:
    """The design's criteria, evaluated on the demo numbers by fcr-eval's own evaluator."""
    at10 = [v.variation_id for v in MINI_EXP_1 if v.stride == 10]
    config = CriteriaConfig(baseline="fd-5-baseline", candidate="fcr-l0.10-fd-10",
                            no_fcr_reference="fd-10-baseline", r2_variations=at10)
    store.write_criteria(evaluate_store_criteria(store, "mini-exp-1", config))


def write_demo_human_study(path: Path) -> None:
    """The analysis tables of a human study, as ``fcr-human-study analyse`` writes them
    (contract: docs/results-store.md)."""
    path.unlink(missing_ok=True)
    con = duckdb.connect(str(path))
    con.execute(
        """CREATE TABLE human_study_results (study_id VARCHAR, variation_a VARCHAR,
           variation_b VARCHAR, n_a INTEGER, n_b INTEGER, n_tie INTEGER, n_both_bad INTEGER,
           win_rate_a DOUBLE, ci_low DOUBLE, ci_high DOUBLE, p_value DOUBLE,
           analysed_at TIMESTAMP)"""
    )
    con.execute(
        """CREATE TABLE human_study_scores (study_id VARCHAR, variation VARCHAR,
           bt_score DOUBLE, ci_low DOUBLE, ci_high DOUBLE)"""
    )
    con.execute(
        """CREATE TABLE human_study_summary (study_id VARCHAR, n_votes INTEGER,
           n_votes_used INTEGER, n_raters INTEGER, n_raters_excluded INTEGER,
           krippendorff_alpha DOUBLE, fleiss_kappa DOUBLE, n_items_agreement INTEGER,
           min_attention_accuracy DOUBLE, bootstrap INTEGER, details JSON, code_version VARCHAR,
           analysed_at TIMESTAMP)"""
    )
    when = dt.datetime(2026, 11, 24, 5, 30)
    con.execute("INSERT INTO human_study_summary VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                ["demo-study", 1092, 1050, 24, 2, 0.41, 0.39, 120, 0.8, 2000, "{}",
                 CODE_VERSION, when])
    pairs = [
        ("fcr-l0.10-fd-10", "fd-10-baseline", 212, 98, 31, 9),
        ("fcr-l0.10-fd-10", "fd-5-baseline", 151, 163, 29, 7),
        ("fd-5-baseline", "fd-10-baseline", 201, 104, 33, 12),
    ]
    for a, b, na, nb, tie, bad in pairs:
        n = na + nb
        p = na / n
        half = 1.96 * math.sqrt(p * (1 - p) / n)
        pv = binomtest(na, n).pvalue
        con.execute("INSERT INTO human_study_results VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    ["demo-study", a, b, na, nb, tie, bad, p, p - half, p + half, pv, when])
    for v, s, h in (("fcr-l0.10-fd-10", 0.31, 0.09), ("fd-5-baseline", 0.27, 0.09),
                    ("fd-10-baseline", -0.58, 0.10)):
        con.execute("INSERT INTO human_study_scores VALUES (?,?,?,?,?)",
                    ["demo-study", v, s, s - h, s + h])
    con.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="store file to create, e.g. /tmp/demo/fcr.duckdb")
    parser.add_argument("--per-prompt", type=int, default=200,
                        help="per-prompt scores per run (make it large to test scale)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    path = build_demo_store(args.path, per_prompt=args.per_prompt)
    print(f"demo store written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
