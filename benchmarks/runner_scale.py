"""The experiment runner past a thousand samples: peak RSS, wall time, store size and disk per n.

    uv run --no-sync python benchmarks/runner_scale.py                     # embedded 1k/4k/16k + SD-shaped 256²
    uv run --no-sync python benchmarks/runner_scale.py --counts 1000 4000 --sd-counts 16 64
    uv run --no-sync python benchmarks/runner_scale.py --no-sd --out runs/bench/scale-a

Each measurement is one ``fcr-eval``-style run in a child process of its own (a fresh store in its
own folder under ``--out``): the runner (:func:`fcr_eval.run.runner.run_experiment`), then the
report, as ``fcr-eval run`` does. The child records its peak RSS (``VmHWM``) after the runner and
again after the report; the parent takes the child's ``ru_maxrss`` from ``os.wait4`` (its whole
life, children included). Per case: wall time, the store file's size, the case folder's size on
disk (store + run folders + PNGs, what ``du`` counts), the PNGs written, and the planned peak RAM
and disk of :mod:`fcr_eval.plan.resources` next to the measured ones.

Cases (one variation, a cached sampler, so every run samples its images *and* the uncached
reference from the same x_T: the paired metrics and both image sets are in play):

* **embedded**: the embedded family at 28² (Fashion-MNIST prompts, MiniLM text states, the
  shipped data), with its tiny UNet by default (``--model embedded-tiny``: the runner's own work,
  not the UNet's FLOPs, is what grows with n; ``--model embedded`` samples with the shipped 1.3M
  UNet, ~0.2 s per sample on a loaded 2-core machine), DDIM with ``--steps`` steps (default 2) and
  FD with stride = steps (one key step), no guidance, EfficientNet-Lite0 features at 32², FD / KID /
  precision-recall against a fixed 1,000 real images, at n = ``--counts`` (1,000, 4,000, 16,000).
* **sd**: a Stable Diffusion pipeline of tiny random parts saved in diffusers layout, with an
  f = 8 VAE (4 levels, as SD's) so that ``--sd-resolution`` (256²) images come from 32² latents,
  the stand-in Inception network (2048-d, clean-fid's protocol) and FID / KID / precision-recall
  against 32 real images, at n = ``--sd-counts`` (32 and 256).

A thread of the parent also polls the child's ``RssAnon`` (its own memory) and ``RssFile`` (mapped
files: libraries and memory-mapped spills, pages the kernel may drop) every 0.5 s, so a peak says
which it is. Prints a table with the ratios that matter (peak RSS at the largest n over the smallest: the
streaming runner's target is ≤ 1.25), and writes ``results.json`` and ``results.md`` to ``--out``
(a new folder: a folder that already holds results is refused, since the runner would resume
from them instead of measuring). One torch thread per child (``--threads``), ``nice`` is up to you.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cli import UserError, output_folder, parser, run  # noqa: E402
from fcr_common.cli_errors import int_at_least  # noqa: E402

WRITES = ("results.json", "results.md")
#: The target of issue 23: peak RSS at 16,000 samples within this factor of 1,000 (embedded).
FLAT_RATIO = 1.25


# ---------------------------------------------------------------------------------------------
# The experiments measured
# ---------------------------------------------------------------------------------------------


def _sampling(n: int, steps: int, batch: int, resolution: int) -> str:
    """The cases' [sampling] table and their one variation (FD with one key step): a TOML table
    may come in any order after the top-level keys."""
    return f"""
[sampling]
scheduler = "ddim"
num_inference_steps = {steps}
guidance_scale = 1.0
resolution = {resolution}
batch_size = {batch}
n_samples = {n}
eval_prompts = "prompts"

[[variations]]
id = "fd-{steps}"
sampler = "fd"
stride = {steps}
"""


def embedded_toml(n: int, steps: int, batch: int, model: str) -> str:
    return f"""
seeds = [0]
[experiment]
id = "scale-embedded"
description = "runner_scale: {model} 28² model, {steps}-step DDIM, FD stride {steps}, n = {n}"

[[models]]
id = "embedded"
source = "{model}"
resolution = 28

[[datasets]]
id = "prompts"
kind = "fashion-mnist"
role = "eval"
prompt_template = "a photo of a {{}}"

[[datasets]]
id = "real"
kind = "fashion-mnist"
role = "reference"
split = "test"

