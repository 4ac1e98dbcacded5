"""The runner on a Stable Diffusion checkpoint, end to end, offline.

The checkpoint is a real ``StableDiffusionPipeline`` of tiny random parts saved in diffusers
layout; the data a tiny COCO-format captions file with real PNGs; FID uses clean-fid's Inception
protocol through a stand-in TorchScript network; CLIPScore and CLIP drift a tiny local CLIP. So
every step the researcher's SD run takes happens here: load from a folder, prompts from COCO,
reference features, FCR fine-tune with moving-FD early stopping, FD caching, CLIPScore, drift,
σ²_Δ on VAE latents, timings, the store and the report.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fcr_eval.plan.planner import make_plan
from fcr_eval.plan.validation import check_inputs
from fcr_eval.run.contexts import Prompts, StableDiffusionContext
from fcr_eval.run.runner import RunnerOptions, run_experiment
from fcr_eval.run.sampling import sample_batch
from fcr_eval.run.schedulers import make_sampling_scheduler
from fcr_eval.spec.experiment import load_experiment
from fcr_eval.store import ResultsStore
from fcr_eval.testing import save_stand_in_inception, save_tiny_clip
from fcr_sample.testing import tiny_sd_pipeline

# slow: a whole SD experiment (tiny parts) fine-tunes, samples and evaluates end to end
pytestmark = pytest.mark.slow

CAPTIONS = ["a red square on a white wall", "a blue circle in the sky", "a green field with a tree",
            "a yellow car on a road", "a black cat on a mat", "a white boat on the sea"]


def _coco(root: Path, n_images: int = 6) -> Path:
    """A COCO captions file with ``n_images`` real PNGs (coloured shapes), two captions each."""
    from PIL import Image, ImageDraw

    img_dir = root / "images"
    img_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(n_images):
        im = Image.new("RGB", (48 + 4 * i, 40), tuple(int(x) for x in rng.integers(0, 255, 3)))
        ImageDraw.Draw(im).ellipse((5, 5, 30, 30), fill=tuple(int(x) for x in rng.integers(0, 255, 3)))
        name = f"{i:012d}.png"
        im.save(img_dir / name)
        images.append({"id": i, "file_name": name})
        for k in range(2):
            anns.append({"id": 10 * i + k, "image_id": i, "caption": CAPTIONS[i % len(CAPTIONS)] + ("" if k == 0
                                                                                                   else " again")})
    path = root / "captions.json"
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return path


def _experiment(root: Path, *, extra_variations: str = "") -> Path:
    sd = root / "sd"
    tiny_sd_pipeline(seed=0, scheduler="ddim").save_pretrained(sd)
    coco = _coco(root / "coco")
    clip = save_tiny_clip(root / "clip")
    inception = save_stand_in_inception(root / "inception")
    text = f"""
seeds = [0]
[experiment]
id = "sd-tiny"
description = "SD path of the runner on tiny random parts"

[[models]]
id = "sd"
source = "{sd}"
resolution = 32
pretrain_compute_flops = 1e15

[[datasets]]
id = "coco-ft"
kind = "coco"
role = "finetune"
path = "{coco}"
images_dir = "{coco.parent / 'images'}"
resolution = 32
hflip = 0.5

[[datasets]]
id = "coco-eval"
kind = "coco"
role = "eval"
path = "{coco}"
images_dir = "{coco.parent / 'images'}"

[[datasets]]
id = "coco-minival"
kind = "coco"
role = "mini_val"
path = "{coco}"
images_dir = "{coco.parent / 'images'}"
limit = 2

[[datasets]]
id = "coco-ref"
kind = "coco"
role = "reference"
path = "{coco}"
images_dir = "{coco.parent / 'images'}"

[sampling]
scheduler = "ddim"
num_inference_steps = 6
guidance_scale = 3.0
resolution = 32
batch_size = 3
n_samples = 5
eval_prompts = "coco-eval"

