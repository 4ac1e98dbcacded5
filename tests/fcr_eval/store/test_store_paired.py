"""Per-sample metrics and contrasts in the store: bulk write inside write_run's one transaction,
typed polars readers, replace-on-rewrite for contrasts."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import pytest
from fcr_eval.store import (
    ResultsStore,
    RunRecord,
    RunResult,
    SampleMetrics,
    StoreError,
)


def _run(variation: str, seed: int = 0) -> RunRecord:
    return RunRecord(run_id=f"exp/{variation}/s{seed}/h", experiment_id="exp", variation_id=variation, seed=seed,
                     model="embedded", dataset="fashion-mnist", sampler="fd", stride=10, scheduler="ddim",
                     resolution=28, num_inference_steps=20, guidance_scale=2.0, cache_label="FD-10",
                     cache_key_steps=(0, 10), cache_interval=10)


def _metrics(n: int, seed: int = 0, offset: float = 0.0) -> list[SampleMetrics]:
    ids = [f"p{i % 7}" for i in range(n)]
    mse = np.linspace(0.0, 1.0, n) + offset
    return [
        SampleMetrics("cache_mse", mse, ids, seeds=seed, reference=f"exp/none/s{seed}/h"),
        SampleMetrics("cache_feature_l2", 2 * mse, ids, seeds=seed, reference=f"exp/none/s{seed}/h",
                      feature_extractor="efficientnet_lite0", preprocessing="bilinear_224",
                      details={"dims": 1280}),
        SampleMetrics("class_correct", (np.arange(n) % 2).astype(float), ids, seeds=np.full(n, seed)),
    ]


def test_sample_metrics_roundtrip_with_definitions(tmp_path):
    s = ResultsStore(tmp_path / "s.duckdb")
    s.write_run(RunResult(_run("fd-10"), sample_metrics=_metrics(50)))
    s.write_run(RunResult(_run("fd-5"), sample_metrics=_metrics(50, offset=-0.5)))
    df = s.sample_metrics(experiment_id="exp", metric="cache_mse", variation_id="fd-10")
    assert df.columns == ["experiment_id", "variation_id", "run_id", "seed", "sample_index", "prompt_id", "metric",
                          "value", "reference"]
    assert df.height == 50 and df["sample_index"].to_list() == list(range(50))
    assert df["value"].to_numpy() == pytest.approx(np.linspace(0, 1, 50))
    assert set(df["reference"]) == {"exp/none/s0/h"} and df["prompt_id"][8] == "p1"
    cc = s.sample_metrics(metric="class_correct", variation_id="fd-10")
    assert cc["reference"].null_count() == 50 and cc["value"].sum() == 25
    assert s.sample_metrics(experiment_id="exp").height == 300
    assert s.sample_metrics(variation_id=["fd-5", "fd-10"], metric=["cache_mse", "class_correct"]).height == 200
    defs = s.sample_metric_definitions(run_id=_run("fd-10").run_id)
    feat = defs.filter(pl.col("metric") == "cache_feature_l2").row(0, named=True)
    assert (feat["feature_extractor"], feat["preprocessing"], feat["n_samples"]) == \
        ("efficientnet_lite0", "bilinear_224", 50)
    assert json.loads(feat["details"]) == {"dims": 1280} and defs.height == 3


def test_nan_is_stored_as_null_and_inf_kept(tmp_path):
    s = ResultsStore(tmp_path / "s.duckdb")
    s.write_run(RunResult(_run("v"), sample_metrics=[
        SampleMetrics("cache_psnr", [math.inf, 20.0, math.nan], ["a", "b", "c"], seeds=[0, 1, 2],
                      sample_index=[10, 11, 12], reference=["r0", None, "r2"])]))
    df = s.sample_metrics(metric="cache_psnr")
    assert df["value"].to_list()[:2] == [math.inf, 20.0] and df["value"][2] is None
    assert df["seed"].to_list() == [0, 1, 2] and df["sample_index"].to_list() == [10, 11, 12]
    assert df["reference"].to_list() == ["r0", None, "r2"]


def test_empty_reader_is_typed(tmp_path):
    df = ResultsStore(tmp_path / "s.duckdb").sample_metrics(experiment_id="nothing")
    assert df.height == 0 and df.schema["value"] == pl.Float64 and df.schema["sample_index"] == pl.Int32


def test_bad_sample_metrics_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="3 entries for 2 values"):
        SampleMetrics("cache_mse", [0.1, 0.2], ["a", "b", "c"], seeds=0)
    with pytest.raises(ValueError, match="metric is empty"):
        SampleMetrics("", [0.1], ["a"], seeds=0)
    s = ResultsStore(tmp_path / "s.duckdb")
    twice = [SampleMetrics("cache_mse", [0.1], ["a"], seeds=0), SampleMetrics("cache_mse", [0.2], ["a"], seeds=0)]
    with pytest.raises(StoreError, match="more than once"):
        s.write_run(RunResult(_run("v"), sample_metrics=twice))
    assert s.runs().height == 0 and s.sample_metrics().height == 0  # one transaction: nothing stored


def test_a_failure_after_the_bulk_insert_leaves_no_sample_metrics(tmp_path, monkeypatch):
    s = ResultsStore(tmp_path / "s.duckdb")
    real = ResultsStore._insert

    def failing(con, table, ncols, rows):
        if table == "sample_metric_definitions":
            raise RuntimeError("disk full (simulated)")
        return real(con, table, ncols, rows)

    monkeypatch.setattr(ResultsStore, "_insert", staticmethod(failing))
    with pytest.raises(RuntimeError, match="simulated"):
        s.write_run(RunResult(_run("v"), sample_metrics=_metrics(1000)))
    monkeypatch.setattr(ResultsStore, "_insert", staticmethod(real))
    assert s.sample_metrics().height == 0 and s.runs().height == 0
    assert s.write_run(RunResult(_run("v"), sample_metrics=_metrics(1000)))
    assert s.sample_metrics().height == 3000
    assert s.delete_run(_run("v").run_id)  # a run's per-sample rows go with it
    assert s.sample_metrics().height == 0 and s.sample_metric_definitions().height == 0


def test_many_sample_metrics_in_one_run(tmp_path):
    n = 200_000
    s = ResultsStore(tmp_path / "s.duckdb")
    ids = [f"coco-{i}" for i in range(n)]
    vals = np.random.default_rng(0).random(n)
    assert s.write_run(RunResult(_run("v"), sample_metrics=[SampleMetrics("cache_mse", vals, ids, seeds=3)]))
    df = s.sample_metrics(metric="cache_mse")
    assert df.height == n and df["value"].to_numpy() == pytest.approx(vals)
    assert df["prompt_id"][n - 1] == f"coco-{n - 1}" and set(df["seed"]) == {3}


@dataclass(frozen=True)
class _Contrast:  # the fields of fcr_eval.analysis.contrasts.ContrastResult
    contrast_id: str
    estimate: float
    verdict: str | None = None
    kind: str = "difference"
    metric: str = "cache_mse"
    candidate: str = "fd-10"
    baseline: str = "fd-5"
    target: str | None = None
    ci_low: float = 0.1
    ci_high: float = 0.3
    confidence: float = 0.95
    n_samples: int = 300
    n_clusters: int = 2
    method: str = "paired bootstrap, clustered by seed"
    threshold: float | None = None
    direction: str | None = None
    details: dict = field(default_factory=dict)


def test_contrasts_are_stored_and_replaced(tmp_path):
    s = ResultsStore(tmp_path / "s.duckdb")
    n = s.write_contrasts("exp", [_Contrast("stride-gap", 0.2, details={"mean_candidate": 0.5}),
                                  _Contrast("recovered", 0.4, "INCONCLUSIVE", kind="recovered_fraction",
                                            target="fd-5", threshold=0.3, direction="at_least")],
                          code_version="abc123")
    assert n == 2
    s.write_contrasts("other", [_Contrast("stride-gap", 9.0)])
    s.write_contrasts("exp", [_Contrast("stride-gap", 0.25)])  # recomputed: replaces the earlier row
    c = s.contrasts("exp")
    assert c["contrast_id"].to_list() == ["recovered", "stride-gap"]
    gap = c.row(1, named=True)
    assert (gap["estimate"], gap["ci_low"], gap["ci_high"], gap["n_samples"], gap["n_clusters"]) == \
        (0.25, 0.1, 0.3, 300, 2)
    rec = c.row(0, named=True)
    assert (rec["verdict"], rec["threshold"], rec["direction"], rec["target"], rec["code_version"]) == \
        ("INCONCLUSIVE", 0.3, "at_least", "fd-5", "abc123")
    assert rec["computed_at"] is not None and s.contrasts()["experiment_id"].to_list().count("other") == 1
    with pytest.raises(StoreError, match="verdict 'MAYBE'"):
        s.write_contrasts("exp", [_Contrast("x", 1.0, "MAYBE")])


def test_the_real_contrast_result_is_stored(tmp_path):
    from fcr_eval.analysis.contrasts import ContrastSpec, compute_contrasts

    s = ResultsStore(tmp_path / "s.duckdb")
    for seed in (0, 1):
        s.write_run(RunResult(_run("fd-10", seed), sample_metrics=_metrics(40, seed)))
        s.write_run(RunResult(_run("fd-5", seed), sample_metrics=_metrics(40, seed, offset=-0.25)))
    spec = ContrastSpec("stride-gap", "difference", "cache_mse", candidate="fd-10", baseline="fd-5",
                        n_resamples=1000)
    results = compute_contrasts([spec], s.sample_metrics(experiment_id="exp"), replication={"stride-gap": "same weights"})
    s.write_contrasts("exp", results)
    row = s.contrasts("exp").row(0, named=True)
    assert row["estimate"] == pytest.approx(0.25) and row["n_samples"] == 80 and row["n_clusters"] == 2
