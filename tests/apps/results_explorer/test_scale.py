"""A store with a couple of hundred thousand rows: every view still answers quickly, because
aggregates run in DuckDB and listings are capped."""

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