[finetune]
data = "coco-ft"
steps = 3
batch_size = 2
lr = 1e-4
checkpoint_every = 2
delta_max = 3

[finetune.early_stopping]
metric = "fid_moving"
every = 1
mini_val_size = 2
window = 2
patience = 5
mini_val = "coco-minival"

[evaluation]
metrics = ["fid", "kid", "precision_recall", "is", "clip_score", "clip_drift", "sec_per_image", "unet_forwards",
           "flops", "peak_memory", "sigma2_delta", "finetune_compute"]
feature_extractor = "inception"
inception_weights = "{inception}"
clip_model = "{clip}"
reference = "coco-ref"
n_reference = 6
timing_batch_sizes = [1, 2]
timing_repeats = 1
sigma2_delta_max = 3
sigma2_samples = 4
kid_subset_size = 4
clip_drift_samples = 4

[[variations]]
id = "no-cache"
sampler = "none"

[[variations]]
id = "fd-3"
sampler = "fd"
stride = 3

[[variations]]
id = "fcr-0.10-fd-3"
sampler = "fd"
stride = 3
lambda_fcr = 0.10
{extra_variations}
[criteria]
baseline = "no-cache"
candidate = "fcr-0.10-fd-3"
no_fcr_reference = "fd-3"
quality_metric = "fid_inception"
alignment_metric = "clip_score"
timing_batch_size = 1
"""
    path = root / "sd-tiny.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def sd_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    exp_path = _experiment(root, extra_variations="""
[[variations]]
id = "fd-3-ood"
sampler = "fd"
stride = 3
robustness = "ood"

[[variations]]
id = "fd-3-fgsm"
sampler = "fd"
stride = 3
robustness = "fgsm"

[[variations]]
id = "fd-3-noise"
sampler = "fd"
stride = 3
robustness = "noise"

[[variations]]
id = "fd-1-fgsm"
sampler = "fd"
stride = 1
robustness = "fgsm"

[[robustness]]
id = "ood"
kind = "ood_prompts"
settings = { prompts = ["an astronaut riding a horse", "a watercolour of a city"] }

[[robustness]]
id = "fgsm"
kind = "fgsm_latent"
settings = { epsilon = 0.1, steps = 1, n_images = 2 }

