"""Success-criteria evaluator: numbers, pass/fail and the stored verdicts."""

from __future__ import annotations

import json

import pytest
from fcr_eval.criteria import CriteriaConfig, evaluate_criteria, evaluate_store_criteria
from fcr_eval.store import (
    FeatureStat,
    MetricRecord,
    ResultsStore,
    RunRecord,
    RunResult,
    TimingRecord,
    make_run_id,
)

# variation: (quality FD, class agreement, sec/img, peak bytes, σ², finetune fraction)
SCENARIOS = {
    "fd-5": (10.0, 0.80, 1.00, 1000, 4.0, None),
    "fd-10": (12.0, 0.78, 0.70, 1000, 4.0, None),
    "fcr-fd-10": (10.4, 0.79, 0.68, 1010, 2.0, 0.01),
    "fd-15": (14.5, 0.75, 0.60, 1000, 5.0, None),
}
CFG = CriteriaConfig(baseline="fd-5", candidate="fcr-fd-10", no_fcr_reference="fd-10")


def _fill(store: ResultsStore, scenarios=SCENARIOS, seeds=(0, 1)):
    for v, (q, a, sec, mem, s2, ft) in scenarios.items():
        for seed in seeds:
            jitter = 0.01 * seed
            run = RunRecord(make_run_id("exp", v, seed, {}), "exp", v, seed, "m", "d", "fd", "ddim", 28, 20, 1.0)
            metrics = [MetricRecord("fd_efficientnet_lite0", q + jitter, "efficientnet_lite0", "p", 100),
                       MetricRecord("class_agreement", a, "fashion_mnist_cnn", "p", 100)]
            if ft is not None:
                metrics.append(MetricRecord("finetune_compute_fraction", ft, "none", "none", 1))
            store.write_run(RunResult(
                run, metrics=metrics,
                timings=[TimingRecord(1, sec, peak_memory_bytes=mem, memory_kind="process_rss", device="cpu")],
                feature_stats=[FeatureStat("all", d, s2 * d / 2, 8) for d in (1, 2, 3)]))


def test_criteria_values_and_verdicts(tmp_path):
    store = ResultsStore(tmp_path / "s.duckdb")
    _fill(store)
    res = {r.criterion: r for r in evaluate_store_criteria(store, "exp", CFG)}
    assert res["quality_delta"].value == pytest.approx((10.405 - 10.005) / 10.005) and res["quality_delta"].passed
    assert res["alignment_delta"].value == pytest.approx(-0.0125) and res["alignment_delta"].passed
    assert res["speedup"].value == pytest.approx(1 / 0.68) and res["speedup"].passed
    assert res["extra_memory"].value == pytest.approx(0.01) and res["extra_memory"].passed
    assert res["variance_reduction"].value == pytest.approx(0.5) and res["variance_reduction"].passed
    assert res["finetune_compute"].value == pytest.approx(0.01) and res["finetune_compute"].passed
    r2 = res["variance_quality_r2"]
    assert r2.details["variations"] == ["fcr-fd-10", "fd-10", "fd-15", "fd-5"] and 0 <= r2.value <= 1
    stored = store.criteria("exp")
    assert stored.height == 7
    d = json.loads(stored.filter(stored["criterion"] == "speedup")["details"][0])
    assert d["baseline"]["n_seeds"] == 2 and d["config"]["min_speedup"] == 1.4


def test_failing_and_missing_criteria(tmp_path):
    bad = dict(SCENARIOS)
    bad["fcr-fd-10"] = (11.0, 0.70, 0.90, 1100, 3.5, None)
    store = ResultsStore(tmp_path / "s.duckdb")
    _fill(store, bad, seeds=(0,))
    res = {r.criterion: r for r in evaluate_store_criteria(store, "exp", CFG)}
    for c in ("quality_delta", "alignment_delta", "speedup", "extra_memory", "variance_reduction"):
        assert res[c].passed is False, c
    assert res["finetune_compute"].passed is None and "no finetune_compute_fraction" in res["finetune_compute"].details["reason"]
    stored = store.criteria("exp")
    assert stored.filter(stored["criterion"] == "finetune_compute")["passed"].to_list() == [None]


def test_r2_needs_three_variations():
    import polars as pl

    empty = pl.DataFrame()
    res = {r.criterion: r for r in evaluate_criteria("exp", CFG, metrics=empty, timings=empty, feature_stats=empty)}
    assert all(r.passed is None for r in res.values())
    assert "≥ 3 variations" in res["variance_quality_r2"].details["reason"]
