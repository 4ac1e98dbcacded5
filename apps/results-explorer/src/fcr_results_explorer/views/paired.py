"""Paired per-sample metrics: one value per generated sample (``sample_metrics``), per variation.

Every variation of one experiment and seed starts from the same x_T and prompt, so a per-sample
metric can be compared sample by sample. The view shows, for one experiment and metric (cache
error against the same weights' uncached sample, class log-probability, ...):

* per variation: samples, seeds, mean with a 95% interval, the spread of the per-seed means;
* optionally the paired difference to a reference variation (same seed and sample index);
* the metric against the stride, per weights (one line per sampler · fine-tuning).

DuckDB reduces the per-sample rows to one row per run and seed; Python pools those few rows.
"""

from __future__ import annotations

import polars as pl
import streamlit as st

from fcr_results_explorer import queries as q
from fcr_results_explorer import ui
from fcr_results_explorer.context import ViewContext
from fcr_results_explorer.stats import format_interval
from fcr_results_explorer.views.comparison import bar_with_ci
from fcr_results_explorer.views.quality_speed import by_stride

NO_REFERENCE = "none"
CI_NOTE = ("mean [95% interval, bootstrapped over samples clustered by seed] — the interval "
           "`fcr-eval report` prints for the same metric (fcr_eval.analysis.stats.clustered_interval): "
           "every variation of a seed shares its x_T and prompts, so samples of one seed are not "
           "independent; “seed means” is the range of the per-seed means. It describes each mean; the "
           "contrasts in the comparison view carry the intervals at the unit of replication.")


def _mean_ci(name: str, digits: int = 4) -> pl.Expr:
    return pl.struct("mean", "ci_low", "ci_high").map_elements(
        lambda s: format_interval(s["mean"], s["ci_low"], s["ci_high"], digits), return_dtype=pl.String).alias(name)


def render(ctx: ViewContext) -> None:
    reader, flt, state = ctx.reader, ctx.run_filter, ctx.state
    names = q.sample_metric_names(reader)
    experiments = q.sample_metric_experiments(reader, flt) if names else []
    if not experiments:
        st.info("No per-sample metrics (`sample_metrics`) for the filtered runs yet. The experiment "
                "runner stores one value per sample (cache error, class log-probability, "
                "CLIPScore, ...) for runs written at store schema 4 or later.")
        return
    c1, c2, c3 = st.columns([2, 2, 2])
    default = "cache_mse" if "cache_mse" in names else names[0]
    metric = state.selectbox("Per-sample metric", names, key="smetric", default=default,
                             container=c1, format_func=ui.metric_label)
    experiment = state.selectbox("Experiment", experiments, key="exp", container=c2) \
        if len(experiments) > 1 else experiments[0]
    variations = q.experiment_variations(reader, experiment)
    reference = state.selectbox(
        "Paired difference against", [NO_REFERENCE, *variations], key="sref",
        default=NO_REFERENCE, container=c3,
        format_func=lambda v: "— (no paired difference)" if v == NO_REFERENCE else v)
    frame, diff = q.sample_metric_summary(reader, flt, metric, experiment,
                                          None if reference == NO_REFERENCE else reference)
    if frame.is_empty():
        st.info(f"No finite `{metric}` values among the filtered runs of {experiment}.")
        return
    st.caption(f"`{metric}`: {ui.metric_label(metric)}"
               + (f" — {prov}" if (prov := q.sample_metric_provenance(reader, metric)) else ""))

    varying, constant = q.varying_params(frame)
    shown = frame.select(
        "variation", *varying, pl.col("n").alias("samples"), pl.col("n_seeds").alias("seeds"),
        _mean_ci(ui.metric_label(metric)),
        pl.format("{} … {}", pl.col("seed_min").round_sig_figs(4),
                  pl.col("seed_max").round_sig_figs(4)).alias("seed means"),
    )
    if diff is not None:
        shown = shown.join(
            diff.select("variation", _mean_ci(f"paired Δ vs {reference}"),
                        pl.col("n").alias("pairs")),
            on="variation", how="left")
    if constant:
        st.caption("Same for every row: " + ", ".join(
            f"**{ui.PARAM_LABELS.get(k, k)}** = {v}" for k, v in constant.items()))
    nonfinite = frame.filter(pl.col("n_nonfinite") > 0) if "n_nonfinite" in frame.columns else frame.clear()
    if nonfinite.height:
        st.caption("Non-finite values left out (e.g. PSNR of a sample identical to its reference): "
                   + ", ".join(f"{v} {n:,}" for v, n in nonfinite.select("variation", "n_nonfinite").iter_rows()))
    st.caption(CI_NOTE)
    ui.table(shown, f"{experiment}-{metric}-per-variation", "paired",
             export=frame.drop("metric") if diff is None else frame.join(
                 diff.select("variation", *[pl.col(c).alias(f"diff_{c}") for c in
                                            ("n", "mean", "sd", "se", "ci_low", "ci_high")]),
                 on="variation", how="left"),
             column_config={c: ui.PARAM_LABELS.get(c, c) for c in varying})
    bar_with_ci(frame, metric, "paired-bar")
    if diff is not None and diff.height:
        _difference_chart(diff, metric, reference)
    by_stride(frame, metric, f"{ui.metric_label(metric).split(' (')[0]} against stride, per weights",
              key="paired-stride")


def _difference_chart(diff: pl.DataFrame, metric: str, reference: str) -> None:
    st.subheader(f"Paired difference to {reference}")
    data = diff.with_columns(
        pl.col("ci_low").fill_null(pl.col("mean")).alias("lo"),
        pl.col("ci_high").fill_null(pl.col("mean")).alias("hi"),
    ).select("variation", "n", "mean", "lo", "hi")
    y = {"field": "variation", "type": "nominal", "sort": None, "title": None, "axis": {"labelLimit": 400}}
    x = {"type": "quantitative", "title": f"{ui.metric_label(metric)}: variation − {reference}, paired"}
    spec = {"height": {"step": 26}, "layer": [
        {"mark": {"type": "rule", "color": "#999", "strokeDash": [4, 4]}, "encoding": {"x": {"datum": 0, **x}}},
        {"mark": {"type": "rule", "strokeWidth": 2},
         "encoding": {"y": y, "x": {"field": "lo", **x}, "x2": {"field": "hi"}}},
        {"mark": {"type": "point", "filled": True, "size": 90},
         "encoding": {"y": y, "x": {"field": "mean", **x}, "tooltip": [
             {"field": "variation"}, {"field": "n", "type": "quantitative"},
             {"field": "mean", "type": "quantitative", "format": ".4g"},
             {"field": "lo", "type": "quantitative", "format": ".3g"},
             {"field": "hi", "type": "quantitative", "format": ".3g"}]}},
    ]}
    ui.vega_chart(spec, data, f"{metric}-paired-difference-{reference}", "paired-diff")