[[robustness]]
id = "noise"
kind = "schedule_perturbation"
settings = { std = 0.05 }
""")
    exp = load_experiment(exp_path)
    store = root / "results" / "fcr.duckdb"
    torch.manual_seed(0)
    outcome = run_experiment(exp, RunnerOptions(store=store, threads=1, progress=False, device="cpu"))
    return exp, store, outcome, root


def test_sd_experiment_stores_every_run_with_its_metrics(sd_run):
    """Slow (over a minute on 2 cores): the module's ``sd_run`` fixture runs here first — a whole SD
    experiment of tiny parts: an FCR fine-tune with early stopping, eight variations sampled, FID,
    CLIPScore, drift, σ²_Δ and three robustness kinds evaluated — once for all the module's tests."""
    exp, store_path, outcome, _ = sd_run
    s = ResultsStore.open_readonly(store_path)
    runs = s.runs(experiment_id=exp.id)
    assert sorted(runs["variation_id"].to_list()) == sorted(v.id for v in exp.variations)
    metrics = s.metrics(experiment_id=exp.id)
    by_var = {vid: dict(zip(g["metric"].to_list(), g["value"].to_list(), strict=True))
              for (vid,), g in metrics.group_by("variation_id")}
    for vid, m in by_var.items():
        # Inception protocol names (never "fd_..."), CLIPScore from the local CLIP, IS from the logits
        assert {"fid_inception", "kid_inception", "inception_score", "precision", "recall", "clip_score"} <= set(m), vid
        assert np.isfinite(m["fid_inception"]) and m["fid_inception"] > 0
        assert 0 <= m["clip_score"] <= 100
    # drift only for cached samplers; a cache that changes the images moves them in CLIP space
    assert "clip_drift" not in by_var["no-cache"]
    assert all(by_var[v]["clip_drift"] > 0 for v in ("fd-3", "fcr-0.10-fd-3", "fd-3-ood", "fd-3-noise"))
    # FGSM differentiates through the sampler and the VAE decode and moves the images
    assert by_var["fd-3-fgsm"]["fgsm_image_mse"] > 0
    # CLIP drift compares with the uncached samples from the run's own (attacked) x_T: FD-1 is the
    # uncached sampler, so its drift vanishes although its first images were attacked
    assert by_var["fd-1-fgsm"]["fgsm_image_mse"] > 0
    assert by_var["fd-1-fgsm"]["clip_drift"] < 1e-5 < by_var["fd-3-fgsm"]["clip_drift"]
    # the stresses change the images: quality differs from the unstressed FD-3 run on the same seed
    for stressed in ("fd-3-fgsm", "fd-3-noise"):
        assert by_var[stressed]["fid_inception"] != pytest.approx(by_var["fd-3"]["fid_inception"], rel=1e-9)
    frac = metrics.filter(metrics["metric"] == "finetune_compute_fraction")
    assert frac["variation_id"].to_list() == ["fcr-0.10-fd-3"]
    details = json.loads(frac["details"][0]) if isinstance(frac["details"][0], str) else frac["details"][0]
    assert frac["value"][0] == pytest.approx(details["finetune_flops"] / 1e15)
    assert details["pretrain_from"] == "models[sd].pretrain_compute_flops"
    rows = metrics.filter(metrics["metric"] == "fid_inception")
    assert set(rows["feature_extractor"].to_list()) == {"inception"}
    # every run: the model folder, the prompt source, σ²_Δ on VAE latents, timings with counters
    for r in runs.iter_rows(named=True):
        assert r["model"] == str(Path(exp.models["sd"].source))
        assert r["dataset"] == ("ood:ood" if r["variation_id"] == "fd-3-ood" else "coco-eval")
        params = json.loads(r["params"]) if isinstance(r["params"], str) else r["params"]
        assert params["model_family"] == "stable-diffusion"
        f = s.sql("SELECT DISTINCT delta FROM feature_stats WHERE run_id = ? AND block = 'all' "
                  "AND delta_unit = 'timesteps'", [r["run_id"]])
        assert sorted(f["delta"].to_list()) == [1, 2, 3]
        t = s.sql("SELECT batch_size, encoder_forwards, decoder_forwards FROM timings WHERE run_id = ? "
                  "ORDER BY batch_size", [r["run_id"]])
        assert t["batch_size"].to_list() == [1, 2]
        # 6 steps: FD-3 encodes at key steps 0 and 3; FD-1 and no cache at every step
        expect_enc = 2 if r["sampler"] == "fd" and r["stride"] == 3 else 6
        assert t["encoder_forwards"].to_list() == [expect_enc, expect_enc]
    per_prompt = s.sql("SELECT r.variation_id, count(*) AS n FROM per_prompt_scores p JOIN runs r USING (run_id) "
                       "WHERE p.metric = 'clip_score' GROUP BY r.variation_id")
    assert set(per_prompt["n"].to_list()) == {exp.sampling.n_samples}
    samples = s.sql("SELECT prompt, image_path, width FROM samples JOIN runs USING (run_id) "
                    "WHERE variation_id = 'fd-3-ood'")
    assert set(samples["prompt"].to_list()) == {"an astronaut riding a horse", "a watercolour of a city"}
    assert set(samples["width"].to_list()) == {32}
    from PIL import Image

    assert Image.open(s.image_file(samples["image_path"][0])).mode == "RGB"


