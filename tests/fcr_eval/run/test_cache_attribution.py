"""The cache-error attribution through the runner: an experiment that asks for it
(``"cache_attribution"`` in ``[evaluation] metrics``) stores, per cached run, fcr-sample's rows for
the run's own weights, x_T and prompts; uncached runs store none; the typed reader returns them."""

from __future__ import annotations

from pathlib import Path

import pytest
from fcr_eval.plan.planner import make_plan
from fcr_eval.run.runner import RunnerOptions, run_experiment
from fcr_eval.spec.experiment import ExperimentFileError, load_experiment
from fcr_eval.store import ResultsStore

EXPERIMENT = """
seeds = [0]

[experiment]
id = "tiny-attribution"

[[models]]
id = "tiny"
source = "embedded-tiny"

[[datasets]]
id = "prompts"
kind = "fashion-mnist"
role = "eval"

[sampling]
scheduler = "ddim"
num_inference_steps = 4
guidance_scale = 2.0
batch_size = 4
n_samples = 4
eval_prompts = "prompts"

[evaluation]
metrics = ["cache_attribution"]
attribution_samples = {samples}
attribution_propagation = true
save_samples = false
# the embedded context extracts reference features at start: keep that tiny
feature_image_size = 32
n_reference = 2

[[variations]]
id = "no-cache"

[[variations]]
id = "fd-2"
sampler = "fd"
stride = 2

[[variations]]
id = "deepcache-2"
sampler = "deepcache"
stride = 2
"""


def _write(tmp_path: Path, samples: int | str = 3) -> Path:
    path = tmp_path / "exp.toml"
    path.write_text(EXPERIMENT.replace("{samples}", str(samples)))
    return path


@pytest.fixture(scope="module")
def attributed(tmp_path_factory) -> ResultsStore:
    folder = tmp_path_factory.mktemp("attr")
    exp = load_experiment(_write(folder))
    out = run_experiment(exp, RunnerOptions(store=folder / "fcr.duckdb", threads=1, progress=False))
    assert out.ok, out.failed
    return ResultsStore.open_readonly(folder / "fcr.duckdb")


def test_cached_runs_store_a_positive_error_at_served_steps_and_none_at_key_steps(attributed):
    for variation, features in (("fd-2", {"conv_in", "down_blocks.0", "down_blocks.1", "mid_block"}),
                                ("deepcache-2", None)):
        rows = attributed.cache_attribution("tiny-attribution", variation)
        assert rows.height > 0, variation
        assert set(rows["n_samples"].to_list()) == {3}
        # 4 steps at interval 2: key steps 0 and 2 run fresh, steps 1 and 3 are served
        assert sorted(set(rows["step"].to_list())) == [1, 3]
        eps = rows.filter((rows["feature"] == "all") & (rows["quantity"] == "eps_error"))
        assert eps.height == 2 and all(v > 0 for v in eps["value"].to_list()), variation
        keys = rows.filter((rows["feature"] == "all") & (rows["quantity"] == "key_step"))
        assert keys["value"].to_list() == [0.0, 2.0]
        final = rows.filter((rows["feature"] == "all") & (rows["quantity"] == "final_error"))
        assert final.height == 2 and all(v > 0 for v in final["value"].to_list())
        if features is not None:
            assert set(rows["feature"].to_list()) - {"all"} == features


def test_the_uncached_run_stores_no_attribution_and_the_reader_filters(attributed):
    assert attributed.cache_attribution("tiny-attribution", "no-cache").height == 0
    only = attributed.cache_attribution("tiny-attribution", quantity="only_stale_error", feature="mid_block")
    assert only.height == 2 and set(only["variation_id"].to_list()) == {"fd-2"}
    assert {"run_id", "seed", "step", "timestep", "feature", "quantity", "value"} <= set(only.columns)


def test_the_plan_carries_the_samples_and_keeps_old_run_ids(tmp_path):
    plan = make_plan(load_experiment(_write(tmp_path, 99)), results_dir=tmp_path, calibrate=False)
    by_id = {r.variation.id: r for r in plan.runs}
    assert by_id["no-cache"].attribution_samples == 0
    assert by_id["fd-2"].attribution_samples == 4  # at most the run's samples
    assert by_id["fd-2"].attribution_propagation
    # an experiment that does not ask for the attribution keeps the run ids it had before
    (tmp_path / "plain.toml").write_text(_write(tmp_path).read_text().replace(
        'metrics = ["cache_attribution"]', 'metrics = ["unet_forwards"]'))
    plain = make_plan(load_experiment(tmp_path / "plain.toml"), results_dir=tmp_path, calibrate=False)
    assert all("attribution_samples" not in r.config["evaluation"] for r in plain.runs)
    assert all(r.attribution_samples == 0 for r in plain.runs)


def test_a_bad_sample_count_is_refused_with_its_line(tmp_path):
    path = _write(tmp_path, 0)
    with pytest.raises(ExperimentFileError, match=r"exp\.toml:\d+: evaluation\.attribution_samples = 0 must be >= 1"):
        load_experiment(path)


def test_the_report_plots_one_png_per_attributed_variation(attributed, tmp_path):
    from fcr_eval.report.attribution import attribution_plots

    exp = load_experiment(_write(tmp_path))
    files = attribution_plots(exp, attributed, tmp_path / "plots")
    assert sorted(f.name for f in files) == ["attribution_deepcache-2.png", "attribution_fd-2.png"]
    assert all(f.stat().st_size > 10_000 for f in files)
