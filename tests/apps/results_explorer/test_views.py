"""The explorer's views through Streamlit's AppTest on a small store written by fcr-eval."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fcr_eval.store import ResultsStore
from scipy import stats

VIEWS = ["overview", "compare", "quality-speed", "mechanism", "criteria", "samples",
         "human-study"]


def _ci(values: list[float]) -> tuple[float, float]:
    """Mean and 95% t-interval half-width, by hand."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)


def _texts(at) -> str:
    parts = []
    for kind in ("markdown", "caption", "info", "warning", "subheader", "title"):
        parts += [str(e.value) for e in at.get(kind)]
    return "\n".join(parts)


def _run(at):
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


@pytest.mark.parametrize("view", VIEWS)
def test_every_view_renders_with_a_csv_export(small_store, app_for, view):
    at = _run(app_for(small_store, view=view))
    assert not at.error, [e.value for e in at.error]
    assert at.get("download_button"), f"{view} offers no CSV download"


def test_overview_shows_experiments_seeds_status_and_code_versions(small_store, app_for):
    at = _run(app_for(small_store))
    assert at.title[0].value == "Overview"
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Experiments"] == "2"
    assert metrics["Variations"] == "4"
    assert metrics["Runs"] == "11"
    exps = at.dataframe[0].value.set_index("experiment")
    assert exps.loc["exp-a", "runs"] == 9 and exps.loc["exp-b", "runs"] == 2
    assert list(exps.loc["exp-a", "seeds"]) == [0, 1, 2]
    assert exps.loc["exp-a", "status"] == "finished: 9"
    assert exps.loc["exp-a", "code_versions"] == "test-0.9 (9)"
    variations = at.dataframe[1].value
    assert sorted(variations["variation"]) == ["fcr-10", "fd-10", "fd-5", "fd-5-b"]
    # only what differs between variations is a column; the rest is one caption
    assert "stride" in variations.columns and "num_inference_steps" not in variations.columns
    assert "steps** = 50" in _texts(at)


def test_comparison_shows_mean_and_t_interval_over_seeds(small_store, app_for):
    at = _run(app_for(small_store, view="compare", metrics="fd_efficientnet_lite0"))
    table = at.dataframe[0].value.set_index("variation")
    col = next(c for c in table.columns if c.startswith("FD"))
    for variation, values in {"fd-5": [10, 12, 14], "fd-10": [20, 21, 22],
                              "fcr-10": [13, 13.5, 14], "fd-5-b": [30, 32]}.items():
        mean, half = _ci(values)
        assert table.loc[variation, col] == f"{mean:.4g} ± {half:.4g}", variation
    assert table.loc["fd-5", col] == "12 ± 4.968"  # 4.303 · 2 / √3
    assert table.loc["fd-5", "seeds (n)"] == 3 and table.loc["fd-5-b", "seeds (n)"] == 2
    # the feature extractor that produced the number is said next to it
    assert "features: efficientnet_lite0" in _texts(at)


def test_comparison_of_several_metrics_includes_timings(small_store, app_for):
    at = _run(app_for(small_store, view="compare",
                      metrics=["fd_efficientnet_lite0", "sec_per_image"]))
    table = at.dataframe[0].value.set_index("variation")
    sec = next(c for c in table.columns if c.startswith("seconds"))
    assert table.loc["fd-5", sec] == "0.1 ± 0"


def test_filters_change_what_is_shown_and_live_in_the_url(small_store, app_for):
    at = _run(app_for(small_store, view="compare", metrics="fd_efficientnet_lite0"))
    assert len(at.dataframe[0].value) == 4
    at.multiselect(key="experiment_id").select("exp-b")
    _run(at)
    assert list(at.dataframe[0].value["variation"]) == ["fd-5-b"]
    assert at.query_params["experiment_id"] == "exp-b"
    assert at.query_params["view"] == "compare"

    at.multiselect(key="experiment_id").unselect("exp-b")
    at.multiselect(key="stride").select("10")
    _run(at)
    assert sorted(at.dataframe[0].value["variation"]) == ["fcr-10", "fd-10"]
    assert "experiment_id" not in at.query_params

    # λ filter: NULL λ is offered as "none"
    at.multiselect(key="stride").unselect("10")
    at.multiselect(key="lambda_fcr").select("none")
    _run(at)
    assert sorted(at.dataframe[0].value["variation"]) == ["fd-10", "fd-5", "fd-5-b"]


def test_a_shared_url_restores_view_and_filters(small_store, app_for):
    at = _run(app_for(small_store, view="compare", metrics="fd_efficientnet_lite0",
                      scheduler="dpmsolver++", resolution="64"))
    assert at.title[0].value == "Comparison and contrasts"
    assert at.multiselect(key="scheduler").value == ["dpmsolver++"]
    assert list(at.dataframe[0].value["variation"]) == ["fd-5-b"]
    assert "2 runs match" in "\n".join(c.value for c in at.sidebar.get("caption"))


def test_switching_views_keeps_the_filters(small_store, app_for):
    at = _run(app_for(small_store, view="compare", experiment_id="exp-a"))
    at.radio(key="view").set_value("overview")
    _run(at)
    assert at.title[0].value == "Overview"
    assert {m.label: m.value for m in at.metric}["Runs"] == "9"
    assert at.query_params["experiment_id"] == "exp-a"


def test_quality_speed_marks_the_pareto_front(small_store, app_for):
    at = _run(app_for(small_store, view="quality-speed", exp="exp-a"))
    caption = next(c.value for c in at.caption if "Pareto front" in c.value)
    # fcr-10 is as fast as fd-10 and better; fd-5 is slower but best: both on the front
    assert "**fcr-10**" in caption and "**fd-5**" in caption
    assert "**fd-10**" not in caption