def test_sd_report_names_what_produced_the_numbers(sd_run):
    from fcr_eval.report.report import report

    exp, store_path, outcome, _ = sd_run
    assert outcome.ok, outcome.failed
    rep = report(exp, store_path, plots=False)
    assert "FID" in rep.table and "CLIPScore" in rep.table and "CLIP drift" in rep.table
    assert "class agr." not in rep.table
    verdicts = {c.criterion: c for c in rep.criteria}
    # the SD criteria read FID (Inception protocol) and CLIPScore, and every one is decided
    assert verdicts["quality_delta"].details["metric"] == "fid_inception"
    assert verdicts["alignment_delta"].details["metric"] == "clip_score"
    assert verdicts["finetune_compute"].passed is not None


def test_sd_finetune_used_moving_fid_history_on_disk(sd_run):
    exp, store_path, _, root = sd_run
    hist = list((store_path.parent / "runs" / exp.id / "finetune").glob("*/moving_fd_history.json"))
    assert len(hist) == 1
    data = json.loads(hist[0].read_text())
    steps = [h[0] if isinstance(h, list) else h["step"] for h in data["history"]]
    assert steps == [1, 2, 3]


def test_sd_sampling_loop_matches_the_diffusers_pipeline(tmp_path):
    """The runner's loop (which FGSM differentiates through) gives the pipeline's images."""
    pipe = tiny_sd_pipeline(seed=0, scheduler="ddim")
    pipe.save_pretrained(tmp_path / "sd")
    exp_path = _experiment_minimal(tmp_path)
    exp = load_experiment(exp_path)
    ctx = StableDiffusionContext(exp, tmp_path / "results", torch.device("cpu"))
    cycled = ctx.prompts("ev", 9)  # 6 images in the COCO file: prompts repeat, sample ids do not
    assert cycled.texts[6:] == cycled.texts[:3] and len(set(cycled.ids)) == 9
    prompts = Prompts(["a red square", "a cat"], ["0", "1"])
    c, nl = ctx.encode(prompts, slice(0, 2))
    x_T = ctx.initial_noise(2, 32, 0)
    sched = make_sampling_scheduler("ddim", ctx.scheduler_config())
    unet = ctx.unet(None)
    with torch.no_grad():
        ours = sample_batch(unet, sched, x_T, c, nl, 5, 4.0, ctx.decode)
        ref = pipe(prompt_embeds=c, negative_prompt_embeds=nl, latents=x_T.clone(), num_inference_steps=5,
                   guidance_scale=4.0, output_type="pt", height=32, width=32).images
    assert ours.shape == ref.shape == (2, 3, 32, 32)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def _experiment_minimal(root: Path) -> Path:
    coco = _coco(root / "coco")
    path = root / "min.toml"
    path.write_text(f"""
[experiment]
id = "sd-min"
[[models]]
id = "sd"
source = "{root / 'sd'}"
[[datasets]]
id = "ev"
kind = "coco"
role = "eval"
path = "{coco}"
[[datasets]]
id = "ref"
kind = "coco"
role = "reference"
path = "{coco}"
images_dir = "{coco.parent / 'images'}"
[sampling]
eval_prompts = "ev"
resolution = 32
[evaluation]
metrics = ["fd"]
feature_image_size = 64
reference = "ref"
n_reference = 4
[[variations]]
id = "no-cache"
""")
    return path


def test_missing_local_files_are_listed_before_any_work(tmp_path):
    exp_path = _experiment(tmp_path)
    text = exp_path.read_text()
    gone = tmp_path / "nowhere" / "captions.json"
    exp_path.write_text(text.replace(f'path = "{tmp_path / "coco" / "captions.json"}"\nimages_dir',
                                     f'path = "{gone}"\nimages_dir', 1)
                        .replace(str(tmp_path / "clip"), str(tmp_path / "no-clip")))
    exp = load_experiment(exp_path)
    store = tmp_path / "results" / "fcr.duckdb"
    with pytest.raises(FileNotFoundError) as e:
        check_inputs(exp, make_plan(exp, results_dir=store.parent, calibrate=False))
    msg = str(e.value)
    assert "datasets[coco-ft].path" in msg and str(gone) in msg
    assert "evaluation.clip_model" in msg and "Nothing has been run" in msg
    with pytest.raises(FileNotFoundError):
        run_experiment(exp, RunnerOptions(store=store, progress=False, device="cpu"))
    assert not store.exists()  # nothing written


