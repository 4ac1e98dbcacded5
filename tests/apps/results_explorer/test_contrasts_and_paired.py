"""Contrasts, verdicts with CIs and per-sample metrics in the explorer, on a store written by
fcr-eval's writer with per-sample values a test can compute by hand.

pair-exp (embedded-unet, ddim), seeds 0 and 1, 6 samples per run; cache_mse of sample k, seed s:
    none        0                          (the uncached reference itself)
    fd-5        0.002 + 0.001·k + 0.0004·s
    fd-10       0.010 + 0.001·k + 0.0004·s + 0.0003·(k % 2)
    ctrl-fd-10  fd-10's values + 0.0002    (λ = 0 control)
    fcr-fd-10   0.006 + 0.0012·k + 0.0004·s (λ = 0.1); sample 5 of seed 1 missing
Contrasts are computed from these rows by fcr_eval.analysis.contrasts and stored by write_contrasts; one
more is stored for another experiment (other-exp), which the experiment filter must hide.
"""

from __future__ import annotations

import dataclasses

import duckdb
import numpy as np
import polars as pl
import pytest
from fcr_eval.analysis.contrasts import ContrastSpec, compute_contrasts
from fcr_eval.analysis.stats import clustered_mean_ci
from fcr_eval.spec.vocabulary import INDEPENDENT_FINETUNES, SAME_WEIGHTS, SHARED_FINETUNE
from fcr_eval.store import (
    CriterionResult,
    MetricRecord,
    ResultsStore,
    RunRecord,
    RunResult,
    SampleMetrics,
    make_run_id,
)
from fcr_eval.store.migrations import migrate

EXP = "pair-exp"
SEEDS = (0, 1)
K = np.arange(6)
# variation: (sampler, stride, λ)
SETUP = {"none": ("none", None, None), "fd-5": ("fd", 5, None), "fd-10": ("fd", 10, None),
         "ctrl-fd-10": ("fd", 10, 0.0), "fcr-fd-10": ("fd", 10, 0.1)}


