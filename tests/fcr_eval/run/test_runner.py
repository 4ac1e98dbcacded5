"""The experiment runner end to end on a tiny experiment file (embedded-tiny UNet, a few samples):
every variation × seed lands in the store with its metrics, timings, σ²_Δ and samples; a rerun
skips finished runs; a run killed between variations resumes with no duplicate or partial rows."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import polars as pl
import pytest
from fcr_eval.cli import main
from fcr_eval.plan.planner import make_plan
from fcr_eval.spec.experiment import load_experiment
from fcr_eval.store import ResultsStore, writer_lock_path

# slow: the tiny experiment is run, killed and resumed by real processes
pytestmark = pytest.mark.slow

TINY = Path(__file__).parents[1] / "experiments" / "tiny.toml"
QUALITY = {"fd_efficientnet_lite0", "kid_efficientnet_lite0", "precision", "recall", "class_agreement",
           "sample_wall_s_per_image"}
CHILD_TABLES = ("metrics", "timings", "feature_stats", "samples", "per_prompt_scores")


def _check_complete(store_path: Path, exp) -> set[str]:
    """Every stored run is whole; no row belongs to a run that is not stored. Returns run ids."""
    s = ResultsStore.open_readonly(store_path)
    runs = s.runs(experiment_id=exp.id)
    ids = runs["run_id"].to_list()
    assert len(ids) == len(set(ids)), "duplicate runs"
    for table in CHILD_TABLES:
        orphans = s.sql(f"SELECT DISTINCT run_id FROM {table} WHERE run_id NOT IN (SELECT run_id FROM runs)")
        assert orphans.height == 0, f"{table} has rows of unstored runs"
    n = exp.sampling.n_samples
    for row in runs.iter_rows(named=True):
        rid = row["run_id"]
        m = s.sql("SELECT metric FROM metrics WHERE run_id = ?", [rid])["metric"].to_list()
        assert QUALITY <= set(m), (rid, m)
        assert len(m) == len(set(m))
        t = s.sql("SELECT batch_size, unet_calls, encoder_forwards, decoder_forwards, flops_per_image, "
                  "peak_memory_bytes FROM timings WHERE run_id = ? ORDER BY batch_size", [rid])
        assert t["batch_size"].to_list() == list(exp.evaluation.timing_batch_sizes)
        assert all(v and v > 0 for v in t["flops_per_image"].to_list() + t["peak_memory_bytes"].to_list())
        f = s.sql("SELECT DISTINCT delta FROM feature_stats WHERE run_id = ? AND block = 'all' "
                  "AND delta_unit = 'timesteps'", [rid])
        assert sorted(f["delta"].to_list()) == list(range(1, exp.evaluation.sigma2_delta_max + 1))
        smp = s.sql("SELECT image_path FROM samples WHERE run_id = ?", [rid])
        assert smp.height == n and all(s.image_file(p).is_file() for p in smp["image_path"].to_list())
        assert row["code_version"] and row["device"].startswith("cpu") and row["config"]
    return set(ids)


def _wait_for_runs(store_path: Path, n: int, proc, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"runner exited early with {proc.returncode}"
        if store_path.is_file():
            try:
                k = ResultsStore.open_readonly(store_path, lock_timeout=2).runs().height
            except Exception:  # noqa: BLE001 - the writer holds the file for a moment
                k = 0
            if k >= n:
                return k
        time.sleep(0.3)
    pytest.fail(f"no {n} finished run(s) within {timeout} s")


@pytest.fixture(scope="module")
def killed_then_resumed(tmp_path_factory, warm_runner):
    """Run the tiny experiment's first seed in a subprocess, SIGKILL it once a run is stored,
    then resume with both seeds in-process (seed-0 run ids are the same in both profiles).
    Returns (store path, run ids stored before the kill, printed output of the resumed run)."""
    import contextlib
    import io

    store_path = tmp_path_factory.mktemp("tiny") / "results" / "fcr.duckdb"
    one_seed = load_experiment(TINY, "one-seed")
    # a real process in a session of its own, forked from the warm_runner interpreter (tests/warm.py)
    proc = warm_runner.start("fcr_eval.cli", ["run", str(TINY), "--profile", "one-seed", "--store", str(store_path),
                                              "--no-plots"])
    try:
        _wait_for_runs(store_path, 1, proc, timeout=300)
        os.killpg(proc.pid, signal.SIGKILL)  # no chance to clean up: the hardest interruption
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    before = _check_complete(store_path, one_seed)
    # the killed runner could not release its writer lock: the resumed one must take it over
    lock = writer_lock_path(store_path)
    assert lock.is_file() and f'"pid": {proc.pid}' in lock.read_text().replace("'", '"')
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["run", str(TINY), "--store", str(store_path)])
    assert rc == 0
    assert not lock.exists(), "the finished runner released its lock"
    return store_path, before, buf.getvalue()


def test_runner_resumes_after_kill_without_duplicate_or_partial_rows(killed_then_resumed):
    """Slow (over a minute on 2 cores): the ``killed_then_resumed`` fixture runs here first — the tiny
    experiment in a real process killed after its first stored run, then both seeds resumed (fine-tunes,
    every run and its evaluation); the module's other tests read the same store."""
    store_path, before, out = killed_then_resumed
    exp = load_experiment(TINY)
    one_seed_runs = len(exp.variations)
    assert 1 <= len(before) < one_seed_runs, "the kill came too late to test resuming"
    assert f"{len(before)} already in" in out  # the stored runs were skipped, not redone
    after = _check_complete(store_path, exp)
    assert before < after and len(after) == len(exp.variations) * len(exp.seeds)
    s = ResultsStore.open_readonly(store_path)
    assert s.sql("SELECT count(*) AS n FROM runs")["n"][0] == len(after)
    # fine-tunes run before any sampling; the resumed run reused them instead of training again
    ft_root = store_path.parent / "runs" / exp.id / "finetune"
    done = [p for p in ft_root.iterdir() if (p / "summary.json").is_file()]
    assert len(done) == 2
    for p in done:
        assert len((p / "metrics.jsonl").read_text().splitlines()) == exp.finetune.steps