def test_two_sd_models_in_one_experiment_each_get_their_runs(tmp_path):
    """exp-2 has two models (SD 2.1, OpenJourney): the runner takes them one at a time."""
    tiny_sd_pipeline(seed=0).save_pretrained(tmp_path / "sd")
    tiny_sd_pipeline(seed=5).save_pretrained(tmp_path / "sd-b")
    path = _experiment_minimal(tmp_path)
    text = path.read_text().replace('''[[variations]]
id = "no-cache"
''', f'''[[models]]
id = "other"
source = "{tmp_path / 'sd-b'}"

[[variations]]
id = "a-fd-2"
sampler = "fd"
stride = 2

[[variations]]
id = "b-fd-2"
model = "other"
sampler = "fd"
stride = 2
''').replace('[sampling]\n', '[sampling]\nnum_inference_steps = 4\nn_samples = 3\nbatch_size = 3\n')
    path.write_text(text)
    exp = load_experiment(path)
    store = tmp_path / "results" / "fcr.duckdb"
    run_experiment(exp, RunnerOptions(store=store, threads=1, progress=False, device="cpu"))
    s = ResultsStore.open_readonly(store)
    runs = {r["variation_id"]: r for r in s.runs(experiment_id=exp.id).iter_rows(named=True)}
    assert runs["a-fd-2"]["model"] == str(tmp_path / "sd") and runs["b-fd-2"]["model"] == str(tmp_path / "sd-b")
    fd = {r["variation_id"]: r["value"] for r in s.sql(
        "SELECT variation_id, value FROM metrics JOIN runs USING (run_id) WHERE metric = 'fd_efficientnet_lite0'"
    ).iter_rows(named=True)}
    assert fd["a-fd-2"] != pytest.approx(fd["b-fd-2"])  # different weights, different samples


def test_half_precision_sampling_runs_end_to_end(tmp_path):
    """sampling.dtype = bfloat16: UNet, VAE and text states in half precision, metrics in float."""
    tiny_sd_pipeline(seed=0).save_pretrained(tmp_path / "sd")
    path = _experiment_minimal(tmp_path)
    path.write_text(path.read_text().replace('[sampling]\n', '[sampling]\ndtype = "bfloat16"\nnum_inference_steps = 4\n'
                                             'n_samples = 3\nbatch_size = 3\n')
                    .replace('metrics = ["fd"]', 'metrics = ["fd", "sigma2_delta", "sec_per_image"]\n'
                                                 'sigma2_samples = 2\nsigma2_delta_max = 2\ntiming_batch_sizes = [1]\n'
                                                 'timing_repeats = 1')
                    .replace('id = "no-cache"\n', 'id = "fd-2"\nsampler = "fd"\nstride = 2\n'))
    exp = load_experiment(path)
    assert exp.sampling.dtype == "bfloat16"
    store = tmp_path / "results" / "fcr.duckdb"
    run_experiment(exp, RunnerOptions(store=store, threads=1, progress=False, device="cpu"))
    s = ResultsStore.open_readonly(store)
    m = s.sql("SELECT metric, value FROM metrics")
    fd = m.filter(m["metric"] == "fd_efficientnet_lite0")["value"][0]
    assert np.isfinite(fd) and fd > 0
    var = s.sql("SELECT variance FROM feature_stats WHERE block = 'all' AND delta_unit = 'timesteps'")["variance"].to_list()
    assert len(var) == 2 and all(np.isfinite(v) and v > 0 for v in var)
    run = s.runs(experiment_id=exp.id).row(0, named=True)
    params = json.loads(run["params"]) if isinstance(run["params"], str) else run["params"]
    config = json.loads(run["config"]) if isinstance(run["config"], str) else run["config"]
    assert params["dtype"] == "bfloat16" and config["sampling"]["dtype"] == "bfloat16"
