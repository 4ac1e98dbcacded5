"""Large stores: every view still answers quickly, because aggregates run in DuckDB and listings
are capped.

Two stores: ~200k rows written run by run through fcr-eval's writer, and a synthetic store of
1M per-sample rows (``synthetic_store.py`` beside this test, built in DuckDB) on which every
view, contrasts and the paired view included, must hand Python only aggregated frames. The
10M-row timings are a benchmark (``benchmarks/explorer_scale.py``, figures in
docs/benchmarks.md), not a test: the bound here is generous, for a shared CI machine."""

from __future__ import annotations

import time

import pytest
from fcr_eval.store import (
    FeatureStat,
    MetricRecord,
    PerPromptScore,
    ResultsStore,
    RunRecord,
    RunResult,
    SampleRecord,
    TimingRecord,
    make_run_id,
)
from fcr_results_explorer.reader import StoreReader

from .synthetic_store import SAMPLE_METRICS, VARIATIONS, build_synthetic_store

# slow: views timed on a synthetic store of a million rows
pytestmark = pytest.mark.slow

PROMPTS_PER_RUN = 17_000  # 6 runs × (samples + per-prompt scores) ≈ 204k rows


@pytest.fixture(scope="module")
def big_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("big") / "fcr.duckdb"
    store = ResultsStore(path)
    for v, stride in enumerate((5, 10, 15)):
        for seed in range(2):
            run = RunRecord(
                run_id=make_run_id("big", f"fd-{stride}", seed, {}), experiment_id="big",
                variation_id=f"fd-{stride}", seed=seed, model="m", dataset="d", sampler="fd",
                stride=stride, scheduler="ddim", resolution=32, num_inference_steps=50,
                guidance_scale=3.0)
            store.write_run(RunResult(
                run,
                metrics=[MetricRecord("fd_efficientnet_lite0", 10.0 + v + seed, "fe", "pre", 10)],
                per_prompt_scores=[PerPromptScore("class_agreement", f"p{k}", 1.0)
                                   for k in range(PROMPTS_PER_RUN)],
                samples=[SampleRecord(f"p{k}", f"prompt number {k}", 0, f"samples/{k}.png", 8, 8)
                         for k in range(PROMPTS_PER_RUN)],
                timings=[TimingRecord(1, 0.1 / (v + 1))],
                feature_stats=[FeatureStat("all", d, 0.01 * d, 8) for d in range(1, 11)],
            ))
    return path


@pytest.mark.parametrize("view", ["overview", "compare", "quality-speed", "mechanism",
                                  "samples"])
def test_views_stay_fast_on_a_large_store(big_store, app_for, view):
    """The first view pays the ``big_store`` fixture (over a minute under load): ~204k rows written run
    by run through fcr-eval's own writer, as a long experiment would; each view is then timed."""
    at = app_for(big_store, view=view)
    at.run()  # first run imports the app; time the second
    t0 = time.monotonic()
    at.run()
    elapsed = time.monotonic() - t0
    assert not at.exception, [e.value for e in at.exception]
    assert elapsed < 10, f"{view} took {elapsed:.1f} s on ~200k rows"
    if view == "overview":
        assert {m.label: m.value for m in at.metric}["Samples"] == f"{6 * PROMPTS_PER_RUN:,}"
    if view == "samples":
        # the prompt picker lists a capped page of prompts, not all 17,000
        assert len(at.selectbox(key="prompt").options) == 200


PER_SAMPLE_ROWS = 1_000_000


@pytest.fixture(scope="module")
def per_sample_store(tmp_path_factory):
    return build_synthetic_store(tmp_path_factory.mktemp("per-sample") / "fcr.duckdb",
                                 sample_metric_rows=PER_SAMPLE_ROWS)


def test_synthetic_store_has_the_rows_it_promises(per_sample_store):
    import duckdb

    info = per_sample_store
    assert info.sample_metric_rows >= PER_SAMPLE_ROWS and info.runs == 2 * len(VARIATIONS) * 3
    with duckdb.connect(str(info.path), read_only=True) as con:
        n, runs, metrics = con.execute(
            "SELECT count(*), count(DISTINCT run_id), count(DISTINCT metric) FROM sample_metrics").fetchall()[0]
        samples = con.execute("SELECT count(*) FROM samples").fetchall()[0][0]
        # paired: every variation of a seed has the same (seed, sample_index) keys
        keys = con.execute("""SELECT count(DISTINCT (r.experiment_id, t.seed, t.sample_index)) FROM sample_metrics t
                              JOIN runs r USING (run_id) WHERE t.metric = 'cache_mse'""").fetchall()[0][0]
    assert (n, runs, metrics) == (info.sample_metric_rows, info.runs, len(SAMPLE_METRICS))
    assert samples == info.runs * info.samples_per_run
    assert keys == 2 * 3 * info.samples_per_run


@pytest.mark.parametrize("query", [
    {"view": "overview"}, {"view": "compare"}, {"view": "paired"}, {"view": "paired", "sref": "fd-5"},
    {"view": "quality-speed"}, {"view": "mechanism"}, {"view": "criteria"}, {"view": "samples"},
], ids=lambda d: "-".join(d.values()))
def test_every_view_hands_python_only_aggregates_of_a_million_per_sample_rows(
        per_sample_store, app_for, monkeypatch, query):
    largest = []
    original = StoreReader.frame

    def frame(self, sql, params=None):
        out = original(self, sql, params)
        largest.append(out.height)
        return out

    monkeypatch.setattr(StoreReader, "frame", frame)
    at = app_for(per_sample_store.path, **query)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    t0 = time.monotonic()
    at.run()
    elapsed = time.monotonic() - t0
    # 1M per-sample rows, 200k samples: no query returns more than a page (the prompt list: 200)
    assert max(largest) <= 500, f"a query handed Python {max(largest)} rows"
    assert elapsed < 10, f"{query} took {elapsed:.1f} s on 1M per-sample rows"
    if query["view"] == "paired":
        table = next(d.value for d in at.dataframe if "samples" in d.value.columns)
        # one row per variation of the first experiment, each pooling 3 seeds' samples
        assert len(table) == len(VARIATIONS)
        assert set(table["samples"]) == {3 * per_sample_store.samples_per_run}
        assert set(table["seeds"]) == {3}
        if "sref" in query:
            assert set(table["pairs"].dropna()) == {3 * per_sample_store.samples_per_run}
    if query["view"] == "compare":
        contrasts = next(d.value for d in at.dataframe if "contrast" in d.value.columns)
        assert len(contrasts) == 2 * 4  # every stored contrast of both experiments
