"""Comparison table: any metric grouped by variation, mean ± 95% t-CI over seeds."""

from __future__ import annotations

import altair as alt
import polars as pl
import streamlit as st

from fcr_results_explorer import queries as q
from fcr_results_explorer import ui
from fcr_results_explorer.context import ViewContext
from fcr_results_explorer.stats import format_mean_ci, interval_bounds
from fcr_results_explorer.views.contrasts import render_contrasts


def render(ctx: ViewContext) -> None:
    reader, flt, state = ctx.reader, ctx.run_filter, ctx.state
    if render_contrasts(ctx):
        st.subheader("Metrics per variation")
    if not ctx.metrics:
        st.info("No metrics in the store yet for these runs.")
        return
    quality = q.default_quality_metric(ctx.metrics)
    speed = q.speed_metric(ctx.metrics)
    default = [m for m in (quality, speed) if m]
    top = st.columns([3, 1])
    chosen = state.multiselect(
        "Metrics", ctx.metrics, key="metrics", default=default, container=top[0],
        format_func=ui.metric_label,
    )
    block = "all"
    if q.FEATURE_VARIANCE in chosen:
        block = state.selectbox("σ²_Δ block", q.feature_blocks(reader), key="block",
                                default="all", container=top[1]) or "all"
    if not chosen:
        st.info("Choose at least one metric.")
        return

    per_metric = {m: q.metric_by_variation(reader, flt, m, block) for m in chosen}
    long = pl.concat([f for f in per_metric.values() if f.height], how="diagonal_relaxed") \
        if any(f.height for f in per_metric.values()) else pl.DataFrame()
    if long.is_empty():
        st.info("No values for these metrics among the filtered runs.")
        return

    keys = long.select("experiment", "variation", *q.PARAM_COLUMNS).unique(
        ["experiment", "variation"], keep="first", maintain_order=True)
    varying, constant = q.varying_params(keys)
    wide = keys.select("experiment", "variation")
    for metric, frame in per_metric.items():
        if frame.is_empty():
            continue
        label = ui.metric_label(metric)
        col = frame.select(
            "experiment", "variation",
            pl.struct("mean", "ci95").map_elements(
                lambda s: format_mean_ci(s["mean"], s["ci95"]), return_dtype=pl.String
            ).alias(label),
            pl.col("n").alias(f"n ({metric})"),
        )
        wide = wide.join(col, on=["experiment", "variation"], how="left")
    # one seed count column when every metric has the same n
    n_cols = [c for c in wide.columns if c.startswith("n (")]
    if n_cols and all(wide[c].equals(wide[n_cols[0]]) for c in n_cols):
        wide = wide.rename({n_cols[0]: "seeds (n)"}).drop(n_cols[1:])
    wide = wide.join(keys.select("experiment", "variation", *varying),
                     on=["experiment", "variation"], how="left")

    if constant:
        st.caption("Same for every row: " + ", ".join(
            f"**{ui.PARAM_LABELS.get(k, k)}** = {v}" for k, v in constant.items()))
    st.caption("mean ± half-width of the 95% confidence interval over seeds (t-distribution, "
               "n − 1 degrees of freedom); one seed shows the value alone.")
    ui.table(
        wide,
        "comparison",
        "comparison",
        export=long.select("experiment", "variation", *varying, "metric", "n", "mean", "sd",
                           "ci95", "min", "max"),
        column_config={c: ui.PARAM_LABELS.get(c, c) for c in varying},
    )
    for metric in chosen:
        prov = q.metric_provenance(reader, metric)
        if prov:
            st.caption(f"`{metric}` — {prov}")
        flagged = q.unestimable(reader, metric)
        if flagged:
            st.warning(f"`{metric}` is not estimable here: each run's value comes from {flagged[0]} samples in "
                       f"{flagged[1]} feature dimensions (singular covariance, biased upwards). Read KID and the "
                       "paired per-sample metrics instead.")
        if metric.startswith(q.INTERLEAVED_SPEED):
            st.caption(f"`{metric}` — the interleaved timing session: mean over its rounds, every sampler timed "
                       "back to back in each round (one timed run per variation).")

    first = chosen[0]
    frame = per_metric[first]
    if frame.height:
        st.subheader(ui.metric_label(first))
        bar_with_ci(frame, first, "comparison-bar")
        _param_vs_metric(ctx, frame, first, varying)
        with st.expander("Values per run (seed)"):
            ui.table(q.metric_per_run(reader, flt, first, block), f"{first}-per-run",
                     "comparison-runs")


