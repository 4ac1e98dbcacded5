"""The mechanism view on a store with both Δ ranges (the cache's, in sampler steps, and the
paper's literal timesteps) and the features' energy: one range at a time, never averaged
together, and σ²_Δ / energy on request.

exp-m, one seed each: base (no fine-tune) and fcr (λ = 0.1), block 'all':
    literal range (timesteps), Δ = 1, 2:         σ²_Δ = 0.01·Δ           (both variations)
    cache range (sampler steps), Δ = 50, 100:     σ²_Δ = 0.4, 0.8 (base); 0.1, 0.2 (fcr)
    energy: 4.0 for base, 0.5 for fcr (FCR shrank its features: scale-free it is *worse*)
"""

from __future__ import annotations

import pytest
from fcr_eval.store import (
    FeatureStat,
    MetricRecord,
    ResultsStore,
    RunRecord,
    RunResult,
    make_run_id,
)

CACHE = {"base": (0.4, 0.8, 4.0), "fcr": (0.1, 0.2, 0.5)}


@pytest.fixture(scope="module")
def ranges_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("ranges") / "fcr.duckdb"
    store = ResultsStore(path)
    for variation, (v50, v100, energy) in CACHE.items():
        run = RunRecord(run_id=make_run_id("exp-m", variation, 0, {}), experiment_id="exp-m",
                        variation_id=variation, seed=0, model="m", dataset="d", sampler="fd", stride=10,
                        lambda_fcr=0.1 if variation == "fcr" else None, scheduler="ddim", resolution=28,
                        num_inference_steps=20, guidance_scale=2.0)
        feats = [FeatureStat("all", d, 0.01 * d, 8, energy, "timesteps") for d in (1, 2)]
        feats += [FeatureStat("all", 50, v50, 8, energy, "sampler_steps"),
                  FeatureStat("all", 100, v100, 8, energy, "sampler_steps")]
        store.write_run(RunResult(run, metrics=[MetricRecord("fd_efficientnet_lite0", 10.0, "fe", "pre", 4)],
                                  feature_stats=feats))
    return path


def _variance_rows(at) -> dict[tuple[str, int], float]:
    from streamlit import dataframe_util

    for e in at.main.children.values():
        if getattr(e, "type", "") == "vega_lite_chart":
            for d in e.proto.datasets:
                df = dataframe_util.convert_arrow_bytes_to_pandas_df(d.data.data)
                if "delta" in df.columns:
                    return {(r.variation, int(r.delta)): r.mean for r in df.itertuples()}
    raise AssertionError("no σ²_Δ-against-Δ chart")


def test_the_cache_range_is_the_default_and_ranges_are_not_mixed(ranges_store, app_for):
    at = app_for(ranges_store, view="mechanism")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.selectbox(key="dunit").value == "sampler_steps"
    rows = _variance_rows(at)
    assert rows == pytest.approx({("base", 50): 0.4, ("base", 100): 0.8, ("fcr", 50): 0.1, ("fcr", 100): 0.2})
    at.selectbox(key="dunit").set_value("timesteps")
    at.run()
    assert _variance_rows(at) == pytest.approx({(v, d): 0.01 * d for v in CACHE for d in (1, 2)})


def test_scale_free_divides_by_the_feature_energy(ranges_store, app_for):
    at = app_for(ranges_store, view="mechanism", scalefree="1")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    rows = _variance_rows(at)
    # raw σ²_Δ says FCR is 4x more consistent; per unit of energy it is 2x less
    assert rows[("base", 50)] == pytest.approx(0.1) and rows[("fcr", 50)] == pytest.approx(0.2)
    assert "σ²_Δ / energy against Δ" in [s.value for s in at.subheader]
