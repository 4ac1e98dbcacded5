"""exp-1's quick profile through the runner on SD-v1.5-architecture random weights: seconds per
image of each stage (sampling, uncached reference, features, metrics, store, ...).

    python benchmarks/exp1_stages.py --device cuda                    # on a GPU (benchmarks/gpu.sh runs it)
    python benchmarks/exp1_stages.py --device cpu --tiny              # the smoke path: tiny parts, 64², CPU

What runs is ``experiments/exp-1-main-ablation.toml`` at its ``quick`` profile — its sampler (DDIM-50,
CFG 7.5, 512², batch 16), evaluation table (every metric, timing batch sizes and repeats, σ²_Δ
over its quick sample count, CLIP drift) and its base-weight variations (FD-5 and FD-10: the
fine-tuned ones need 500-step fine-tunes of an 860M UNet, far past a lent GPU's minutes) — with
``--samples`` prompts instead of 1,000 and the parts built here, since nothing can be downloaded:

* an SD v1.5 pipeline folder of random weights: the 859.5M UNet (``fcr_sample.testing.sd15_unet_config``),
  SD's four-level VAE, a 12-layer CLIP text encoder (ViT-L/14 text tower) with a character-level
  tokenizer (speed does not depend on weight values: design.md §3);
* a COCO-format captions file with ``--samples`` real PNGs (the prompts, the reference images);
* Inception-v3 (torchvision's architecture, random weights, clean-fid's TorchScript interface)
  when torchvision is there, else the stand-in network (then the features stage is not
  Inception's cost, and the table says so);
* a random CLIP ViT-L/14 (CLIPScore, CLIP drift).

Stage times are exclusive (a stage nested in another counts once, in the inner one), measured by
wrapping the runner's functions in this process: ``sampling`` (the run's cached sampling),
``reference`` (the uncached reference batches), ``features`` (every feature extraction),
``metrics`` (per-sample paired values and set-level metrics), ``σ²_Δ``, ``cost`` (timing repeats,
FLOPs, peak memory), ``PNGs``, ``batch files`` (spills and per-batch records), ``store`` (the run's
transaction), ``other`` (the rest of the runner: loading, σ²_Δ inputs, ...). s/img divides by the
samples of all runs. Markdown on stdout and in ``--out/exp1-stages.md``, JSON beside it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cli import UserError, output_folder, parser, run  # noqa: E402
from fcr_common.cli_errors import int_at_least  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXP1 = ROOT / "experiments" / "exp-1-main-ablation.toml"
WRITES = ("exp1-stages.md", "exp1-stages.json")
BASE_VARIATIONS = ("fd-5-baseline", "fd-10-baseline")


# ---------------------------------------------------------------------------------------------
# Parts
# ---------------------------------------------------------------------------------------------


def _tokenizer(folder: Path, max_length: int):
    from fcr_sample.testing import write_tiny_clip_vocab
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    write_tiny_clip_vocab(folder)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def write_sd_folder(folder: Path, tiny: bool, resolution: int) -> None:
    """A StableDiffusionPipeline folder of random weights: SD v1.5's architecture, or tiny parts."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from fcr_sample.testing import sd15_unet_config, tiny_scheduler, tiny_sd_components
    from transformers import CLIPTextConfig, CLIPTextModel

    if tiny:
        StableDiffusionPipeline(**tiny_sd_components(seed=0, sample_size=resolution // 2)).save_pretrained(folder)
        return
    torch.manual_seed(0)
    tokenizer = _tokenizer(folder.parent / "sd-vocab", 77)  # the pipeline saves its own copy
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)).eval()
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=32, sample_size=resolution, scaling_factor=0.18215).eval()
    pipe = StableDiffusionPipeline(unet=UNet2DConditionModel(**sd15_unet_config()).eval(), vae=vae, text_encoder=text,
                                   tokenizer=tokenizer, scheduler=tiny_scheduler("ddim"), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)