def cache_mse(variation: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(sample indices, values) of one run, as described in the module docstring."""
    base = {"none": None, "fd-5": 0.002, "fd-10": 0.010, "ctrl-fd-10": 0.010, "fcr-fd-10": 0.006}[variation]
    if base is None:
        return K, np.zeros(len(K))
    values = base + (0.0012 if variation == "fcr-fd-10" else 0.001) * K + 0.0004 * seed
    if variation in ("fd-10", "ctrl-fd-10"):
        values = values + 0.0003 * (K % 2) + (0.0002 if variation == "ctrl-fd-10" else 0.0)
    if variation == "fcr-fd-10" and seed == 1:
        return K[:-1], values[:-1]
    return K, values


SPECS = [
    ContrastSpec("stride-gap", "difference", "cache_mse", candidate="fd-10", baseline="fd-5", n_resamples=2000),
    ContrastSpec("fcr-effect", "difference", "cache_mse", candidate="fcr-fd-10", baseline="ctrl-fd-10",
                 threshold=0.0, direction="at_most", n_resamples=2000),
    ContrastSpec("fcr-recovers-gap", "recovered_fraction", "cache_mse", candidate="fcr-fd-10",
                 baseline="ctrl-fd-10", target="fd-5", threshold=0.45, direction="at_least", n_resamples=2000),
]


def _write(path, with_sample_metrics: bool = True):
    store = ResultsStore(path)
    for variation, (sampler, stride, lam) in SETUP.items():
        for seed in SEEDS:
            config = {"variation": variation, "seed": seed}
            run = RunRecord(run_id=make_run_id(EXP, variation, seed, config), experiment_id=EXP,
                            variation_id=variation, seed=seed, model="embedded-unet", dataset="fashion-mnist",
                            sampler=sampler, stride=stride, lambda_fcr=lam, delta_max=10 if lam is not None else None,
                            scheduler="ddim", resolution=28, num_inference_steps=20, guidance_scale=2.0,
                            config=config)
            k, values = cache_mse(variation, seed)
            per_sample = [SampleMetrics("cache_mse", values, [f"p{i}" for i in k], seeds=seed, sample_index=k,
                                        reference=f"{EXP}/none/s{seed}")] if with_sample_metrics else []
            # the FD record as fcr-eval writes it: 6 samples in 1280 dimensions, flagged not estimable
            fd = MetricRecord("fd_efficientnet_lite0", 10.0 + seed, "efficientnet_lite0", "resize", 6,
                              {"feature_dim": 1280, "estimable": False})
            kid = MetricRecord("kid_efficientnet_lite0", 0.01 + 0.001 * seed, "efficientnet_lite0", "resize", 6)
            store.write_run(RunResult(run, metrics=[fd, kid], sample_metrics=per_sample))
    return store


@pytest.fixture(scope="module")
def paired_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("paired") / "fcr.duckdb"
    store = _write(path)
    rows = store.sample_metrics(experiment_id=EXP)
    results = compute_contrasts(SPECS, rows, replication={"stride-gap": SAME_WEIGHTS, "fcr-effect": SHARED_FINETUNE,
                                                          "fcr-recovers-gap": INDEPENDENT_FINETUNES})
    runs = store.runs(experiment_id=EXP)
    store.write_timing_rounds(EXP, [
        {"variation_id": v, "run_id": runs.filter((pl.col("variation_id") == v) & (pl.col("seed") == 0))["run_id"][0],
         "batch_size": 1, "round": rnd, "position": i, "sec_per_image": sec + 0.01 * rnd, "peak_memory_bytes": None,
         "memory_kind": None, "device": "cpu", "code_version": "test"}
        for rnd in range(3) for i, (v, sec) in enumerate((("none", 0.5), ("fd-10", 0.3)))])
    store.write_contrasts(EXP, results, code_version="test")
    store.write_contrasts("other-exp", [dataclasses.replace(results[0], contrast_id="other-gap")])
    store.write_criteria([
        CriterionResult(EXP, "speedup", None, 1.5, 1.4, {}, verdict="INCONCLUSIVE", ci_low=1.31, ci_high=1.66),
        CriterionResult(EXP, "extra_memory", True, 0.01, 0.02, {}, verdict="PASS", ci_low=0.004, ci_high=0.016),
        CriterionResult(EXP, "quality_delta", False, 0.2, 0.05, {}),  # no verdict column value: from passed
    ])
    return path


def _run(at):
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def _frame_with(at, column: str):
    frames = [d.value for d in at.dataframe if column in d.value.columns]
    assert frames, f"no table with a {column!r} column"
    return frames[0]


def _charts(at) -> list[tuple[str, list]]:
    """(spec as JSON text, its datasets as pandas frames) of every chart on the page."""
    from streamlit import dataframe_util

    out = []
    for e in at.main.children.values():
        if getattr(e, "type", "") != "vega_lite_chart":
            continue
        data = [d.data.data for d in e.proto.datasets] + ([e.proto.data.data] if e.proto.data.data else [])
        out.append((e.proto.spec, [dataframe_util.convert_arrow_bytes_to_pandas_df(b) for b in data]))
    return out


def _texts(at) -> str:
    return "\n".join(str(e.value) for kind in ("markdown", "caption", "info", "subheader")
                     for e in at.get(kind))


def test_comparison_shows_each_stored_contrast_with_its_value_ci_and_verdict(paired_store, app_for):
    stored = ResultsStore.open_readonly(paired_store).contrasts(EXP)
    assert stored.height == 3
    at = _run(app_for(paired_store, view="compare", experiment_id=EXP))
    shown = _frame_with(at, "contrast").set_index("contrast")
    assert sorted(shown.index) == sorted(stored["contrast_id"])  # not other-exp's
    for row in stored.iter_rows(named=True):
        got = shown.loc[row["contrast_id"]]
        # the numbers shown are the stored ones, not recomputed or rounded
        assert got["estimate"] == row["estimate"]
        assert (got["ci_low"], got["ci_high"]) == (row["ci_low"], row["ci_high"])
        assert got["n_samples"] == row["n_samples"] and got["n_clusters"] == row["n_clusters"] == 2
        assert got["method"] == row["method"]
        assert got["verdict"] == (row["verdict"] or "—")
    assert shown.loc["stride-gap", "comparison"] == "fd-10 − fd-5"
    assert shown.loc["fcr-recovers-gap", "comparison"] == "fcr-fd-10 on the gap ctrl-fd-10 → fd-5"
    assert shown.loc["fcr-effect", "criterion"] == "≤ 0"
    assert not isinstance(shown.loc["stride-gap", "criterion"], str)  # no threshold: no criterion
    # 11 pairs: fcr-fd-10 lacks sample 5 of seed 1, so the pairing drops it
    assert shown.loc["fcr-effect", "n_samples"] == 11 and shown.loc["stride-gap", "n_samples"] == 12
    # the hand value of the stride gap: fd-10 − fd-5 = 0.008 + 0.0003·(k % 2), mean 0.00815
    assert shown.loc["stride-gap", "estimate"] == pytest.approx(0.00815)


def test_contrasts_forest_chart_has_points_intervals_and_threshold(paired_store, app_for):
    at = _run(app_for(paired_store, view="compare", experiment_id=EXP))
    forests = [(spec, data) for spec, data in _charts(at) if '"ci_low"' in spec and '"estimate"' in spec]
    # one panel per scale: differences of cache_mse, and the recovered fraction
    assert len(forests) == 2
    spec, data = next(f for f in forests if "recovered fraction" in f[0])
    assert '"tick"' in spec and '"threshold"' in spec
    rows = next(d for d in data if "contrast" in d.columns)
    assert rows["contrast"].tolist() == ["fcr-recovers-gap"] and rows["threshold"].tolist() == [0.45]
    assert "INCONCLUSIVE when it straddles it" in _texts(at)


def test_contrasts_follow_the_experiment_filter(paired_store, small_store, app_for):
    at = _run(app_for(paired_store, view="compare"))  # no filter: every experiment's contrasts
    shown = _frame_with(at, "contrast")
    assert sorted(set(shown["experiment"])) == ["other-exp", EXP] and len(shown) == 4
    at = _run(app_for(small_store, view="compare"))  # a store without contrasts: the old view
    assert "Contrasts" not in [s.value for s in at.subheader]
    assert not [d for d in at.dataframe if "contrast" in d.value.columns]


def test_criteria_board_shows_inconclusive_and_the_ci(paired_store, app_for):
    at = _run(app_for(paired_store, view="criteria"))
    text = "\n".join(str(e.value) for kind in ("markdown", "caption") for e in at.get(kind))
    assert "**1 of 3** criteria pass (latest evaluation of each); 1 inconclusive (the CI straddles the threshold)." in text
    assert text.count("-badge[:material/help: INCONCLUSIVE]") == 1
    assert text.count("-badge[:material/check_circle: PASS]") == 1
    assert text.count("-badge[:material/cancel: FAIL]") == 1  # verdict from `passed`
    assert "value **1.5** (CI [1.31, 1.66]) · threshold ≥ **1.4**" in text
    assert "value **0.2** · threshold ≤ **0.05**" in text  # no CI stored: none shown


def test_criteria_of_a_store_before_verdict_columns_still_render(tmp_path, app_for):
    path = tmp_path / "fcr.duckdb"
    con = duckdb.connect(str(path))
    migrate(con, target=3)  # no criteria.verdict / ci_low / ci_high, no sample_metrics, no contrasts
    con.execute("INSERT INTO runs (run_id, experiment_id, variation_id, seed, status) "
                "VALUES ('old/v/s0/0', 'old', 'v', 0, 'finished')")
    con.execute("INSERT INTO criteria (experiment_id, criterion, passed, value, threshold) VALUES "
                "('old', 'speedup', true, 1.6, 1.4), ('old', 'extra_memory', false, 0.05, 0.02)")
    con.close()
    at = _run(app_for(path, view="criteria"))
    text = "\n".join(str(e.value) for kind in ("markdown", "caption") for e in at.get(kind))
    assert "**1 of 2** criteria pass" in text and "-badge[:material/cancel: FAIL]" in text
    for view in ("compare", "paired", "overview"):
        _run(app_for(path, view=view))


def _hand(values: list[np.ndarray]) -> str:
    """What the report prints for the same values: the mean and its seed-clustered interval."""
    mean, lo, hi = clustered_mean_ci(np.concatenate(values), np.concatenate([[s] * len(v) for s, v in
                                                                             zip(SEEDS, values, strict=True)]))
    return f"{mean:.4g} [{lo:.4g}, {hi:.4g}]"


def test_paired_view_mean_and_interval_per_variation(paired_store, app_for):
    at = _run(app_for(paired_store, view="paired"))
    assert at.selectbox(key="smetric").value == "cache_mse"
    table = _frame_with(at, "samples").set_index("variation")
    label = next(c for c in table.columns if c.startswith("cache error"))
    for variation in SETUP:
        assert table.loc[variation, label] == _hand([cache_mse(variation, s)[1] for s in SEEDS]), variation
        assert table.loc[variation, "seeds"] == 2
    assert table.loc["fcr-fd-10", "samples"] == 11 and table.loc["fd-5", "samples"] == 12
    # the per-seed means: fd-5 is 0.0045 at seed 0 and 0.0049 at seed 1
    assert table.loc["fd-5", "seed means"] == "0.0045 … 0.0049"


def test_paired_difference_pairs_samples_by_seed_and_index(paired_store, app_for):
    at = _run(app_for(paired_store, view="paired", sref="fd-5"))
    table = _frame_with(at, "pairs").set_index("variation")
    diffs = []
    for s in SEEDS:
        k, v = cache_mse("fcr-fd-10", s)
        diffs.append(v - cache_mse("fd-5", s)[1][k])
    assert table.loc["fcr-fd-10", "paired Δ vs fd-5"] == _hand(diffs)
    assert table.loc["fcr-fd-10", "pairs"] == 11
    assert not isinstance(table.loc["fd-5", "paired Δ vs fd-5"], str)  # the reference itself
    assert at.query_params["sref"] == "fd-5"
    assert "Paired difference to fd-5" in [s.value for s in at.subheader]


def test_cache_error_against_stride_per_weights(paired_store, app_for):
    at = _run(app_for(paired_store, view="paired"))
    charts = [(spec, data) for spec, data in _charts(at)
              if "FD stride (steps between encoder passes)" in spec]
    assert len(charts) == 1
    data = pl.from_pandas(next(d for d in charts[0][1] if "series" in d.columns))
    series = sorted(set(data["series"].to_list()))
    assert series == ["fd · FCR λ=0.0, Δ_max=10 · ddim", "fd · FCR λ=0.1, Δ_max=10 · ddim",
                      "fd · no fine-tune · ddim"]
    base = data.filter(pl.col("series") == "fd · no fine-tune · ddim").sort("stride")
    assert base["stride"].to_list() == [5, 10]
    assert base["mean"].to_list() == pytest.approx(
        [float(np.concatenate([cache_mse(v, s)[1] for s in SEEDS]).mean()) for v in ("fd-5", "fd-10")])


def test_paired_view_without_per_sample_metrics_says_what_writes_them(small_store, app_for):
    at = _run(app_for(small_store, view="paired"))
    assert "No per-sample metrics" in at.info[0].value


def test_overview_counts_per_sample_values_and_contrasts(paired_store, app_for):
    at = _run(app_for(paired_store))
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Per-sample values"] == f"{5 * 12 - 1}"
    assert metrics["Contrasts"] == "4"


def test_comparison_opens_on_what_can_be_read_and_flags_the_rest(paired_store, app_for):
    """KID and the interleaved session's s/img by default; an FD stored as not estimable is flagged;
    each contrast says which noise its interval holds."""
    at = _run(app_for(paired_store, view="compare", experiment_id=EXP))
    chosen = [m for m in at.multiselect if m.label == "Metrics"][0].value
    assert chosen == ["kid_efficientnet_lite0", "sec_per_image_interleaved"]
    shown = _frame_with(at, "contrast").set_index("contrast")
    assert shown.loc["stride-gap", "interval holds"].startswith("same weights: sampling noise only")
    assert shown.loc["fcr-effect", "interval holds"].startswith("shared fine-tune: sampling noise only")
    assert "cannot decide a claim about the training method" in shown.loc["fcr-effect", "interval holds"]
    assert shown.loc["fcr-effect", "verdict"] == "INCONCLUSIVE"
    assert shown.loc["fcr-recovers-gap", "interval holds"] == "independent fine-tunes: fine-tunes + sampling"
    speed = _frame_with(at, "variation")
    assert "interleaved" in " ".join(speed.columns)
    at = _run(app_for(paired_store, view="compare", experiment_id=EXP, metrics="fd_efficientnet_lite0"))
    warnings = " ".join(str(w.value) for w in at.warning)
    assert "not estimable" in warnings and "6 samples in 1280 feature dimensions" in warnings