{_sampling(n, steps, batch, 28)}
[evaluation]
metrics = ["fd", "kid", "precision_recall"]
feature_extractor = "efficientnet_lite0"
feature_image_size = 32
reference = "real"
n_reference = 1000
kid_subset_size = 500
"""


def sd_toml(root: Path, n: int, steps: int, batch: int, resolution: int, n_reference: int) -> str:
    return f"""
seeds = [0]
[experiment]
id = "scale-sd"
description = "runner_scale: tiny random SD parts, f = 8 VAE, {resolution}², {steps}-step DDIM, FD stride {steps}, n = {n}"

[[models]]
id = "sd"
source = "{root / 'sd'}"
resolution = {resolution}

[[datasets]]
id = "prompts"
kind = "coco"
role = "eval"
path = "{root / 'coco' / 'captions.json'}"
images_dir = "{root / 'coco' / 'images'}"

[[datasets]]
id = "real"
kind = "coco"
role = "reference"
path = "{root / 'coco' / 'captions.json'}"
images_dir = "{root / 'coco' / 'images'}"

{_sampling(n, steps, batch, resolution)}
[evaluation]
metrics = ["fid", "kid", "precision_recall"]
feature_extractor = "inception"
inception_weights = "{next((root / 'inception').glob('*.pt'))}"
reference = "real"
n_reference = {n_reference}
kid_subset_size = 16
"""


def write_sd_inputs(root: Path, resolution: int, n_images: int) -> None:
    """A tiny SD folder with an f = 8 VAE, a COCO-format captions file with real PNGs, and the
    stand-in Inception network (shared by the SD cases)."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from fcr_eval.testing import save_stand_in_inception
    from fcr_sample.testing import tiny_sd_components
    from PIL import Image, ImageDraw

    comps = tiny_sd_components(seed=0, sample_size=resolution // 8)
    torch.manual_seed(1)
    comps["vae"] = AutoencoderKL(  # SD's four levels (f = 8) with narrow channels
        block_out_channels=(8, 8, 16, 16), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=4, sample_size=resolution).eval()
    StableDiffusionPipeline(**comps).save_pretrained(root / "sd")
    img_dir = root / "coco" / "images"
    img_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    words = ["red", "blue", "green", "yellow", "black", "white", "small", "large"]
    things = ["square", "circle", "car", "cat", "boat", "tree", "house", "dog"]
    images, anns = [], []
    for i in range(n_images):
        im = Image.new("RGB", (resolution + 8 * (i % 5), resolution), tuple(int(x) for x in rng.integers(0, 255, 3)))
        ImageDraw.Draw(im).ellipse((10, 10, resolution // 2, resolution // 2),
                                   fill=tuple(int(x) for x in rng.integers(0, 255, 3)))
        name = f"{i:012d}.png"
        im.save(img_dir / name)
        images.append({"id": i, "file_name": name})
        anns.append({"id": i, "image_id": i, "caption": f"a {words[i % 8]} {things[(i // 8) % 8]} number {i}"})
    (root / "coco" / "captions.json").write_text(json.dumps({"images": images, "annotations": anns}))
    save_stand_in_inception(root / "inception")


# ---------------------------------------------------------------------------------------------
# One measurement (a child process)
# ---------------------------------------------------------------------------------------------


def _vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(toml: str, store: str, threads: int, out: str) -> int:
    """The measured process: the runner, then the report; peak RSS after each to ``out``."""
    import torch
    from fcr_eval.report.report import report
    from fcr_eval.run.runner import RunnerOptions, run_experiment
    from fcr_eval.spec.experiment import load_experiment

    torch.set_num_threads(threads)
    exp = load_experiment(toml)
    t0 = time.perf_counter()
    outcome = run_experiment(exp, RunnerOptions(store=Path(store), threads=threads, device="cpu", progress=False))
    runner_s, runner_mb = time.perf_counter() - t0, _vm_hwm_mb()
    report(exp, Path(store), plots=False)
    Path(out).write_text(json.dumps({"ok": outcome.ok, "runner_s": runner_s, "runner_peak_mb": runner_mb,
                                     "report_s": time.perf_counter() - t0 - runner_s,
                                     "with_report_peak_mb": _vm_hwm_mb(),
                                     "failed": [f.error for f in outcome.failed]}))
    return 0 if outcome.ok else 1


class _RssParts:
    """Polls a process's ``RssAnon`` (its own memory) and ``RssFile`` (mapped files: libraries,
    memory-mapped spills; the kernel can drop clean ones) every 0.5 s: which part a peak is."""

    def __init__(self, pid: int) -> None:
        import threading

        self.pid, self.max = pid, {"RssAnon": 0, "RssFile": 0}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._done.wait(0.5):
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    key = line.split(":")[0]
                    if key in self.max:
                        self.max[key] = max(self.max[key], int(line.split()[1]))
            except (OSError, ValueError, IndexError):
                return

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def peaks(self) -> dict:
        return {"peak_anon_mb": self.max["RssAnon"] / 1024, "peak_file_mb": self.max["RssFile"] / 1024}


def _du_bytes(path: Path) -> int:
    """Bytes on disk (allocated blocks, as ``du``) under ``path``."""
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


def measure(case: str, n: int, toml_text: str, folder: Path, threads: int) -> dict:
    folder.mkdir(parents=True)
    toml = folder / "experiment.toml"
    toml.write_text(toml_text)
    store = folder / "fcr.duckdb"
    child_out = folder / "child.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    t0 = time.perf_counter()
    with open(folder / "child.log", "w") as log:
        proc = subprocess.Popen([sys.executable, __file__, "--child", str(toml), str(store), str(threads),
                                 str(child_out)], stdout=log, stderr=subprocess.STDOUT, env=env)
        parts = _RssParts(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)
        parts.stop()
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0 or not child_out.is_file():
        tail = (folder / "child.log").read_text().splitlines()[-15:]
        raise RuntimeError(f"{case} n={n} failed (exit {code}); log {folder / 'child.log'}:\n" + "\n".join(tail))
    got = json.loads(child_out.read_text())
    planned = _planned(toml, store)
    return {"case": case, "n": n, "wall_s": wall, **got, "max_rss_mb": usage.ru_maxrss / 1024, **parts.peaks(),
            "store_mb": store.stat().st_size / 2**20, "disk_mb": _du_bytes(folder) / 2**20,
            "pngs": sum(1 for _ in folder.rglob("*.png")), **planned}


def _planned(toml: Path, store: Path) -> dict:
    """What the plan says the run needs (peak RAM per process, disk), for the table."""
    try:
        from fcr_eval.plan.planner import make_plan
        from fcr_eval.plan.resources import plan_resources
        from fcr_eval.spec.experiment import load_experiment
    except ImportError:  # a checkout without the resource model
        return {}
    plan = make_plan(load_experiment(str(toml)), results_dir=store.parent, calibrate=False)
    res = plan_resources(plan)
    return {"planned_ram_mb": res.peak_ram_bytes / 2**20, "planned_disk_mb": res.total_disk_bytes / 2**20}


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def _machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from fcr_common.provenance import code_version

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "code": code_version(),
            "load_start": os.getloadavg()}


def table(rows: list[dict]) -> str:
    lines = ["| case | n | wall s | peak RSS runner MB | peak RSS run+report MB | of it anon / file MB | planned RAM MB | "
             "store MB | disk MB | planned disk MB | PNGs |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        plan_ram = f"{r['planned_ram_mb']:.0f}" if "planned_ram_mb" in r else "-"
        plan_disk = f"{r['planned_disk_mb']:.1f}" if "planned_disk_mb" in r else "-"
        parts = f"{r['peak_anon_mb']:.0f} / {r['peak_file_mb']:.0f}" if "peak_anon_mb" in r else "-"
        lines.append(f"| {r['case']} | {r['n']:,} | {r['wall_s']:.0f} | {r['runner_peak_mb']:.0f} | "
                     f"{r['with_report_peak_mb']:.0f} | {parts} | {plan_ram} | {r['store_mb']:.1f} | {r['disk_mb']:.1f} | "
                     f"{plan_disk} | {r['pngs']:,} |")
    return "\n".join(lines)


def ratios(rows: list[dict]) -> list[str]:
    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        rs = sorted((r for r in rows if r["case"] == case), key=lambda r: r["n"])
        if len(rs) < 2:
            continue
        lo, hi = rs[0], rs[-1]
        k = hi["runner_peak_mb"] / lo["runner_peak_mb"]
        verdict = ("within" if k <= FLAT_RATIO else "OVER") + f" the {FLAT_RATIO}× target"
        out.append(f"{case}: peak RSS (runner) n={hi['n']:,} / n={lo['n']:,} = {k:.2f}× ({verdict}); "
                   f"with the report {hi['with_report_peak_mb'] / lo['with_report_peak_mb']:.2f}×; "
                   f"wall {hi['wall_s'] / lo['wall_s']:.1f}× for {hi['n'] / lo['n']:.0f}× the samples; "
                   f"disk {hi['disk_mb'] / lo['disk_mb']:.1f}×; "
                   f"+{(hi['runner_peak_mb'] - lo['runner_peak_mb']) / (hi['n'] - lo['n']) * 1024:.1f} KiB RSS per "
                   "extra sample")
    return out


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--counts", type=int_at_least(2), nargs="+", default=[1000, 4000, 16000],
                   help="embedded sample counts (default %(default)s)")
    p.add_argument("--sd-counts", type=int_at_least(2), nargs="+", default=[32, 256],
                   help="SD-shaped sample counts (default %(default)s)")
    p.add_argument("--sd-resolution", type=int_at_least(64), default=256, help="SD image side (default 256)")
    p.add_argument("--steps", type=int_at_least(2), default=2, help="sampler steps (FD stride = steps; default 2)")
    p.add_argument("--model", choices=("embedded-tiny", "embedded"), default="embedded-tiny",
                   help="the embedded family's UNet: its tiny one (default; sampling then costs little and the "
                        "runner's own work shows) or the shipped 1.3M-parameter one (~20× the wall time here)")
    p.add_argument("--batch", type=int_at_least(1), default=100, help="embedded batch size (default 100)")
    p.add_argument("--sd-batch", type=int_at_least(1), default=8, help="SD batch size (default 8)")
    p.add_argument("--threads", type=int_at_least(1), default=1, help="torch threads per child (default 1)")
    p.add_argument("--no-sd", action="store_true", help="skip the SD-shaped cases")
    p.add_argument("--no-embedded", action="store_true", help="skip the embedded cases")
    p.add_argument("--label", default="", help="a word for the report's title (e.g. the branch measured)")
    p.add_argument("--out", type=Path, default=None, help="a new folder for the stores and the report")
    a = p.parse_args(argv)
    if a.sd_resolution % 8:
        raise UserError(f"--sd-resolution {a.sd_resolution} is not a multiple of 8 (the VAE's factor); pass e.g. 256")
    if a.no_sd and a.no_embedded:
        raise UserError("--no-sd and --no-embedded leave nothing to measure; drop one")
    out = output_folder(a.out, "runner-scale", WRITES)
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out} already holds files: the runner would resume from its stores instead of "
                        "measuring; pass a new folder")
    out.mkdir(parents=True, exist_ok=True)
    info = {"machine": _machine(), "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
            "label": a.label}
    cases = []
    if not a.no_embedded:
        cases += [(f"{a.model} 28²", n, embedded_toml(n, a.steps, a.batch, a.model), out / f"embedded-{n}")
                  for n in sorted(a.counts)]
    if not a.no_sd:
        sd_root = out / "sd-inputs"
        n_ref = 32
        print(f"writing the tiny SD folder (f = 8 VAE, {a.sd_resolution}²) and {n_ref} COCO-format images",
              file=sys.stderr)
        write_sd_inputs(sd_root, a.sd_resolution, n_ref)
        cases += [(f"SD-shaped {a.sd_resolution}²", n, sd_toml(sd_root, n, a.steps, a.sd_batch, a.sd_resolution,
                                                              n_ref), out / f"sd-{n}") for n in sorted(a.sd_counts)]
    rows = []
    for i, (case, n, text, folder) in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {case} n={n:,} … (load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
        rows.append(measure(case, n, text, folder, a.threads))
        r = rows[-1]
        print(f"      {r['wall_s']:.0f} s, peak RSS {r['runner_peak_mb']:.0f} MB (runner) / "
              f"{r['with_report_peak_mb']:.0f} MB (+report), disk {r['disk_mb']:.1f} MB", file=sys.stderr, flush=True)
        (out / "results.json").write_text(json.dumps({**info, "rows": rows}, indent=2))  # a stop loses nothing
    info["machine"]["load_end"] = os.getloadavg()
    text = "\n".join([f"# runner_scale{f' ({a.label})' if a.label else ''}", "",
                      f"machine: {info['machine']['cpu']}, {info['machine']['cores']} cores; load average "
                      f"{'/'.join(f'{x:.2f}' for x in info['machine']['load_start'])} at the start, "
                      f"{'/'.join(f'{x:.2f}' for x in info['machine']['load_end'])} at the end; code "
                      f"{info['machine']['code']}; {a.threads} torch thread(s) per run", "",
                      table(rows), "", *[f"- {line}" for line in ratios(rows)]])
    (out / "results.json").write_text(json.dumps({**info, "rows": rows}, indent=2))
    (out / "results.md").write_text(text + "\n")
    print(text)
    print(f"\nresults: {out / 'results.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        sys.exit(child(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]))
    sys.exit(run(main))