def test_mechanism_fits_variance_against_the_fid_difference(small_store, app_for):
    at = _run(app_for(small_store, view="mechanism", experiment_id="exp-a"))
    # by default the fit stays within the FCR variations' stride (10): two points, no fit
    assert at.selectbox(key="fit_stride").value == "10"
    assert "needs at least three" in _texts(at)
    at.selectbox(key="fit_stride").set_value("all")
    _run(at)
    assert at.query_params["fit_stride"] == "all"
    # per variation: σ²_Δ mean over Δ = 1..3 and ΔFD against the reference fd-5
    x = np.array([0.04 * 2, 0.04 * 2, 0.02 * 2])  # fd-5, fd-10, fcr-10
    y = np.array([0.0, 21 - 12, 13.5 - 12])
    r = np.corrcoef(x, y)[0, 1]
    shown = {m.label: m.value for m in at.metric}
    assert shown["R²"] == f"{r * r:.3f}"
    assert shown["points"] == "3"
    assert at.selectbox(key="ref").value == "fd-5"


def test_criteria_board_shows_pass_fail_with_numbers(small_store, app_for):
    at = _run(app_for(small_store, view="criteria"))
    text = _texts(at)
    assert "**1 of 3** criteria pass (latest evaluation of each); 1 could not be evaluated" in text
    assert "value **0.125** · threshold ≤ **0.05**" in text
    assert "value **0.5** · threshold ≥ **0.3**" in text
    assert "baseline: 12 [7.03, 16.97] (n=3)" in text  # the numbers behind the verdict
    assert "reason: no finetune_compute_fraction metric" in text
    assert text.count("-badge[:material/check_circle: PASS]") == 1
    assert text.count("-badge[:material/cancel: FAIL]") == 1
    assert text.count("-badge[not evaluated]") == 1


def test_samples_side_by_side_for_one_prompt_and_seed(small_store, app_for):
    at = _run(app_for(small_store, view="samples", vars=["fd-5", "fcr-10"], prompt="p1"))
    assert "“a photo of a bag”" in _texts(at)
    images = at.get("image")
    # 2 variations × 3 run seeds
    assert len(images) == 6
    captions = [img.proto.imgs[0].caption for img in images]
    assert captions[:2] == ["fd-5 · exp-a", "fcr-10 · exp-a"]


def test_human_study_win_rates_and_bradley_terry(small_store, app_for):
    at = _run(app_for(small_store, view="human-study"))
    pairs = at.dataframe[0].value
    row = pairs.iloc[0]
    assert (row["variation_a"], row["variation_b"], row["votes"]) == ("fcr-10", "fd-10", 106)
    assert row["win_rate_a"] == pytest.approx(0.7)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((0.61, 0.79))
    assert "Bradley–Terry scores" in _texts(at)


def test_human_study_without_votes_file_says_so(tmp_path, small_store, app_for):
    import shutil

    shutil.copy(small_store, tmp_path / "fcr.duckdb")
    at = _run(app_for(tmp_path / "fcr.duckdb", view="human-study"))
    assert "No human-study results yet" in at.info[0].value


def test_missing_store_shows_guidance(tmp_path, app_for):
    at = _run(app_for(tmp_path / "nothing-here.duckdb", view="compare"))
    assert not at.error
    assert "No results store at" in at.info[0].value
    assert "fcr-eval run" in at.info[0].value


@pytest.mark.parametrize("view", VIEWS)
def test_empty_store_shows_guidance_not_an_error(tmp_path, app_for, view):
    ResultsStore(tmp_path / "fcr.duckdb")  # the writer creates the schema, no runs yet
    at = _run(app_for(tmp_path / "fcr.duckdb", view=view))
    assert not at.error
    assert "has no finished runs yet" in at.info[0].value


def test_stride_axes_say_what_each_cache_kind_plots(store_with_deepcache, app_for):
    """An FD stride and a DeepCache interval are different quantities: separate charts, each
    axis titled with its own meaning."""
    at = _run(app_for(store_with_deepcache, view="quality-speed", exp="exp-b"))
    specs = [e.proto.spec for e in at.main.children.values() if getattr(e, "type", "") == "vega_lite_chart"]
    fd = [s for s in specs if "FD stride (steps between encoder passes)" in s]
    dc = [s for s in specs if "DeepCache interval (steps between full UNet passes)" in s]
    assert len(fd) == 1 and len(dc) == 1 and fd[0] != dc[0]
    assert "stride (steps between encoder passes)" not in dc[0]



@pytest.mark.parametrize("view", VIEWS)
def test_a_file_that_is_not_a_results_store_is_named_in_every_view(tmp_path, small_store, app_for, view):
    """A foreign DuckDB or a study file at --db: the page says what the file is (never "no finished
    runs yet"); a store cut off before the end of its data: the page says so instead of a
    traceback. The files are not changed."""
    import hashlib

    import duckdb
    from fcr_human_study.store import StudyStore

    foreign, study, cut = tmp_path / "foreign.duckdb", tmp_path / "study.duckdb", tmp_path / "cut.duckdb"
    with duckdb.connect(str(foreign)) as con:
        con.execute("CREATE TABLE customers (id INTEGER, name VARCHAR)")
    StudyStore(study).close()
    data = small_store.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    files = {foreign: "a DuckDB database with other tables (customers)", study: "a human-study file",
             cut: "is cut off"}
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    for path, phrase in files.items():
        at = _run(app_for(path, view=view))
        text = " ".join(str(e.value) for e in at.error)
        assert phrase in text, (path.name, text)
        assert "no finished runs" not in _texts(at)
    assert before == {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
