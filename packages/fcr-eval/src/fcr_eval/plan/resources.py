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

Disk: the PNGs that ``evaluation.save_samples`` keeps (raw uint8 bytes, rounded up to 4 KiB
blocks: an upper bound, PNG compresses photographs), each run's spilled features (float32, for
KID and precision/recall), the per-sample rows in the store, the uncached references spilled as
float32 pixels when :data:`REFERENCE_SOURCE` is ``"spill"``, and the fine-tunes' checkpoints
(the runner keeps 2: weights + AdamW states, + EMA) and final weights.

Example:
    >>> res = plan_resources(make_plan(load_experiment("experiments/exp-1-main-ablation.toml"), calibrate=False))
    >>> res.peak_ram_bytes / 2**30, res.total_disk_bytes / 2**40
    >>> format_projection(res.projection((1, 8, 64)))
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

from fcr_eval.plan.costs import ASSUMED_GPU_TFLOPS
from fcr_eval.plan.planner import Plan, PlannedRun, reference_key, uncached_flops

__all__ = ["RunResources", "PlanResources", "Projection", "plan_resources", "run_resources", "format_projection",
           "save_samples_count", "RUNTIME_BYTES", "SD_PARAMS", "REFERENCE_SOURCE", "DEFAULT_GPUS"]

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
#: Bytes per sample in the store (per-sample metric rows, sample rows, prompts): measured by
#: benchmarks/runner_scale.py.
STORE_BYTES_PER_SAMPLE = 400
#: Where a cached run's uncached reference comes from: ``"resample"`` (sampled in the same loop,
#: no disk, the uncached compute once per run that needs it) or ``"spill"`` (float32 pixels on
#: disk once per weights × seed × setting, read back by the later runs).
REFERENCE_SOURCE = "resample"
#: Checkpoints the runner keeps per fine-tune (fcr_eval.run.finetuning: keep_checkpoints=2).
KEPT_CHECKPOINTS = 2
#: GPU counts of the projection `fcr-eval plan` prints for a real-model experiment.
DEFAULT_GPUS = (1, 8, 64)
#: float bytes per sampling dtype.
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_BLOCK = 4096


@dataclass(frozen=True)
class RunResources:
    """One run's needs. ``ram_parts`` names where the peak comes from; disk in bytes."""

    peak_ram_bytes: float
    ram_parts: dict[str, float]
    pngs: int
    png_bytes: float
    feature_bytes: float
    store_bytes: float
    reference_bytes: float  # the uncached reference spilled by this run (REFERENCE_SOURCE "spill")
    flops: float  # sampling (incl. the uncached reference when resampled) + timing + feature extraction
    parallel_flops: float  # the part that spreads over processes (the run's batches)

    @property
    def disk_bytes(self) -> float:
        return self.png_bytes + self.feature_bytes + self.store_bytes + self.reference_bytes


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
    time), disk adds up (runs, reference features, fine-tune checkpoints)."""

    plan: Plan
    runs: dict[str, RunResources]
    finetune_disk_bytes: float
    reference_feature_bytes: float
    notes: list[str] = field(default_factory=list)

    @property
    def peak_ram_bytes(self) -> float:
        return max((r.peak_ram_bytes for r in self.runs.values()), default=RUNTIME_BYTES)

    @property
    def total_disk_bytes(self) -> float:
        return sum(r.disk_bytes for r in self.runs.values()) + self.finetune_disk_bytes + self.reference_feature_bytes

    def disk_of(self, run_ids) -> float:
        """Disk of the named runs only (what is left to do), plus everything not per run."""
        return sum(self.runs[i].disk_bytes for i in run_ids) + self.finetune_disk_bytes + self.reference_feature_bytes

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
                batches = math.ceil(r.n_samples / _batch_size(plan))
                rounds = math.ceil(batches / g)
                wall += (res.parallel_flops * rounds / batches + (res.flops - res.parallel_flops)) / rate
            total = ft_flops + serial_eval + sum(x.flops for x in self.runs.values())
            out.append(Projection(g, tflops, total / rate / 3600, wall / 3600, self.host_ram_bytes,
                                  self.gpu_memory_bytes, self.total_disk_bytes))
        return out

    @property
    def host_ram_bytes(self) -> float:
        """Peak host RAM of a process whose networks and batches are on a GPU."""
        return max((r.peak_ram_bytes - r.ram_parts["batch"] for r in self.runs.values()), default=RUNTIME_BYTES)

    @property
    def gpu_memory_bytes(self) -> float:
        """Peak GPU memory of a process: its networks and one batch's working set."""
        return max((r.ram_parts["networks"] + r.ram_parts["batch"] for r in self.runs.values()), default=0.0)


def _batch_size(plan: Plan) -> int:
    return int(plan.experiment.sampling.batch_size)


