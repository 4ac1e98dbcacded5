"""What a plan needs from the machine before it starts: peak RAM per process, disk, and how long
on 1, 8 or 64 GPUs.

The RAM model is the streaming runner's (issue 23): a run holds its networks, one batch's working
set and the set-level metrics' running state, never a whole run, so its peak depends on the
batch size, the image size (pixels and latent), the feature dimension, the networks' sizes and
the reference set's size — not on ``n_samples``. Per process:

* **runtime**: Python, torch, diffusers, transformers and DuckDB imported
  (:data:`RUNTIME_BYTES`, measured);
* **networks**: the UNet, text encoder and VAE at the sampling dtype (parameter counts read from a
  local diffusers folder's safetensors headers, else the published counts of the designed models,
  :data:`SD_PARAMS`), the feature extractor and CLIP when metrics need them;
* **batch**: the UNet's activations of one batch (×2 rows with classifier-free guidance; the skip
  connections kept for the decoder plus a few live maps, counted from the UNet config), the VAE
  decoder's full-resolution maps, the batch's images and its uncached reference in float32 with
  their paired-metric temporaries, and one feature-extraction sub-batch;
* **metric state**: the Fréchet running sums (d² float64, samples and reference), the reference
  set's features (``n_reference × d``), and one k-NN tile of precision/recall.

Attention is assumed to run through PyTorch's SDPA kernels (no n² score matrix). On a GPU the
networks and the batch's working set live in GPU memory; the figure is then what the GPU needs,
and an upper bound of the host's RAM.

Disk: what stays — the PNGs that ``evaluation.save_samples`` keeps (raw uint8 bytes, rounded up
to 4 KiB blocks: an upper bound, PNG compresses photographs), the per-sample rows in the store,
the reference set's features (``results/reference/*.npz``) and the fine-tunes' checkpoints (the
runner keeps 2: weights + AdamW states, + EMA) and final weights — and the largest transient
spill at any point of the runner's order: the running run's batch folder (its float64 feature
and logit spills, removed once it is stored) and the uncached reference batches spilled as
float32 pixels for the cached runs of the same weights × seed (``--reference spill``, removed
after the key's last run).

Example:
    >>> res = plan_resources(make_plan(load_experiment("experiments/exp-1-main-ablation.toml"), calibrate=False))
    >>> res.peak_ram_bytes / 2**30, res.total_disk_bytes / 2**40
    >>> format_projection(res.projection((1, 8, 64)))
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from fcr_eval.metrics.streaming import CHUNK_ROWS
from fcr_eval.plan.costs import ASSUMED_GPU_TFLOPS
from fcr_eval.plan.planner import Plan, PlannedRun, reference_key, uncached_flops
from fcr_eval.spec.evaluation import saved_sample_count

__all__ = ["RunResources", "PlanResources", "Projection", "plan_resources", "run_resources", "format_projection",
           "format_resources", "machine_problems", "fmt_bytes", "RUNTIME_BYTES", "SD_PARAMS", "REFERENCE_MODES",
           "DEFAULT_GPUS"]

#: Python + torch + diffusers + transformers + DuckDB imported, and the runner's other fixed state:
#: peak RSS of an embedded run at n = 1,000 with a 28² batch of 100 (benchmarks/runner_scale.py) less
#: its networks and batch as counted here. The same for every family (the SD path imports no more).
RUNTIME_BYTES = 1100 * 2**20
#: Parameters of the designed models' networks (published counts): UNet, VAE, text encoder.
SD_PARAMS = {
    "sd15": {"unet": 859.52e6, "vae": 83.65e6, "text_encoder": 123.06e6},
    "openjourney": {"unet": 859.52e6, "vae": 83.65e6, "text_encoder": 123.06e6},
    "sd21": {"unet": 865.91e6, "vae": 83.65e6, "text_encoder": 340.39e6},
}
#: SD's VAE: block_out_channels of its decoder (the last level runs at full resolution).
SD_VAE_CHANNELS = (128, 256, 512, 512)
#: The embedded families' networks: pixel UNet (1.34M) + all-MiniLM-L6 text encoder (22.7M) +
#: EfficientNet-Lite0 (4.65M) + the shipped class classifier.
EMBEDDED_NETWORK_PARAMS = 29.0e6
EMBEDDED_UNET_PARAMS = 1.34e6
#: Feature extractors and CLIP (parameters), when a metric needs them.
EXTRACTOR_PARAMS = {"inception": 23.9e6, "efficientnet_lite0": 4.65e6}
CLIP_PARAMS = 427.6e6  # CLIP ViT-L/14, CLIPScore and CLIP drift
#: Logits the extractor stores with each image's features (Inception-score classes / ImageNet).
EXTRACTOR_LOGITS = {"inception": 1008, "efficientnet_lite0": 1000}
#: Activation elements one image keeps alive inside the feature extractor, per pixel of its input.
EXTRACTOR_ACTIVATIONS_PER_PIXEL = {"inception": 32 * 3 / 4, "efficientnet_lite0": 32 * 3 / 4}
#: The extractor's sub-batch (:meth:`fcr_eval.metrics.extractors.FeatureExtractor.extract`).
EXTRACT_BATCH = 64
#: float32 copies of a batch's images alive at once: the samples, their uncached reference, the
#: paired metrics' difference, and the extractor's resized copy.
IMAGE_COPIES = 4
#: Rows of a k-NN tile of precision/recall (a tile is rows × reference, or rows × rows).
KNN_TILE = 1024
#: Bytes per sample of a run's per-batch records (per-sample values, sample rows) while it runs.
BATCH_RECORD_BYTES = 256
#: Bytes per sample in the store (per-sample metric rows, sample rows, prompts): measured by
#: benchmarks/runner_scale.py.
STORE_BYTES_PER_SAMPLE = 400
#: Where a cached run's uncached reference batches come from (``fcr-eval run --reference``, the
#: runner imports it, first the default): ``spill`` — written once
#: per weights × seed × setting as float32 pixels (and their features) by the key's first run,
#: read back by the later ones, removed after the last; ``sample`` — sampled again in every cached
#: run (no disk, one more uncached sampling per cached run).
REFERENCE_MODES = ("spill", "sample")
#: Checkpoints the runner keeps per fine-tune (fcr_eval.run.finetuning: keep_checkpoints=2).
KEPT_CHECKPOINTS = 2
#: GPU counts of the projection `fcr-eval plan` prints for a real-model experiment.
DEFAULT_GPUS = (1, 8, 64)
#: float bytes per sampling dtype.
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_BLOCK = 4096


@dataclass(frozen=True)
class RunResources:
    """One run's needs. ``ram_parts`` names where the peak comes from; disk in bytes: what the run
    leaves (PNGs, store rows) and what it holds on disk only while it runs (its batch folder:
    the feature and logit spills and the per-batch records, removed once the run is stored)."""

    peak_ram_bytes: float
    ram_parts: dict[str, float]
    pngs: int
    png_bytes: float
    store_bytes: float
    spill_bytes: float  # transient: the run's batch folder
    reference_spill_bytes: float  # the float32 reference batches of its key, when spilled
    flops: float  # sampling (its uncached reference included when it samples one) + timing + features
    parallel_flops: float  # the part that spreads over processes (the run's batches)

    @property
    def disk_bytes(self) -> float:
        """What the run leaves on disk."""
        return self.png_bytes + self.store_bytes


@dataclass(frozen=True)
class Projection:
    """The plan on ``gpus`` GPUs at ``tflops`` effective each."""

    gpus: int
    tflops: float
    gpu_hours: float
    wall_hours: float
    ram_per_process_bytes: float  # host RAM of a GPU process: runtime, networks (loaded through it), metric state
    gpu_memory_bytes: float  # networks + one batch's working set
    disk_bytes: float


@dataclass
class PlanResources:
    """Every run's needs and the plan's: ``peak_ram_bytes`` is the largest run's (runs go one at a
    time); disk is what the runs leave, the reference features and the fine-tunes' checkpoints, plus
    the largest transient spill at any point of the runner's order (``transient_peak_bytes``)."""

    plan: Plan
    runs: dict[str, RunResources]
    finetune_disk_bytes: float
    reference_feature_bytes: float
    reference_mode: str
    transient_peak_bytes: float = 0.0
    reference_spill_peak_bytes: float = 0.0

    @property
    def peak_ram_bytes(self) -> float:
        return max((r.peak_ram_bytes for r in self.runs.values()), default=RUNTIME_BYTES)

    @property
    def host_ram_bytes(self) -> float:
        """Peak host RAM of a process whose networks and batches are on a GPU."""
        return max((r.peak_ram_bytes - r.ram_parts["batch"] for r in self.runs.values()), default=RUNTIME_BYTES)

    @property
    def gpu_memory_bytes(self) -> float:
        """Peak GPU memory of a process: its networks and one batch's working set."""
        return max((r.ram_parts["networks"] + r.ram_parts["batch"] for r in self.runs.values()), default=0.0)

    @property
    def total_disk_bytes(self) -> float:
        return self.disk_of(self.runs)

    def disk_of(self, run_ids) -> float:
        """Free disk the named runs need (what is left to do): what they leave, the reference
        features, the fine-tunes' checkpoints and the transient peak."""
        return (sum(self.runs[i].disk_bytes for i in run_ids) + self.finetune_disk_bytes
                + self.reference_feature_bytes + self.transient_peak_bytes)

    @property
    def total_flops(self) -> float:
        plan = self.plan
        return (sum(f.est_flops for f in plan.finetunes.values()) + plan.est_eval_seconds * plan.gflops_per_s * 1e9
                + sum(x.flops for x in self.runs.values()))

    def projection(self, gpus=DEFAULT_GPUS, tflops: float = ASSUMED_GPU_TFLOPS) -> list[Projection]:
        """GPU-hours and wall hours on each GPU count: fine-tunes data-parallel over all GPUs (one
        after another), a run's batches spread over all processes (``ceil(batches / G)`` rounds),
        its timing repeats, σ²_Δ and set-level metrics on one process."""
        plan, rate = self.plan, tflops * 1e12
        ft_flops = sum(f.est_flops for f in plan.finetunes.values())
        serial_eval = plan.est_eval_seconds * plan.gflops_per_s * 1e9  # features of the reference, σ²_Δ
        out = []
        for g in gpus:
            wall = (ft_flops / g + serial_eval) / rate
            for r in plan.runs:
                res = self.runs[r.run_id]
                batches = math.ceil(r.n_samples / int(plan.experiment.sampling.batch_size))
                rounds = math.ceil(batches / g)
                wall += (res.parallel_flops * rounds / batches + (res.flops - res.parallel_flops)) / rate
            out.append(Projection(g, tflops, self.total_flops / rate / 3600, wall / 3600, self.host_ram_bytes,
                                  self.gpu_memory_bytes, self.total_disk_bytes))
        return out


