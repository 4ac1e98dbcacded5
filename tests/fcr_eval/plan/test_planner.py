"""The resolved plan as the runner executes it: the typed sampler each run carries reaches the UNet
(prior noise injection included), the effective schedule is what the plan says, and a run that
fails is reported and makes ``fcr-eval run`` exit non-zero while the others are stored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fcr_eval.cli import main
from fcr_eval.plan.planner import make_plan
from fcr_eval.spec.experiment import load_experiment
from fcr_eval.store import ResultsStore
from fcr_sample import DeepCacheConfig, EncoderCacheConfig

TINY = Path(__file__).parents[1] / "experiments" / "tiny.toml"

PRIOR_NOISE = """
[sampling]
scheduler = "ddim"
num_inference_steps = 6
guidance_scale = 2.0
batch_size = 8
n_samples = 4
eval_prompts = "prompts"

[evaluation]
metrics = ["class_agreement"]
feature_image_size = 32
reference = "test"
n_reference = 8
grid_per_class = 1

[[variations]]
id = "fd-2"
sampler = "fd"
stride = 2

[[variations]]
id = "fd-2-prior"
sampler = "fd"
stride = 2
prior_noise_alpha = 0.2

[[variations]]
id = "fd-published"
sampler = "fd"
schedule = "faster-diffusion"
num_inference_steps = 20
"""


def _experiment_file(tmp_path: Path, body: str) -> Path:
    head = TINY.read_text().split("[sampling]")[0]  # models and datasets of the tiny experiment
    path = tmp_path / "exp.toml"
    path.write_text(head.replace('seeds = [0, 1]', 'seeds = [0]') + body)
    return path


def test_plan_carries_built_sampler_configs_and_their_effective_schedule():
    plan = make_plan(load_experiment(TINY), calibrate=False)
    by_var = {r.variation.id: r for r in plan.runs if r.seed == 0}
    fd = by_var["fcr-0.10-fd-4"]
    assert fd.sampler.cache == EncoderCacheConfig(stride=4)
    assert (fd.sampler.label, fd.sampler.key_steps, fd.sampler.interval) == ("FD-4", (0,), 4)
    assert (fd.encoder_forwards, fd.decoder_forwards) == (1, 4)  # read off the config, not re-derived
    dc = by_var["deepcache-2"]
    assert isinstance(dc.sampler.cache, DeepCacheConfig) and dc.sampler.key_steps == (0, 2)
    assert (dc.full_forwards, dc.partial_forwards) == (2, 2)
    assert by_var["no-cache"].sampler.label == "none" and by_var["no-cache"].finetune is None
    assert fd.finetune is not None and fd.finetune.lambda_fcr == 0.1 and fd.finetune.cost is fd.finetune.cost


def test_published_schedule_ignores_stride_and_says_so(tmp_path):
    exp = load_experiment(_experiment_file(tmp_path, PRIOR_NOISE))
    run = next(r for r in make_plan(exp, calibrate=False).runs if r.variation.id == "fd-published")
    assert run.sampler.label == "FD-published"
    assert run.sampler.key_steps == (0, 1, 2, 3, 5, 10, 15) and run.sampler.interval is None


def test_prior_noise_alpha_runs_end_to_end_and_changes_the_samples(tmp_path):
    from PIL import Image

    path = _experiment_file(tmp_path, PRIOR_NOISE)
    store_path = tmp_path / "results" / "fcr.duckdb"
    rc = main(["run", str(path), "--store", str(store_path), "--no-plots", "--threads", "1", "--device", "cpu"])
    assert rc == 0
    s = ResultsStore.open_readonly(store_path)
    rows = s.sql("SELECT r.variation_id, s.prompt_id, s.image_path FROM samples s JOIN runs r USING (run_id) "
                 "ORDER BY r.variation_id, s.prompt_id")
    imgs: dict[str, list[np.ndarray]] = {}
    for r in rows.iter_rows(named=True):
        imgs.setdefault(r["variation_id"], []).append(np.asarray(Image.open(s.image_file(r["image_path"]))))
    assert set(imgs) == {"fd-2", "fd-2-prior", "fd-published"}
    diff = np.abs(np.stack(imgs["fd-2-prior"]).astype(int) - np.stack(imgs["fd-2"]).astype(int))
    assert diff.max() > 0, "prior noise injection did not reach the sampler"
    cfg = s.runs().filter(s.runs()["variation_id"] == "fd-2-prior")["config"][0]
    assert '"prior_noise_alpha": 0.2' in cfg


def test_a_failing_run_is_reported_and_makes_run_exit_non_zero(tmp_path, monkeypatch, capsys):
    import fcr_eval.run.runner as runner

    real = runner._sample_batches

    def flaky(ctx, st, root, procs, progress):
        if st.run.variation.id == "fd-2-prior":
            raise RuntimeError("simulated sampler failure")
        return real(ctx, st, root, procs, progress)

    monkeypatch.setattr(runner, "_sample_batches", flaky)
    path = _experiment_file(tmp_path, PRIOR_NOISE)
    store_path = tmp_path / "results" / "fcr.duckdb"
    rc = main(["run", str(path), "--store", str(store_path), "--no-plots", "--threads", "1", "--device", "cpu"])
    out = capsys.readouterr()
    assert rc == 1
    assert "1 FAILED" in out.out and "1 run(s) failed" in out.err
    assert "fd-2-prior seed 0" in out.err and "simulated sampler failure" in out.err
    stored = set(ResultsStore.open_readonly(store_path).runs()["variation_id"].to_list())
    assert stored == {"fd-2", "fd-published"}  # the others went on and were stored
    err_files = list((tmp_path / "results" / "runs").rglob("error.txt"))
    assert len(err_files) == 1 and "simulated sampler failure" in err_files[0].read_text()


@pytest.mark.parametrize("field", ["stride", "cache_interval"])
def test_sampler_settings_interval_is_the_stored_stride(field):
    from fcr_eval.plan.samplers import resolve_sampler

    kind = "fd" if field == "stride" else "deepcache"
    s = resolve_sampler(kind, steps=10, stride=5)
    assert s.interval == 5 and s.describe()["cache_key_steps"] == [0, 5]


def test_the_plan_decides_how_each_contrast_was_replicated():
    """Base weights on both sides → same weights; fine-tunes shared by the seeds (mini-exp-1,
    per_seed = false) → shared; one fine-tune pair per seed (mini-exp-1-decide) → independent."""
    from fcr_eval.analysis.replication import contrast_replication
    from fcr_eval.plan.planner import planned_weights
    from fcr_eval.spec.vocabulary import (
        FIXED_WEIGHTS,
        INDEPENDENT_FINETUNES,
        SAME_WEIGHTS,
        SHARED_FINETUNE,
    )

    root = Path(__file__).parents[3] / "experiments"
    quick = make_plan(load_experiment(root / "mini-exp-1.toml", "quick"), calibrate=False)
    assert quick.replication["stride-gap"] == SAME_WEIGHTS
    assert quick.replication["fcr-ss-recovers-gap"] == SHARED_FINETUNE
    seeds = make_plan(load_experiment(root / "mini-exp-1.toml", "seeds"), calibrate=False)
    assert seeds.replication["seeds-recovered-fd-10-ss-0.15"] == INDEPENDENT_FINETUNES
    decide = make_plan(load_experiment(root / "mini-exp-1-decide.toml"), calibrate=False)
    assert decide.replication["recovered-fd-10-ss-0.15"] == INDEPENDENT_FINETUNES
    assert decide.replication["stride-gap"] == SAME_WEIGHTS
    # two base models, neither fine-tuned: fixed weights (a claim about the models, sampling noise)
    exp2 = make_plan(load_experiment(root / "exp-2-generalisation-robustness.toml"), calibrate=False)
    runs = [r for r in exp2.runs if r.finetune is None]
    a, b = sorted({r.variation.id for r in runs if r.variation.model != runs[0].variation.model})[:1] + \
        [runs[0].variation.id]
    assert contrast_replication(planned_weights(exp2.runs), (a, b)) == FIXED_WEIGHTS
