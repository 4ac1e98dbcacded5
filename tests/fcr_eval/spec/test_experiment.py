"""Experiment files: the committed studies load in every profile, plan with shared fine-tunes,
print the design's JSON form; malformed files fail with file:line, the key and what is allowed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fcr_eval.cli import main
from fcr_eval.plan.planner import make_plan
from fcr_eval.spec.experiment import ExperimentFileError, load_experiment

ROOT = Path(__file__).resolve().parents[3]
EXPERIMENTS = ROOT / "experiments"
TINY = Path(__file__).parents[1] / "experiments" / "tiny.toml"
FILES = ["exp-1-main-ablation.toml", "exp-2-generalisation-robustness.toml", "mini-exp-1.toml", "mini-exp-2.toml",
         "mini-exp-2-robustness.toml"]


@pytest.mark.parametrize("name", FILES)
def test_committed_experiments_load_in_every_profile(name):
    base = load_experiment(EXPERIMENTS / name)
    assert base.profiles, f"{name} defines no profiles"
    for profile in (None, *base.profiles):
        exp = load_experiment(EXPERIMENTS / name, profile)
        ids = [v.id for v in exp.variations]
        assert len(ids) == len(set(ids))
        assert exp.criteria is not None and exp.criteria.baseline in ids and exp.criteria.candidate in ids
    if name.startswith("mini"):
        assert {"quick", "full"} <= set(base.profiles)
        assert load_experiment(EXPERIMENTS / name, "quick").embedded


def test_exp1_states_the_designed_study():
    exp = load_experiment(EXPERIMENTS / "exp-1-main-ablation.toml")
    # the design's five, the λ = 0 fine-tune control and FCR at the sampler's scale (issue: paired, powered)
    assert [v.id for v in exp.variations] == ["fd-5-baseline", "fd-10-baseline", "fcr-0.05-fd-10",
                                              "fcr-0.10-fd-10", "fcr-0.20-fd-10", "ft-0.00-fd-10", "fcr-ss-0.10-fd-10"]
    ss = exp.variation("fcr-ss-0.10-fd-10")
    assert (ss.delta_unit, ss.delta_max, ss.distance) == ("sampler_steps", 10, "relative_mse")
    assert {c.id for c in exp.contrasts} >= {"stride-gap", "fcr-ss-recovers-gap"}
    assert exp.seeds == (0, 1, 2)
    ft = exp.finetune
    assert (ft.steps, ft.batch_size, ft.lr, ft.delta_max) == (10_000, 128, 1e-5, 10)
    es = ft.early_stopping
    assert (es.every, es.mini_val_size) == (500, 3000)
    assert exp.datasets["laion-aesthetics-50k"].limit == 50_000 and exp.datasets["laion-aesthetics-50k"].hflip == 0.5
    assert exp.sampling.n_samples == 30_000
    assert exp.evaluation.sigma2_delta_max == 10
    c = exp.criteria
    assert (c.max_quality_increase, c.max_alignment_drop, c.min_speedup, c.max_extra_memory,
            c.min_variance_reduction, c.min_r2, c.max_finetune_fraction) == (0.05, 0.02, 1.4, 0.02, 0.30, 0.6, 0.03)


def test_exp2_states_the_designed_study():
    exp = load_experiment(EXPERIMENTS / "exp-2-generalisation-robustness.toml")
    ids = {v.id for v in exp.variations}
    for designed in ("sd21-fd-5", "sd21-fcr-0.10-fd-10", "sd21-fcr-0.10-dpmsolver-fd-10", "openjourney-fd-5",
                     "openjourney-fcr-0.10-fd-10"):
        assert {f"{designed}-flickr30k", f"{designed}-imagenet"} <= ids
    kinds = {r.kind: r.settings for r in exp.robustness.values()}
    assert kinds["schedule_perturbation"] == {"std": 0.05}
    assert kinds["fgsm_latent"] == {"epsilon": 0.1, "steps": 10}
    assert {r.settings.get("resolution") for r in exp.robustness.values() if r.kind == "resolution"} == {512, 1024}
    assert {v.stride for v in exp.variations if v.model == "sd21"} == {5, 10, 15}
    assert exp.human_study.pairs == 1000
    assert exp.variation("sd21-fcr-0.10-dpmsolver-fd-10-flickr30k").scheduler == "dpm-solver++"


def test_plan_shares_one_finetune_across_strides_and_seeds():
    exp = load_experiment(EXPERIMENTS / "mini-exp-1.toml", "quick")
    plan = make_plan(exp, calibrate=False)
    assert len(plan.runs) == len(exp.variations) * len(exp.seeds)
    lam = {f.lambda_fcr: f for f in plan.finetunes.values()}
    assert set(lam) == {0.0, 0.1, 0.15}  # control, the paper's literal FCR, FCR at the sampler's scale
    fcr_runs = [r for r in plan.runs if r.variation.lambda_fcr == 0.1]
    assert {r.finetune.key for r in fcr_runs} == {lam[0.1].key}
    assert len(lam[0.1].variations) == len(fcr_runs)
    assert all(Path(f.output_dir).parts[:3] == ("results", "runs", "mini-exp-1") for f in plan.finetunes.values())
    by_id = {(r.variation.id, r.seed): r for r in plan.runs}
    # FD-10 over 20 steps: 2 key steps (encoder) and 20 decoder forwards; no cache: 20 of each
    assert (by_id["fd-10", 0].encoder_forwards, by_id["fd-10", 0].decoder_forwards) == (2, 20)
    assert by_id["no-cache", 0].encoder_forwards == 20
    assert by_id["fd-10", 0].est_flops < by_id["no-cache", 0].est_flops
    assert len({r.run_id for r in plan.runs}) == len(plan.runs)
    # a changed profile changes the resolved config, hence the run ids
    full = make_plan(load_experiment(EXPERIMENTS / "mini-exp-1.toml", "full"), calibrate=False)
    assert not {r.run_id for r in plan.runs} & {r.run_id for r in full.runs}


def test_plan_json_has_the_design_output_form(capsys):
    assert main(["plan", "--json", "--skip-checks", *(str(EXPERIMENTS / f) for f in FILES)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"experiments", "expected_models", "expected_datasets"}
    assert [e["experiment_id"] for e in out["experiments"]] == [
        "exp-1-main-ablation", "exp-2-generalisation-robustness", "mini-exp-1", "mini-exp-2",
        "mini-exp-2-robustness"]
    for e in out["experiments"]:
        assert set(e) == {"experiment_id", "run_variations", "description"}
        assert e["run_variations"] and all(isinstance(v, str) for v in e["run_variations"])
        assert e["description"]
    assert {"sd15", "sd21", "openjourney", "embedded"} <= set(out["expected_models"])
    assert {"laion-aesthetics-50k", "coco-val-30k", "flickr30k", "imagenet", "artbench-10"} <= set(
        out["expected_datasets"])


def test_plan_text_shows_runs_finetunes_and_compute(capsys):
    assert main(["plan", str(EXPERIMENTS / "exp-1-main-ablation.toml"), "--no-calibrate", "--skip-checks"]) == 0
    out = capsys.readouterr().out
    assert "21 = 7 variations × 3 seeds" in out
    assert "fine-tunes (15" in out  # (3 λ + the λ = 0 control + FCR in sampler steps) × 3 seeds (per seed)
    assert "803 GFLOPs/forward" in out and "estimated compute" in out


def test_real_model_run_fails_early_naming_the_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    rc = main(["run", str(EXPERIMENTS / "exp-1-main-ablation.toml"), "--store", str(tmp_path / "s.duckdb")])
    err = capsys.readouterr().err
    assert rc == 3
    assert "is not available" in err and "'sd15'" in err and "local" in err
    assert not (tmp_path / "runs").exists()  # failed before any work


# ------------------------------------------------------------------------------------------
# Validation errors
# ------------------------------------------------------------------------------------------

GOOD = TINY.read_text()


def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "exp.toml"
    p.write_text(text)
    return p


def _line_of(text: str, needle: str) -> int:
    return next(i + 1 for i, ln in enumerate(text.splitlines()) if needle in ln)


def test_tiny_fixture_is_valid():
    exp = load_experiment(TINY)
    assert [v.id for v in exp.variations] == ["no-cache", "fd-2", "deepcache-2", "ft-0.00-fd-2", "fcr-0.10-fd-2",
                                              "fcr-0.10-fd-4"]


def test_unknown_key_names_file_line_and_suggestion(tmp_path):
    text = GOOD.replace("guidance_scale = 2.0", "guidence_scale = 2.0")
    p = _write(tmp_path, text)
    with pytest.raises(ExperimentFileError) as e:
        load_experiment(p)
    msg = str(e.value)
    assert f"{p}:{_line_of(text, 'guidence_scale')}" in msg
    assert "sampling.guidence_scale" in msg and "did you mean 'guidance_scale'" in msg


def test_bad_value_lists_what_is_allowed(tmp_path):
    text = GOOD.replace('sampler = "deepcache"', 'sampler = "deep-cache"')
    p = _write(tmp_path, text)
    with pytest.raises(ExperimentFileError) as e:
        load_experiment(p)
    msg = str(e.value)
    assert "'deep-cache' is not allowed" in msg and "['none', 'fd', 'deepcache', 'adaptive-deepcache', 'adaptive-fd']" in msg
    assert f"{p}:{_line_of(text, 'deep-cache')}" in msg


@pytest.mark.parametrize("old,new,expected", [
    ("steps = 2\n", "steps = \"two\"\n", "finetune.steps = 'two' is not an integer"),
    ("lr = 1e-4", "lr = -1.0", "finetune.lr = -1.0 must be > 0"),
    ('stride = [2, 4]', 'stride = [2, 0]', "needs stride >= 1"),
    ('id = "fcr-0.10-fd-{stride}"', 'id = "fcr-0.10-fd"', "must contain {stride}"),
    ('candidate = "fcr-0.10-fd-4"', 'candidate = "fcr-0.10-fd-8"', "criteria.candidate = 'fcr-0.10-fd-8' is not allowed"),
    ('id = "no-cache"', 'id = "no-cache"\nstride = 3', "sampler = 'none'"),
    ('role = "eval"', 'role = "evaluation"', "'evaluation' is not allowed"),
    ("seeds = [0, 1]", "seeds = [0, 0]", "has duplicates"),
    ("[sampling]", "[sampler]\n[sampling]", "unknown top-level key 'sampler'"),
    ("lambda_fcr = 0.0", "lambda_fcr = -0.5", "must be >= 0"),
    ('sampler = "deepcache"\nstride = 2', 'sampler = "adaptive-deepcache"', "needs threshold >= 0"),
    ('sampler = "deepcache"\nstride = 2', 'sampler = "adaptive-deepcache"\nthreshold = -0.1', "needs threshold >= 0"),
    ('sampler = "deepcache"\nstride = 2', 'sampler = "adaptive-fd"\nstride = 2\nthreshold = 0.2',
     "decides its refreshes at run time; drop stride"),
    ('sampler = "deepcache"\nstride = 2', 'sampler = "deepcache"\nstride = 2\nthreshold = 0.2', "is not adaptive"),
])
def test_validation_errors(tmp_path, old, new, expected):
    assert old in GOOD, old
    with pytest.raises(ExperimentFileError, match=None) as e:
        load_experiment(_write(tmp_path, GOOD.replace(old, new, 1)))
    assert expected in str(e.value)


def test_unknown_profile_lists_the_defined_ones(tmp_path):
    with pytest.raises(ExperimentFileError, match=r"no profile 'nope'.*one-seed"):
        load_experiment(TINY, "nope")


def test_not_toml_and_missing_file(tmp_path):
    with pytest.raises(ExperimentFileError, match="not valid TOML"):
        load_experiment(_write(tmp_path, "seeds = [0,\n"))
    with pytest.raises(FileNotFoundError):
        load_experiment(tmp_path / "missing.toml")


def test_cli_reports_validation_error_with_exit_code_2(tmp_path, capsys):
    p = _write(tmp_path, GOOD.replace("n_samples = 10", "n_samples = 0"))
    assert main(["plan", str(p), "--no-calibrate"]) == 2
    assert "sampling.n_samples = 0 must be >= 1" in capsys.readouterr().err


def test_plan_counts_clip_drift_reference_sampling_once_per_weights_and_seed():
    import dataclasses

    exp = load_experiment(Path(__file__).parents[3] / "experiments" / "exp-1-main-ablation.toml")
    assert "clip_drift" in exp.evaluation.metrics
    without = dataclasses.replace(exp, evaluation=dataclasses.replace(
        exp.evaluation, metrics=tuple(m for m in exp.evaluation.metrics if m != "clip_drift")))
    a = {(r.variation.id, r.seed): r.est_flops for r in make_plan(exp, calibrate=False).runs}
    b = {(r.variation.id, r.seed): r.est_flops for r in make_plan(without, calibrate=False).runs}
    k, steps = exp.evaluation.clip_drift_samples, exp.sampling.num_inference_steps
    # the plan's cost of one forward (counted from the UNet config, issue 19); CFG doubles the batch
    one_ref = k * 2 * steps * make_plan(exp, calibrate=False).costs["sd15@512"].flops_per_forward
    # fd-5 and fd-10 baselines share base weights: one uncached reference per seed, charged to the first
    assert a[("fd-5-baseline", 0)] - b[("fd-5-baseline", 0)] == pytest.approx(one_ref)
    assert a[("fd-10-baseline", 0)] == pytest.approx(b[("fd-10-baseline", 0)])
    # each FCR fine-tune has its own weights, so its own reference
    assert a[("fcr-0.10-fd-10", 1)] - b[("fcr-0.10-fd-10", 1)] == pytest.approx(one_ref)


def test_an_adaptive_variation_loads_plans_an_upper_bound_and_is_not_attributed(tmp_path):
    text = GOOD.replace('sampler = "deepcache"\nstride = 2', 'sampler = "adaptive-deepcache"\nthreshold = 0.2')
    exp = load_experiment(_write(tmp_path, text))
    v = next(v for v in exp.variations if v.id == "deepcache-2")
    assert v.sampler == "adaptive-deepcache" and v.threshold == 0.2
    named = text.replace('"finetune_compute"]', '"finetune_compute", "cache_attribution"]\n'
                         'attribution_variations = ["deepcache-2"]')
    with pytest.raises(ExperimentFileError, match="names 'deepcache-2', an adaptive cache"):
        load_experiment(_write(tmp_path, named))
    every = text.replace('"finetune_compute"]', '"finetune_compute", "cache_attribution"]')
    plan = make_plan(load_experiment(_write(tmp_path, every)), calibrate=False)
    by_sampler = {r.variation.sampler: r for r in plan.runs}
    assert by_sampler["adaptive-deepcache"].attribution_samples == 0  # no fixed schedule to attribute
    assert by_sampler["adaptive-deepcache"].sampler.forward_counts()["full_forwards"] == by_sampler[
        "adaptive-deepcache"].steps  # the plan's upper bound
    assert by_sampler["fd"].attribution_samples > 0


ALL = 10**9


@pytest.mark.parametrize("value,count", [('"all"', ALL), ('"none"', 0), ("4", 4), ("60", 60), ("true", ALL),
                                         ("false", 0)])
def test_save_samples_is_carried_as_a_count_and_moves_no_run_id(tmp_path, value, count):
    """``evaluation.save_samples`` (all / none / first N) reaches every planned run as the number
    of PNGs to write, and no run id moves with it: no metric reads the PNGs."""
    base = make_plan(load_experiment(TINY), results_dir=tmp_path, calibrate=False)
    text = GOOD.replace("[evaluation]\n", f"[evaluation]\nsave_samples = {value}\n", 1)
    plan = make_plan(load_experiment(_write(tmp_path, text)), results_dir=tmp_path, calibrate=False)
    assert {r.save_samples for r in plan.runs} == {min(count, r.n_samples) for r in plan.runs}
    assert [r.run_id for r in plan.runs] == [r.run_id for r in base.runs]


@pytest.mark.parametrize("value", ['"some"', "-1", "2.5"])
def test_save_samples_refuses_what_it_cannot_mean(tmp_path, value):
    text = GOOD.replace("[evaluation]\n", f"[evaluation]\nsave_samples = {value}\n", 1)
    with pytest.raises(ExperimentFileError, match=r"evaluation.save_samples = .* use \"all\", \"none\" or a count"):
        load_experiment(_write(tmp_path, text))