def test_tiny_experiment_end_to_end(killed_then_resumed, capsys):
    store_path, _, out = killed_then_resumed
    exp = load_experiment(TINY)
    plan = make_plan(exp, results_dir=store_path.parent, calibrate=False)
    ids = _check_complete(store_path, exp)
    assert ids == {r.run_id for r in plan.runs}

    s = ResultsStore.open_readonly(store_path)
    runs = {(r["variation_id"], r["seed"]): r for r in s.runs(experiment_id=exp.id).iter_rows(named=True)}
    # forward counters follow the sampler: FD-2 over 4 steps runs the encoder twice, FD-4 once
    t = s.timings(experiment_id=exp.id).filter(s.timings(experiment_id=exp.id)["batch_size"] == 1)
    enc = {r["variation_id"]: (r["unet_calls"], r["encoder_forwards"], r["decoder_forwards"]) for r in t.iter_rows(named=True)}
    assert enc["no-cache"] == (4, 4, 4) and enc["fd-2"] == (4, 2, 4) and enc["fcr-0.10-fd-4"] == (4, 1, 4)
    assert enc["deepcache-2"][1] == 2
    assert runs["fcr-0.10-fd-2", 0]["lambda_fcr"] == 0.1 and runs["fd-2", 0]["lambda_fcr"] is None
    assert runs["fd-2", 1]["sampler"] == "fd" and runs["deepcache-2", 0]["sampler"] == "deepcache"
    # fine-tunes: one per λ, in the experiment's run folder, shared by strides and seeds
    ft_dirs = sorted(p.name for p in (store_path.parent / "runs" / exp.id / "finetune").iterdir())
    assert len(ft_dirs) == 2 and all((store_path.parent / "runs" / exp.id / "finetune" / d / "summary.json").is_file()
                                     for d in ft_dirs)
    # the same seed draws the same x_T in every variation: prompt ids pair up across variations
    pp = s.per_prompt_scores(experiment_id=exp.id)
    assert pp.height == len(ids) * exp.sampling.n_samples
    # metrics are labelled with their extractor, never plain "fid"
    m = s.metrics(experiment_id=exp.id)
    assert set(m.filter(m["metric"] == "fd_efficientnet_lite0")["feature_extractor"].to_list()) == {"efficientnet_lite0"}
    assert "fid" not in set(m["metric"].to_list())
    # criteria evaluated and stored; summary table, criteria and plots printed
    assert s.criteria("tiny-exp").height == 7
    assert "| variation" in out and "fcr-0.10-fd-4" in out and "success criteria" in out
    plots = store_path.parent / "plots" / exp.id
    for name in ("quality_vs_stride.png", "sigma2_vs_delta.png", "sigma2_vs_quality.png", "samples_fd-2.png"):
        assert (plots / name).is_file() and (plots / name).stat().st_size > 1000
        assert str(plots / name) in out
    assert str(store_path) in out

    # a second run finds everything finished: nothing is sampled, nothing duplicated
    assert main(["run", str(TINY), "--store", str(store_path), "--no-plots"]) == 0
    out2 = capsys.readouterr().out
    assert f"{len(ids)} already in" in out2 and "0 to do" in out2
    assert _check_complete(store_path, exp) == ids