def write_coco(root: Path, n: int, resolution: int) -> Path:
    """``n`` real PNGs (coloured shapes) with one caption each, in COCO's captions format."""
    import numpy as np
    from PIL import Image, ImageDraw

    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(n):
        im = Image.new("RGB", (resolution, resolution), tuple(int(x) for x in rng.integers(0, 255, 3)))
        ImageDraw.Draw(im).ellipse((8, 8, resolution // 2, resolution // 2),
                                   fill=tuple(int(x) for x in rng.integers(0, 255, 3)))
        im.save(root / "images" / f"{i:012d}.png")
        images.append({"id": i, "file_name": f"{i:012d}.png"})
        anns.append({"id": i, "image_id": i, "caption": f"a photo of object {i} on a plain background"})
    path = root / "captions.json"
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return path


def write_inception(folder: Path, tiny: bool) -> tuple[Path, str]:
    """Inception-v3's architecture with clean-fid's TorchScript interface (``layers`` → 2048-d
    pool features, ``output`` → 1008 logits), random weights; the stand-in when torchvision is
    missing or ``tiny``. Returns the file and what it is."""
    from fcr_eval.testing import save_stand_in_inception

    try:
        if tiny:
            raise ImportError
        import torch
        from torch import nn
        from torchvision.models import inception_v3
    except ImportError:
        return save_stand_in_inception(folder), "stand-in CNN (not Inception's cost)"
    net = inception_v3(weights=None, aux_logits=False, init_weights=False)
    names = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
             "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
             "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool")

    class Inception(nn.Module):  # the interface of clean-fid's inception-2015-12-05.pt
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.Sequential(*(getattr(net, k) for k in names))
            self.output = nn.Linear(2048, 1008)

        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            x = nn.functional.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False)
            features = self.layers((x - 128) / 128).flatten(1)
            return features if return_features else self.output(features)

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "inception-2015-12-05.pt"
    torch.jit.script(Inception().eval()).save(str(path))
    return path, "Inception-v3 architecture (torchvision), random weights"


def write_clip(folder: Path, tiny: bool) -> Path:
    from fcr_eval.testing import save_tiny_clip

    if tiny:
        return save_tiny_clip(folder)
    # CLIP ViT-L/14's towers (CLIPScore's model), random weights
    return save_tiny_clip(folder, image_size=224, max_length=77, patch_size=14, projection_dim=768,
                          text_tower=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                          num_attention_heads=12),
                          vision_tower=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                            num_attention_heads=16))