def save_samples_count(save_samples, n: int) -> int:
    """How many of a run's ``n`` samples are written as PNGs: ``"all"`` / ``True`` → n, ``"none"`` /
    ``False`` → 0, an integer N → the first N."""
    if save_samples is True or save_samples == "all":
        return n
    if save_samples is False or save_samples is None or save_samples == "none":
        return 0
    if isinstance(save_samples, int):
        return max(0, min(int(save_samples), n))
    raise ValueError(f"save_samples = {save_samples!r}: expected all, none or a number of samples")


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
    the VAE's decoder channels (``None``: pixel space) and the image channels."""

    params: float
    unet_cfg: dict
    vae_channels: tuple[int, ...] | None
    image_channels: int


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
        return _Shapes(EMBEDDED_NETWORK_PARAMS, dict(cfg), tuple(EMOJI_VAE_CONFIG["block_out_channels"]), 3)
    if spec.embedded:
        from fcr_train.api import TINY_EMBEDDED_UNET_CONFIG
        from fcr_train.embedded import EMBEDDED_UNET_CONFIG

        cfg = TINY_EMBEDDED_UNET_CONFIG if spec.source == "embedded-tiny" else EMBEDDED_UNET_CONFIG
        return _Shapes(EMBEDDED_NETWORK_PARAMS, dict(cfg), None, int(cfg.get("out_channels", 1)))
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
    return _Shapes(params, dict(unet_cfg), vae, 3)


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