# ---------------------------------------------------------------------------------------------
# Networks and shapes
# ---------------------------------------------------------------------------------------------


def _safetensors_params(folder: Path) -> float | None:
    """Parameters in a folder's ``*.safetensors`` files, from their headers (no tensor is read)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        try:
            with open(f, "rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(size))
        except (OSError, ValueError, struct.error):
            return None
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return float(total)


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class _Shapes:
    """What the RAM model reads about a model family: its networks' parameters, the UNet config,
    the VAE's decoder channels (``None``: pixel space), the image channels and the UNet's
    parameters (what a fine-tune's checkpoints hold)."""

    params: float
    unet_cfg: dict
    vae_channels: tuple[int, ...] | None
    image_channels: int
    unet_params: float


def _model_shapes(plan: Plan, model_id: str) -> _Shapes:
    from fcr_sample.vocabulary import MODEL_IDS

    from fcr_eval.plan.unet_flops import unet_config_for

    spec = plan.experiment.models[model_id]
    if spec.backbone == "emoji":
        from fcr_train.emoji_backbone import (
            EMOJI_UNET_CONFIG,
            EMOJI_VAE_CONFIG,
            TINY_EMOJI_UNET_CONFIG,
        )

        cfg = TINY_EMOJI_UNET_CONFIG if spec.source == "emoji-tiny" else EMOJI_UNET_CONFIG
        return _Shapes(EMBEDDED_NETWORK_PARAMS, dict(cfg), tuple(EMOJI_VAE_CONFIG["block_out_channels"]), 3,
                       EMBEDDED_UNET_PARAMS)
    if spec.embedded:
        from fcr_train.api import TINY_EMBEDDED_UNET_CONFIG
        from fcr_train.embedded import EMBEDDED_UNET_CONFIG

        cfg = TINY_EMBEDDED_UNET_CONFIG if spec.source == "embedded-tiny" else EMBEDDED_UNET_CONFIG
        return _Shapes(EMBEDDED_NETWORK_PARAMS, dict(cfg), None, int(cfg.get("out_channels", 1)), EMBEDDED_UNET_PARAMS)
    folder = Path(MODEL_IDS.get(spec.source, spec.source)).expanduser()
    arch = unet_config_for(spec.source)
    unet_cfg = arch[0] if arch else {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
                                     "in_channels": 4}
    counted = {p: _safetensors_params(folder / p) for p in ("unet", "vae", "text_encoder")} if folder.is_dir() else {}
    known = SD_PARAMS.get(spec.source) or next((v for k, v in SD_PARAMS.items() if MODEL_IDS.get(k) == spec.source),
                                               SD_PARAMS["sd15"])
    params = sum(counted.get(p) or known[p] for p in ("unet", "vae", "text_encoder"))
    vae_cfg = _json(folder / "vae" / "config.json") if folder.is_dir() else None
    vae = tuple(vae_cfg["block_out_channels"]) if vae_cfg and "block_out_channels" in vae_cfg else SD_VAE_CHANNELS
    return _Shapes(params, dict(unet_cfg), vae, 3, counted.get("unet") or known["unet"])


def unet_activation_elements(cfg: dict, side: int) -> float:
    """Activation elements one image keeps alive in a no-grad UNet forward at a ``side``² input:
    every skip connection the decoder will read, plus four maps of the largest level (a ResNet
    block's input, its two convolutions and the output)."""
    boc = list(cfg.get("block_out_channels", (320, 640, 1280, 1280)))
    lpb = int(cfg.get("layers_per_block", 2))
    h, skips, largest = side, float(boc[0] * side * side), 0.0
    for i, c in enumerate(boc):
        skips += lpb * c * h * h
        largest = max(largest, c * h * h)
        if i < len(boc) - 1:
            h = (h + 1) // 2
            skips += c * h * h
    return skips + 4 * largest


def vae_decode_elements(channels: tuple[int, ...], side: int) -> float:
    """Activation elements of one image in the VAE decoder at its last, full-resolution level
    (input, two convolutions, the upsampled map and the output: ~5 maps)."""
    return 5.0 * channels[0] * side * side


# ---------------------------------------------------------------------------------------------
# One run, and the plan
# ---------------------------------------------------------------------------------------------


def run_resources(plan: Plan, run: PlannedRun, shapes: _Shapes | None = None, *,
                  extra_reference_flops: float = 0.0) -> RunResources:
    """Peak RAM per process, disk and compute of one planned run (see the module docstring).

    Args:
        extra_reference_flops: uncached sampling beyond the plan's ``est_flops`` (which counts
            each uncached reference once), as ``--reference sample`` does in every cached run.
    """
    exp = plan.experiment
    ev, sampling = exp.evaluation, exp.sampling
    shapes = shapes or _model_shapes(plan, run.variation.model)
    dtype = _DTYPE_BYTES.get(sampling.dtype, 4)
    b = int(sampling.batch_size)
    cfg_rows = 2 if run.guidance_scale != 1.0 else 1
    side = int(run.resolution)
    factor = 2 ** (len(shapes.vae_channels) - 1) if shapes.vae_channels else 1
    pixels = shapes.image_channels * side * side
    d = _feature_dim(ev.feature_extractor) if _extracts(ev) else 0
    networks = shapes.params * dtype
    if d:
        networks += EXTRACTOR_PARAMS.get(ev.feature_extractor, 0.0) * 4
    if any(m in ev.metrics for m in ("clip_score", "clip_drift")) and not exp.embedded:
        networks += CLIP_PARAMS * 4
    unet_act = b * cfg_rows * unet_activation_elements(shapes.unet_cfg, max(1, side // factor)) * dtype
    vae_act = b * vae_decode_elements(shapes.vae_channels, side) * dtype if shapes.vae_channels else 0.0
    images = b * pixels * 4 * IMAGE_COPIES
    fs = int(ev.feature_image_size) if d else 0
    extract = min(b, EXTRACT_BATCH) * fs * fs * (3 * 2 + EXTRACTOR_ACTIVATIONS_PER_PIXEL.get(ev.feature_extractor, 24)
                                                  ) * 4 if d else 0.0
    per_image_features = _per_image_feature_bytes(ev)
    metric_state = 0.0
    if d:  # Fréchet moments (samples, reference, a copy), the reference set, a chunk, a k-NN block
        metric_state = 3 * d * d * 8 + int(ev.n_reference) * per_image_features + CHUNK_ROWS * d * 8
        if "precision_recall" in ev.metrics:
            metric_state += 2 * KNN_TILE * (KNN_TILE + d) * 8
    parts = {"runtime": float(RUNTIME_BYTES), "networks": networks,
             "batch": max(unet_act, vae_act) + images + extract, "metric state": metric_state}
    n = int(run.n_samples)
    n_png = saved_sample_count(ev.save_samples, n)
    png_each = math.ceil(pixels / _BLOCK) * _BLOCK
    own = float(run.est_flops)  # its sampling, and its uncached reference when it samples it
    timing = max(float(run.est_seconds) * plan.gflops_per_s * 1e9 - own, 0.0)  # timing repeats (main process)
    parallel = own + float(extra_reference_flops) + _feature_flops(ev) * n
    return RunResources(
        peak_ram_bytes=sum(parts.values()), ram_parts=parts, pngs=n_png, png_bytes=float(n_png * png_each),
        store_bytes=float(n * STORE_BYTES_PER_SAMPLE), spill_bytes=float(n * (per_image_features + BATCH_RECORD_BYTES)),
        reference_spill_bytes=float(n * (pixels * 4 + per_image_features)), flops=parallel + timing,
        parallel_flops=parallel)


def _per_image_feature_bytes(ev) -> int:
    """float64 features and logits of one image (the spills and the reference set keep both)."""
    if not _extracts(ev):
        return 0
    return (_feature_dim(ev.feature_extractor) + EXTRACTOR_LOGITS.get(ev.feature_extractor, 0)) * 8


def _extracts(ev) -> bool:
    from fcr_eval.spec.vocabulary import REFERENCE_METRICS

    return ev.reference is not None and any(m in ev.metrics for m in REFERENCE_METRICS if m != "sigma2_delta")


def _feature_dim(extractor: str) -> int:
    from fcr_eval.metrics.extractors import feature_dim

    return int(feature_dim(extractor) or 2048)


def _feature_flops(ev) -> float:
    from fcr_eval.plan.costs import EFFICIENTNET_LITE0_FLOPS_224

    return EFFICIENTNET_LITE0_FLOPS_224 * (ev.feature_image_size / 224) ** 2 if _extracts(ev) else 0.0


def plan_resources(plan: Plan, reference_mode: str = REFERENCE_MODES[0]) -> PlanResources:
    """Every run's peak RAM, disk and compute, and the plan's totals: fine-tune checkpoints, the
    reference set's features, and the largest transient spill at any point of the runner's order.

    Args:
        reference_mode: how cached runs get their uncached reference (:data:`REFERENCE_MODES`):
            ``spill`` — the first run of a reference key writes its batches when a cached run of
            the key follows, the later ones read them back, the last one removes them (the plan's
            compute counts each reference once); ``sample`` — every cached run samples its own
            (no spill; this adds the uncached sampling of every cached run the plan did not
            charge with it).
    """
    if reference_mode not in REFERENCE_MODES:
        raise ValueError(f"reference mode {reference_mode!r} is not one of {REFERENCE_MODES}")
    shapes: dict[str, _Shapes] = {}
    runs: dict[str, RunResources] = {}
    for r in plan.runs:
        if r.variation.model not in shapes:
            shapes[r.variation.model] = _model_shapes(plan, r.variation.model)
        extra = uncached_flops(r) if reference_mode == "sample" and r.sampler.cached and not r.reference_flops else 0.0
        runs[r.run_id] = run_resources(plan, r, shapes[r.variation.model], extra_reference_flops=extra)
    transient, spills = _transient_peak(plan, runs, reference_mode)
    ev = plan.experiment.evaluation
    ft_disk = 0.0
    for f in plan.finetunes.values():
        params = (shapes.get(f.model) or _model_shapes(plan, f.model)).unet_params
        per_param = 4 + 8 + (4 if f.ema_decay else 0)  # fp32 weights, AdamW's two moments, EMA
        ft_disk += params * (KEPT_CHECKPOINTS * per_param + 4)  # + the final UNet
    return PlanResources(plan, runs, ft_disk, float(int(ev.n_reference) * _per_image_feature_bytes(ev)),
                         reference_mode, transient, spills)


def _transient_peak(plan: Plan, runs: dict[str, RunResources], mode: str) -> tuple[float, float]:
    """The largest (run's batch folder + live reference spills) and the largest live reference
    spills over the runner's order (per model, uncached runs first): a key's spill lives from its
    first run, when a cached run of the key follows, to the last run of the key."""
    order = sorted(plan.runs, key=lambda r: (list(plan.experiment.models).index(r.variation.model), r.sampler.cached))
    last = {reference_key(r): i for i, r in enumerate(order)}
    live: dict[tuple, float] = {}
    peak = peak_spills = 0.0
    for i, r in enumerate(order):
        key = reference_key(r)
        if mode == "spill" and key not in live and any(reference_key(x) == key and x.sampler.cached
                                                       for x in order[i + 1:]):
            live[key] = runs[r.run_id].reference_spill_bytes
        peak_spills = max(peak_spills, sum(live.values()))
        peak = max(peak, runs[r.run_id].spill_bytes + sum(live.values()))
        if last[key] == i:
            live.pop(key, None)
    return peak, peak_spills


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------


def fmt_bytes(x: float) -> str:
    for unit, scale in (("TB", 2**40), ("GB", 2**30), ("MB", 2**20)):
        if x >= scale:
            return f"{x / scale:.1f} {unit}"
    return f"{x / 2**10:.0f} KB"


def format_projection(rows: list[Projection]) -> str:
    """The projection as a text table (the plan prints it; docs/benchmarks.md holds one)."""
    if not rows:
        return ""
    lines = [f"on A100-class GPUs at an assumed {rows[0].tflops:g} TFLOP/s effective each (fine-tunes data-parallel "
             "over all GPUs; a run's batches over all processes; timing, σ²_Δ and set-level metrics on one):",
             f"  {'GPUs':>5} {'GPU-hours':>10} {'wall':>10} {'RAM/process':>12} {'GPU memory':>11} {'disk':>10}"]
    for p in rows:
        wall = f"{p.wall_hours / 24:.1f} d" if p.wall_hours >= 48 else f"{p.wall_hours:.1f} h"
        lines.append(f"  {p.gpus:>5} {p.gpu_hours:>10,.0f} {wall:>10} {fmt_bytes(p.ram_per_process_bytes):>12} "
                     f"{fmt_bytes(p.gpu_memory_bytes):>11} {fmt_bytes(p.disk_bytes):>10}")
    return "\n".join(lines)


def format_resources(res: PlanResources, other: PlanResources | None = None) -> list[str]:
    """The plan's lines on memory and disk: the peak per process and where it comes from, disk by
    kind; with ``other`` (the plan under the other reference mode) what that choice would cost."""
    plan = res.plan
    ev = plan.experiment.evaluation
    peak = max(res.runs.values(), key=lambda r: r.peak_ram_bytes, default=None)
    lines = []
    if peak is not None:
        parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in peak.ram_parts.items())
        lines.append(f"peak RAM per process ≈ {fmt_bytes(res.peak_ram_bytes)} ({parts}; batch "
                     f"{plan.experiment.sampling.batch_size}, independent of n_samples; on a GPU the networks and the "
                     "batch are GPU memory)")
    pngs = sum(r.pngs for r in res.runs.values())
    kinds = {"PNGs": sum(r.png_bytes for r in res.runs.values()),
             "store rows": sum(r.store_bytes for r in res.runs.values()),
             "reference features": res.reference_feature_bytes,
             "fine-tune checkpoints": res.finetune_disk_bytes,
             "transient spills at their peak": res.transient_peak_bytes}
    shown = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in kinds.items() if v)
    lines.append(f"disk ≈ {fmt_bytes(res.total_disk_bytes)} ({shown}; save_samples = {ev.save_samples!r}: "
                 f"{pngs:,} PNGs)")
    if other is not None:
        by = {r.reference_mode: r for r in (res, other)}
        spill, sample = by["spill"], by["sample"]
        extra = sample.total_flops - spill.total_flops
        lines.append(f"uncached references (--reference, {res.reference_mode} above): spill holds up to "
                     f"{fmt_bytes(spill.reference_spill_peak_bytes)} of float32 batches on disk at once; sample "
                     f"holds none and samples {_fmt_flops(extra)} more "
                     f"(+{extra / max(spill.total_flops, 1.0):.0%} of the runs' and fine-tunes' compute"
                     + ("" if plan.experiment.embedded else
                        f", {extra / (ASSUMED_GPU_TFLOPS * 1e12 * 3600):,.0f} A100-class GPU-hours") + ")")
    return lines


def _fmt_flops(x: float) -> str:
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if x >= scale:
            return f"{x / scale:.1f} {unit}"
    return f"{x / 1e6:.1f} MFLOP"


def _available_ram() -> float | None:
    """MemAvailable of this machine (Linux), else ``None``."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024.0
    except (OSError, ValueError, IndexError):
        return None
    return None


def _free_disk(folder: Path) -> float:
    import shutil

    folder = Path(folder).resolve()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return float(shutil.disk_usage(folder).free)


def machine_problems(res: PlanResources, store_folder: Path, *, done: set[str] = frozenset(), processes: int = 1,
                     gpu: bool = False, available_ram: float | None = None,
                     free_disk: float | None = None) -> list[str]:
    """Why this machine cannot hold the plan's runs that are not yet ``done``: RAM (the peak per
    process × ``processes`` on this node, against MemAvailable; on a GPU only what passes through
    host RAM: runtime, networks and metric state) and free disk at ``store_folder``. Empty when it
    can. ``available_ram`` / ``free_disk`` override the machine's (tests)."""
    todo = [i for i in res.runs if i not in done]
    if not todo:
        return []
    out = []
    ram = available_ram if available_ram is not None else _available_ram()
    worst = max((res.runs[i] for i in todo), key=lambda r: r.peak_ram_bytes)
    need = worst.peak_ram_bytes - (worst.ram_parts["batch"] if gpu else 0.0)
    if ram is not None and need * processes > ram:
        per = f" × {processes} processes on this node" if processes > 1 else ""
        out.append(f"RAM: a run needs ≈ {fmt_bytes(need)} per process{per}, and this machine has "
                   f"{fmt_bytes(ram)} available; lower sampling.batch_size (the batch is "
                   f"{fmt_bytes(worst.ram_parts['batch'])} of it), run fewer processes per node, or use a larger machine")
    disk = res.disk_of(todo)
    free = free_disk if free_disk is not None else _free_disk(store_folder)
    if disk > free:
        spill = (f", --reference sample spills no reference batches ({fmt_bytes(res.reference_spill_peak_bytes)})"
                 if res.reference_spill_peak_bytes else "")
        out.append(f"disk: the {len(todo)} run(s) to do need ≈ {fmt_bytes(disk)} under {store_folder}, which has "
                   f"{fmt_bytes(free)} free; evaluation.save_samples = \"none\" or a count keeps fewer PNGs (they are "
                   f"{fmt_bytes(sum(res.runs[i].png_bytes for i in todo))}){spill}; or free space, or point --store "
                   "elsewhere")
    return out
