"""The mechanism view shows the cache-error attribution of a chosen variation: a step × feature
heat map of the chosen quantity (mean over seeds) and the per-step table."""

from __future__ import annotations

import pytest
from fcr_eval.store import AttributionValue, ResultsStore, RunRecord, RunResult, make_run_id

# two seeds of fd-10; only_stale_error = seed + step / 10 for mid_block, 2·that for conv_in
FEATURES = {"conv_in": 2.0, "mid_block": 1.0}


@pytest.fixture(scope="module")
def attribution_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("attr") / "fcr.duckdb"
    store = ResultsStore(path)
    for seed in (0, 1):
        run = RunRecord(run_id=make_run_id("exp-m", "fd-10", seed, {}), experiment_id="exp-m",
                        variation_id="fd-10", seed=seed, model="m", dataset="d", sampler="fd", stride=10,
                        scheduler="ddim", resolution=28, num_inference_steps=20, guidance_scale=2.0,
                        cache_label="FD-10")
        rows = []
        for step in (1, 2):
            rows += [AttributionValue(step, 950.0 - 50 * step, f, "only_stale_error", k * (seed + step / 10), 8)
                     for f, k in FEATURES.items()]
            rows += [AttributionValue(step, 950.0 - 50 * step, "all", "eps_error", 0.1 * step + seed, 8),
                     AttributionValue(step, 950.0 - 50 * step, "all", "final_error", 0.01 * step, 8)]
        store.write_run(RunResult(run, cache_attribution=rows))
    return path


def _heat_cells(at) -> dict[tuple[int, str], float]:
    from streamlit import dataframe_util

    for e in at.main.children.values():
        if getattr(e, "type", "") == "vega_lite_chart":
            for d in e.proto.datasets:
                df = dataframe_util.convert_arrow_bytes_to_pandas_df(d.data.data)
                if {"step", "feature", "value"} <= set(df.columns):
                    return {(int(r.step), r.feature): r.value for r in df.itertuples()}
    raise AssertionError("no attribution heat map")


def test_the_view_shows_the_heat_map_and_the_per_step_table(attribution_store, app_for):
    at = app_for(attribution_store, view="mechanism")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("Where the cache error enters" in s.value for s in at.subheader)
    cells = _heat_cells(at)
    # mean over seeds 0 and 1: k · (0.5 + step / 10)
    assert cells == pytest.approx({(s, f): k * (0.5 + s / 10) for s in (1, 2) for f, k in FEATURES.items()})
    table = at.dataframe[0].value.set_index("step")
    assert table.loc[2, "eps_error"] == pytest.approx(0.7) and table.loc[1, "final_error"] == pytest.approx(0.01)
    assert table.loc[1, "timestep"] == pytest.approx(900.0)
    # no feature_stats in this store: the σ²_Δ part says so instead of failing
    assert any("feature_stats" in str(i.value) for i in at.info)