def run_resources(plan: Plan, run: PlannedRun, shapes: _Shapes | None = None, *, reference_spilled: bool = False,
                  extra_reference_flops: float = 0.0) -> RunResources:
    """Peak RAM per process, disk and compute of one planned run (see the module docstring).

    Args:
        reference_spilled: this run writes its weights × seed's uncached reference to disk.
        extra_reference_flops: uncached sampling beyond the plan's ``est_flops`` (which counts
            each reference once).
    """
    exp = plan.experiment
    ev, sampling = exp.evaluation, exp.sampling
    shapes = shapes or _model_shapes(plan, run.variation.model)
    dtype = _DTYPE_BYTES.get(sampling.dtype, 4)
    b = int(sampling.batch_size)
    cfg_rows = 2 if run.guidance_scale != 1.0 else 1
    side = int(run.resolution)
    factor = 2 ** (len(shapes.vae_channels) - 1) if shapes.vae_channels else 1
    latent = max(1, side // factor)
    pixels = shapes.image_channels * side * side
    d = _feature_dim(ev.feature_extractor) if _extracts(ev) else 0
    networks = shapes.params * dtype
    if d:
        networks += EXTRACTOR_PARAMS.get(ev.feature_extractor, 0.0) * 4
    if any(m in ev.metrics for m in ("clip_score", "clip_drift")) and not exp.embedded:
        networks += CLIP_PARAMS * 4
    unet_act = b * cfg_rows * unet_activation_elements(shapes.unet_cfg, latent) * dtype
    vae_act = b * vae_decode_elements(shapes.vae_channels, side) * dtype if shapes.vae_channels else 0.0
    images = b * pixels * 4 * IMAGE_COPIES
    fs = int(ev.feature_image_size) if d else 0
    extract = min(b, EXTRACT_BATCH) * fs * fs * (3 * 2 + EXTRACTOR_ACTIVATIONS_PER_PIXEL.get(ev.feature_extractor, 24)
                                                  ) * 4 if d else 0.0
    n_ref = int(ev.n_reference) if d else 0
    per_image_features = (d + EXTRACTOR_LOGITS.get(ev.feature_extractor, 0)) * 8 if d else 0  # float64
    metric_state = 0.0
    if d:
        metric_state = 3 * d * d * 8 + n_ref * per_image_features
        if "precision_recall" in ev.metrics:
            metric_state += 2 * KNN_TILE * max(n_ref, KNN_TILE) * 4
    parts = {"runtime": float(RUNTIME_BYTES), "networks": networks,
             "batch": max(unet_act, vae_act) + images + extract, "metric state": metric_state}
    n = int(run.n_samples)
    n_png = save_samples_count(ev.save_samples, n)
    png_each = math.ceil(side * side * shapes.image_channels / _BLOCK) * _BLOCK
    features = n * per_image_features  # the samples' features and logits, as the reference's are kept
    ref_bytes = n * pixels * 4 if reference_spilled else 0.0
    own = float(run.est_flops)  # its sampling, and its uncached reference when it samples it
    reference = float(extra_reference_flops)
    timing = float(run.est_seconds) * plan.gflops_per_s * 1e9 - own  # timing repeats (main process)
    extract_flops = _feature_flops(ev) * n
    return RunResources(
        peak_ram_bytes=sum(parts.values()), ram_parts=parts, pngs=n_png, png_bytes=float(n_png * png_each),
        feature_bytes=float(features), store_bytes=float(n * STORE_BYTES_PER_SAMPLE), reference_bytes=ref_bytes,
        flops=own + reference + max(timing, 0.0) + extract_flops, parallel_flops=own + reference + extract_flops)


def _extracts(ev) -> bool:
    from fcr_eval.spec.vocabulary import REFERENCE_METRICS

    return ev.reference is not None and any(m in ev.metrics for m in REFERENCE_METRICS if m != "sigma2_delta")


def _feature_dim(extractor: str) -> int:
    from fcr_eval.metrics.extractors import feature_dim

    return int(feature_dim(extractor) or 2048)


def _feature_flops(ev) -> float:
    from fcr_eval.plan.costs import EFFICIENTNET_LITE0_FLOPS_224

    return EFFICIENTNET_LITE0_FLOPS_224 * (ev.feature_image_size / 224) ** 2 if _extracts(ev) else 0.0


def plan_resources(plan: Plan, reference_source: str = REFERENCE_SOURCE) -> PlanResources:
    """Every run's peak RAM, disk and compute, and the plan's totals (fine-tune checkpoints,
    reference features).

    Args:
        reference_source: where a cached run's uncached reference comes from when no uncached run
            of the same weights × seed × setting provides it: ``"resample"`` — every such cached
            run samples it in its own loop (no disk; the plan's compute counts it once per key,
            this adds the others) — or ``"spill"`` — the first run of the key writes it to disk
            as float32 pixels and the later ones read it back.
    """
    if reference_source not in ("resample", "spill"):
        raise ValueError(f"reference_source = {reference_source!r}: expected resample or spill")
    shapes: dict[str, _Shapes] = {}
    by_key: dict[tuple, list[PlannedRun]] = {}
    for r in sorted(plan.runs, key=lambda r: r.sampler.cached):  # the runner's order: uncached runs first
        by_key.setdefault(reference_key(r), []).append(r)
    runs: dict[str, RunResources] = {}
    for key_runs in by_key.values():
        shared = len(key_runs) > 1 and any(r.sampler.cached for r in key_runs)
        own_reference = not key_runs[0].sampler.cached
        for i, r in enumerate(key_runs):
            model = r.variation.model
            if model not in shapes:
                shapes[model] = _model_shapes(plan, model)
            extra = 0.0
            if reference_source == "resample" and not own_reference and i > 0:
                extra = uncached_flops(r)  # sampled again in this run's loop
            runs[r.run_id] = run_resources(plan, r, shapes[model], extra_reference_flops=extra,
                                           reference_spilled=reference_source == "spill" and shared and i == 0)
    runs = {r.run_id: runs[r.run_id] for r in plan.runs}
    ev = plan.experiment.evaluation
    ref_features = ev.n_reference * (_feature_dim(ev.feature_extractor) + EXTRACTOR_LOGITS.get(
        ev.feature_extractor, 0)) * 8 if _extracts(ev) else 0.0  # results/reference/*.npz
    ft_disk = 0.0
    for f in plan.finetunes.values():
        params = (shapes.get(f.model) or _model_shapes(plan, f.model)).params
        per_param = 4 + 8 + (4 if f.ema_decay else 0)  # fp32 weights, AdamW's two moments, EMA
        ft_disk += params * (KEPT_CHECKPOINTS * per_param + 4)  # + the final UNet
    return PlanResources(plan, runs, ft_disk, float(ref_features), [f"uncached references: {reference_source}"])


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


def format_resources(res: PlanResources) -> list[str]:
    """The plan's lines on memory and disk: the peak per process and where it comes from, disk by kind."""
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
             "features": sum(r.feature_bytes for r in res.runs.values()),
             "store rows": sum(r.store_bytes for r in res.runs.values()),
             "spilled references": sum(r.reference_bytes for r in res.runs.values()),
             "reference features": res.reference_feature_bytes,
             "fine-tune checkpoints": res.finetune_disk_bytes}
    shown = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in kinds.items() if v)
    lines.append(f"disk ≈ {fmt_bytes(res.total_disk_bytes)} ({shown}; save_samples = {ev.save_samples!r}: "
                 f"{pngs:,} PNGs; {res.notes[0]})")
    return lines


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
        out.append(f"disk: the {len(todo)} run(s) to do write ≈ {fmt_bytes(disk)} under {store_folder}, which has "
                   f"{fmt_bytes(free)} free; keep fewer PNGs with evaluation.save_samples (they are "
                   f"{fmt_bytes(sum(res.runs[i].png_bytes for i in todo))}), free space, or point --store elsewhere")
    return out