def bar_with_ci(frame: pl.DataFrame, metric: str, key: str, x_title: str | None = None) -> None:
    """Point and 95% CI bar per variation (``mean`` and its interval, of a per-variation frame)."""
    single = frame["experiment"].n_unique() == 1
    data = frame.with_columns(*interval_bounds(frame),
        (pl.col("variation") if single
         else pl.col("experiment") + " / " + pl.col("variation")).alias("label"),
    ).select("label", "experiment", "variation", "n", "mean", "ci95", "lo", "hi")
    y = {"field": "label", "type": "nominal", "sort": None, "title": None, "axis": {"labelLimit": 400}}
    colour = {"field": "experiment", "type": "nominal", "legend": None if single else {"orient": "bottom"}}
    x = {"type": "quantitative", "title": x_title or ui.metric_label(metric), "scale": {"zero": False}}
    spec = {"height": {"step": 26}, "layer": [
        {"mark": {"type": "rule", "strokeWidth": 2},
         "encoding": {"y": y, "x": {"field": "lo", **x}, "x2": {"field": "hi"}, "color": colour}},
        {"mark": {"type": "point", "filled": True, "size": 90},
         "encoding": {"y": y, "x": {"field": "mean", **x}, "color": colour, "tooltip": [
             {"field": "experiment"}, {"field": "variation"}, {"field": "n", "type": "quantitative"},
             {"field": "mean", "type": "quantitative", "format": ".4g"},
             {"field": "ci95", "type": "quantitative", "format": ".3g"}]}},
    ]}
    ui.vega_chart(spec, data, f"{metric}-by-variation", key)


def _param_vs_metric(ctx: ViewContext, frame: pl.DataFrame, metric: str, varying: list[str]) -> None:
    numeric = [c for c in varying if c in ("stride", "lambda_fcr", "delta_max", "resolution",
                                           "num_inference_steps", "guidance_scale")]
    if not numeric:
        return
    x = ctx.state.selectbox("Hyper-parameter against the metric", numeric, key="x",
                            default=numeric[0], format_func=lambda c: ui.PARAM_LABELS.get(c, c))
    colour = next((c for c in ("model", "sampler", "experiment") if c in varying or c == "experiment"), "experiment")
    data = frame.filter(pl.col(x).is_not_null()).with_columns(
        (pl.col("mean") - pl.col("ci95").fill_null(0)).alias("lo"),
        (pl.col("mean") + pl.col("ci95").fill_null(0)).alias("hi"),
        pl.col(colour).cast(pl.String).alias("group"),
    ).select("experiment", "variation", "group", x, "n", "mean", "ci95", "lo", "hi")
    if data.is_empty():
        return
    base = alt.Chart(data).encode(
        x=alt.X(f"{x}:Q", title=ui.PARAM_LABELS.get(x, x),
                scale=alt.Scale(zero=False, nice=False, padding=24)),
        color=alt.Color("group:N", title=colour),
    )
    line = base.mark_point(filled=True, size=80).encode(
        y=alt.Y("mean:Q", title=ui.metric_label(metric), scale=alt.Scale(zero=False)),
        tooltip=["variation", "n", alt.Tooltip("mean:Q", format=".4g"),
                 alt.Tooltip("ci95:Q", format=".3g")],
    )
    err = base.mark_errorbar(ticks=True).encode(
        y=alt.Y("lo:Q", title=ui.metric_label(metric)), y2="hi:Q")
    ui.chart((err + line).properties(height=300), data, f"{metric}-vs-{x}", "comparison-param")