def experiment_toml(root: Path, n: int, tiny: bool, inception: Path, clip: Path, coco: Path) -> str:
    """exp-1's file at its quick profile with the local parts, ``n`` prompts and its base variations
    (the fine-tuned ones need fine-tunes); tiny: 64², 4 steps, few σ²_Δ samples."""
    import tomllib

    raw = tomllib.loads(EXP1.read_text())
    quick = raw["profiles"]["quick"]
    ev = {**raw["evaluation"], **quick.get("evaluation", {})}
    sampling = {**raw["sampling"], **quick.get("sampling", {})}
    if tiny:
        sampling.update(num_inference_steps=4, resolution=64, batch_size=4)
        ev.update(sigma2_samples=4, sigma2_delta_max=2, timing_batch_sizes=[1, 2], timing_repeats=1,
                  clip_drift_samples=4, kid_subset_size=4)
    sampling["n_samples"] = n
    ev.update(inception_weights=str(inception), clip_model=str(clip), n_reference=n,
              kid_subset_size=min(int(ev.get("kid_subset_size", 1000)), n // 2),
              sigma2_samples=min(int(ev["sigma2_samples"]), n), clip_drift_samples=min(int(ev["clip_drift_samples"]), n))
    ev["metrics"] = [m for m in ev["metrics"] if m != "finetune_compute"]
    strides = {"fd-5-baseline": 5 if not tiny else 2, "fd-10-baseline": 10 if not tiny else 4}

    def value(x):
        return json.dumps(x) if not isinstance(x, bool) else str(x).lower()

    lines = ["seeds = [0]", "[experiment]", 'id = "exp-1-quick-stages"',
             'description = "exp-1 quick profile, base variations, SD-v1.5 architecture with random weights"',
             "[[models]]", 'id = "sd15"', f'source = "{root / "sd"}"', f"resolution = {sampling['resolution']}"]
    for role, ds in (("eval", "coco-val"), ("reference", "coco-val-images")):
        lines += ["[[datasets]]", f'id = "{ds}"', 'kind = "coco"', f'role = "{role}"', f'path = "{coco}"',
                  f'images_dir = "{coco.parent / "images"}"']
    sampling["eval_prompts"] = "coco-val"
    ev["reference"] = "coco-val-images"
    lines += ["[sampling]", *(f"{k} = {value(v)}" for k, v in sampling.items())]
    lines += ["[evaluation]", *(f"{k} = {value(v)}" for k, v in ev.items())]
    for vid in BASE_VARIATIONS:
        lines += ["[[variations]]", f'id = "{vid}"', 'sampler = "fd"', f"stride = {strides[vid]}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Stage timers
# ---------------------------------------------------------------------------------------------


class StageClock:
    """Exclusive seconds per stage: a wrapped call's time minus the wrapped calls inside it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._stack: list[list] = []  # [stage, start, nested seconds]

    @contextmanager
    def stage(self, name: str):
        sync()
        self._stack.append([name, time.perf_counter(), 0.0])
        try:
            yield
        finally:
            sync()
            name, t0, nested = self._stack.pop()
            total = time.perf_counter() - t0
            self.seconds[name] += total - nested
            if self._stack:
                self._stack[-1][2] += total

    def current(self) -> str | None:
        return self._stack[-1][0] if self._stack else None

    def wrap(self, owner, attr: str, name: str | None = None, inherit: tuple[str, ...] = ()) -> None:
        """Time ``owner.attr`` as stage ``name``; inside a stage in ``inherit``, as that stage."""
        fn = getattr(owner, attr)

        def timed(*args, **kwargs):
            stage = self.current() if self.current() in inherit else name
            with self.stage(stage):
                return fn(*args, **kwargs)

        setattr(owner, attr, timed)


def sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


#: What is timed: (module, attribute — ``Class.method`` for a method —, stage, stages it inherits).
TIMED = (
    ("fcr_eval.run.runner", "_reference_batch", "reference", ()),
    ("fcr_eval.run.runner", "sample_rows", "sampling", ("reference",)),
    ("fcr_eval.metrics.extractors", "FeatureExtractor.extract", "features", ()),
    ("fcr_eval.run.runner", "evaluate_batch", "metrics", ()),
    ("fcr_eval.run.runner", "run_metrics", "metrics", ()),
    ("fcr_eval.run.runner", "_feature_variance", "σ²_Δ", ()),
    ("fcr_eval.run.runner", "_measure_cost", "cost", ()),
    ("fcr_eval.run.runner", "save_samples", "PNGs", ()),
    ("fcr_eval.run.batches", "RunBatches.write", "batch files", ()),
    ("fcr_eval.run.batches", "RunBatches.spill", "batch files", ()),
    ("fcr_eval.run.batches", "ReferenceSpill.write", "batch files", ()),
    ("fcr_eval.run.batches", "ReferenceSpill.read", "batch files", ()),
    ("fcr_eval.store", "ResultsStore.write_run", "store", ()),
)


def timed_targets() -> list[tuple[object, str, str, tuple[str, ...]]]:
    """(owner, attribute, stage, inherit) of :data:`TIMED`; an AttributeError names a function the
    runner no longer has."""
    import importlib

    out = []
    for module, path, stage, inherit in TIMED:
        owner = importlib.import_module(module)
        *classes, attr = path.split(".")
        for c in classes:
            owner = getattr(owner, c)
        getattr(owner, attr)
        out.append((owner, attr, stage, inherit))
    return out


def instrument(clock: StageClock) -> None:
    for owner, attr, stage, inherit in timed_targets():
        clock.wrap(owner, attr, stage, inherit)


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--tiny", action="store_true", help="tiny random parts at 64², 4 steps: the CPU smoke path")
    p.add_argument("--samples", type=int_at_least(8), default=48, help="prompts per run (default 48: 3 batches)")
    p.add_argument("--threads", type=int_at_least(1), default=None, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=None, help="a new folder for the parts, the store and the report")
    a = p.parse_args(argv)
    import torch

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {a.device}: torch sees no CUDA GPU here; pass --device cpu --tiny for the smoke path")
    if a.device == "cpu" and not a.tiny:
        raise UserError("--device cpu without --tiny samples an 860M UNet at 512² for hours; add --tiny")
    out = output_folder(a.out, "exp1-stages", WRITES)
    if out.is_dir() and any(p for p in out.iterdir() if p.name not in WRITES):
        raise UserError(f"--out {out} holds files of an earlier run (the runner would resume from its store); "
                        "pass a new folder")
    if a.threads:
        torch.set_num_threads(a.threads)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    resolution = 64 if a.tiny else 512
    write_sd_folder(out / "sd", a.tiny, resolution)
    coco = write_coco(out / "coco", a.samples, resolution)
    inception, inception_what = write_inception(out / "inception", a.tiny)
    clip = write_clip(out / "clip", a.tiny)
    toml = out / "exp1-quick.toml"
    toml.write_text(experiment_toml(out, a.samples, a.tiny, inception, clip, coco))
    build_s = time.perf_counter() - t0

    from fcr_eval.run.runner import RunnerOptions, run_experiment
    from fcr_eval.spec.experiment import load_experiment

    exp = load_experiment(str(toml))
    clock = StageClock()
    instrument(clock)
    t1 = time.perf_counter()
    with clock.stage("other"):
        outcome = run_experiment(exp, RunnerOptions(store=out / "fcr.duckdb", device=a.device, progress=False))
    wall = time.perf_counter() - t1
    if not outcome.ok:
        raise UserError(f"a run failed: {outcome.failed[0].error} (traceback in {outcome.failed[0].run_dir})")
    images = a.samples * len(exp.variations)
    device = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    order = ("sampling", "reference", "features", "metrics", "σ²_Δ", "cost", "PNGs", "batch files", "store", "other")
    rows = [(k, clock.seconds.get(k, 0.0)) for k in order]
    text = [f"# exp-1 quick profile, stage by stage{' (--tiny: tiny parts on CPU, not figures)' if a.tiny else ''}",
            "", f"device {device}, torch {torch.__version__}; {len(exp.variations)} runs ({', '.join(BASE_VARIATIONS)}) × "
            f"{a.samples} samples at {resolution}², DDIM-{exp.sampling.num_inference_steps}, CFG "
            f"{exp.sampling.guidance_scale:g}, batch {exp.sampling.batch_size}, {exp.sampling.dtype}; features: "
            f"{inception_what}; parts built in {build_s:.0f} s; runner wall {wall:.0f} s", "",
            "| stage | seconds | s/img | share |", "|---|---:|---:|---:|"]
    text += [f"| {k} | {s:.1f} | {s / images:.3f} | {s / max(wall, 1e-9):.0%} |" for k, s in rows]
    md = "\n".join(text)
    (out / "exp1-stages.md").write_text(md + "\n")
    (out / "exp1-stages.json").write_text(json.dumps({"device": device, "samples": a.samples, "images": images,
                                                      "wall_s": wall, "stages": dict(rows), "tiny": a.tiny,
                                                      "features": inception_what}, indent=2))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