def test_tiny_experiment_paired_metrics_contrasts_and_interleaved_timing(killed_then_resumed):
    """Every run stores per-sample paired values (cache error exactly 0 for the uncached sampler,
    positive for a cache), the experiment's contrast is computed from them with a CI, the
    interleaved timing session gives the speed-up a CI, and σ²_Δ is stored over the cache's range
    in sampler steps next to the literal one, with feature energy."""
    import numpy as np

    store_path, _, out = killed_then_resumed
    exp = load_experiment(TINY)
    s = ResultsStore.open_readonly(store_path)
    sm = s.sample_metrics(experiment_id=exp.id)
    n = exp.sampling.n_samples
    per_run = sm.group_by("run_id", "metric").len()
    assert set(per_run["len"].to_list()) == {n}
    assert {"cache_mse", "cache_psnr", "cache_feature_l2", "class_correct", "class_logprob"} <= set(sm["metric"])
    mse = {v: g["value"].to_numpy() for (v,), g in sm.filter(sm["metric"] == "cache_mse").group_by("variation_id")}
    assert np.all(mse["no-cache"] == 0.0)
    assert np.all(mse["fd-2"] > 0) and mse["fcr-0.10-fd-4"].mean() > mse["fcr-0.10-fd-2"].mean()
    # the contrast of tiny.toml, as the runner printed and stored it
    c = s.contrasts("tiny-exp").row(0, named=True)
    assert c["contrast_id"] == "tiny-stride-gap" and c["ci_low"] < c["estimate"] < c["ci_high"]
    pairs = sm.filter(sm["metric"] == "cache_mse")
    by_v = {v: g.sort("seed", "sample_index")["value"].to_numpy() for (v,), g in pairs.group_by("variation_id")}
    assert c["estimate"] == pytest.approx(float((by_v["fcr-0.10-fd-4"] - by_v["fcr-0.10-fd-2"]).mean()))
    assert "tiny-stride-gap" in out and "paired per-sample metrics" in out
    # interleaved timing: every unstressed variation × batch size × round, alternating order
    tr = s.timing_rounds("tiny-exp")
    assert tr.height == len(exp.variations) * len(exp.evaluation.timing_batch_sizes) * exp.evaluation.timing_rounds
    first = tr.filter((tr["round"] == 0) & (tr["batch_size"] == 1)).sort("position")["variation_id"].to_list()
    second = tr.filter((tr["round"] == 1) & (tr["batch_size"] == 1)).sort("position")["variation_id"].to_list()
    assert first == second[::-1]
    speed = s.criteria("tiny-exp").filter(pl.col("criterion") == "speedup").row(0, named=True)
    assert speed["ci_low"] is not None and speed["ci_low"] <= speed["value"] <= speed["ci_high"]
    # σ²_Δ over the literal 1…3 timesteps and over the cache's range (1…3 sampler steps of 4)
    fs = s.feature_stats(experiment_id=exp.id, unit=None)
    run0 = fs.filter((fs["variation_id"] == "fd-2") & (fs["seed"] == 0) & (fs["block"] == "all"))
    assert sorted(run0.filter(run0["delta_unit"] == "timesteps")["delta"].to_list()) == [1, 2, 3]
    assert sorted(run0.filter(run0["delta_unit"] == "sampler_steps")["delta"].to_list()) == [250, 500, 750]
    assert run0["energy"].min() > 0
