"""Quality against speed (Pareto front marked) and quality against stride per model."""

from __future__ import annotations

import altair as alt
import polars as pl
import streamlit as st

from fcr_results_explorer import queries as q
from fcr_results_explorer import ui
from fcr_results_explorer.context import ViewContext
from fcr_results_explorer.stats import interval_bounds, pareto_front


def render(ctx: ViewContext) -> None:
    reader, flt, state = ctx.reader, ctx.run_filter, ctx.state
    speeds = [m for m in ctx.metrics if m.startswith("sec_per_image")]
    qualities = [m for m in ctx.metrics if m not in q.TIMING_COLUMNS and "@bs" not in m]
    if not qualities:
        st.info("No quality metrics in the store yet for these runs.")
        return
    c1, c2 = st.columns(2)
    quality = state.selectbox("Quality metric", qualities, key="quality",
                              default=q.default_quality_metric(qualities), container=c1,
                              format_func=ui.metric_label)
    qf = q.metric_by_variation(reader, flt, quality)
    if not speeds:
        st.info("No timings in the store yet: the quality–speed plot needs `timings` rows.")
    else:
        speed = state.selectbox("Speed", speeds, key="speed", default=q.speed_metric(speeds),
                                container=c2, format_func=ui.metric_label)
        sf = q.metric_by_variation(reader, flt, speed)
        st.subheader("Quality against seconds per image")
        experiments = sorted(qf["experiment"].unique().to_list())
        # A front only compares like with like: one experiment (model, data, hardware) at a time.
        experiment = state.selectbox("Experiment", experiments, key="exp") if len(
            experiments) > 1 else (experiments[0] if experiments else None)
        if experiment is not None:
            _pareto(qf.filter(pl.col("experiment") == experiment),
                    sf.filter(pl.col("experiment") == experiment), quality, speed)
    by_stride(qf, quality, "Quality against stride, per model")


def _family(frame: pl.DataFrame) -> pl.Expr:
    """Sampler and fine-tuning of a variation, e.g. ``fd · FCR λ=0.1`` or ``deepcache``."""
    delta = (pl.when(pl.col("delta_max").is_null()).then(pl.lit(""))
             .otherwise(pl.lit(", Δ_max=") + pl.col("delta_max").cast(pl.String))
             if "delta_max" in frame.columns else pl.lit(""))
    training = (
        pl.when(pl.col("lambda_oc").is_not_null())
        .then(pl.lit("output consistency λ=") + pl.col("lambda_oc").cast(pl.String) + delta)
        .when(pl.col("lambda_fcr").is_null()).then(pl.lit("no fine-tune"))
        .otherwise(pl.lit("FCR λ=") + pl.col("lambda_fcr").cast(pl.String) + delta)
    )
    return (pl.col("sampler").fill_null("?") + pl.lit(" · ") + training)


def _pareto(qf: pl.DataFrame, sf: pl.DataFrame, quality: str, speed: str) -> None:
    data = qf.select(
        "experiment", "variation", "model", "sampler", "stride", "lambda_fcr", "lambda_oc",
        _family(qf).alias("family"), pl.col("n").alias("n_quality"), pl.col("mean").alias("quality"),
        pl.col("ci95").alias("quality_ci95"),
    ).join(
        sf.select("experiment", "variation", pl.col("mean").alias("sec_per_image"),
                  pl.col("ci95").alias("sec_ci95")),
        on=["experiment", "variation"], how="inner",
    )
    if data.is_empty():
        st.info("No variation has both a quality value and a timing.")
        return
    front = pareto_front(data["sec_per_image"].to_list(), data["quality"].to_list(),
                         q.lower_is_better(quality))
    data = data.with_columns(
        pl.Series("pareto", front),
        (pl.col("quality") - pl.col("quality_ci95").fill_null(0)).alias("q_lo"),
        (pl.col("quality") + pl.col("quality_ci95").fill_null(0)).alias("q_hi"),
    ).sort("sec_per_image")
    base = alt.Chart(data).encode(
        x=alt.X("sec_per_image:Q", title=ui.metric_label(speed), scale=alt.Scale(zero=False)),
    )
    y = alt.Y("quality:Q", title=ui.metric_label(quality), scale=alt.Scale(zero=False))
    err = base.mark_rule(opacity=0.5).encode(y="q_lo:Q", y2="q_hi:Q", color="family:N")
    pts = base.mark_point(filled=True, size=120).encode(
        y=y,
        color=alt.Color("family:N", title="sampler · fine-tuning"),
        shape=alt.Shape("pareto:N", title="on Pareto front",
                        scale=alt.Scale(domain=[True, False], range=["diamond", "circle"])),
        tooltip=["experiment", "variation", "stride", "lambda_fcr", "lambda_oc",
                 alt.Tooltip("quality:Q", format=".4g"), alt.Tooltip("quality_ci95:Q", format=".3g"),
                 alt.Tooltip("sec_per_image:Q", format=".4g"), "pareto"],
    )
    line = alt.Chart(data.filter(pl.col("pareto"))).mark_line(
        strokeDash=[6, 4], color="#888").encode(x="sec_per_image:Q", y="quality:Q")
    labels = alt.Chart(data.filter(pl.col("pareto"))).mark_text(
        align="left", dx=9, dy=-7, fontSize=11).encode(
        x="sec_per_image:Q", y="quality:Q", text="variation:N")
    ui.chart((line + err + pts + labels).properties(height=420), data, "quality-vs-speed",
             "pareto")
    on_front = data.filter(pl.col("pareto"))["variation"].to_list()
    st.caption("Diamonds on the dashed line are the Pareto front (no other variation is both "
               "faster and better); bars are 95% CIs over seeds. Front: "
               + ", ".join(f"**{v}**" for v in on_front))


#: What the stride column means for each cache kind, as an axis title.
STRIDE_AXIS = {
    "fd": "FD stride (steps between encoder passes)",
    "deepcache": "DeepCache interval (steps between full UNet passes)",
}


def by_stride(qf: pl.DataFrame, quality: str, title: str, key: str = "stride") -> None:
    """``quality`` (a per-variation frame: ``mean`` and its interval, ``n`` and the parameters) against
    the stride: one chart per cache kind, one line per sampler · fine-tuning · scheduler, one
    panel per model."""
    st.subheader(title)
    data = qf.filter(pl.col("stride").is_not_null())
    if data.is_empty():
        st.info("No run with an encoder-caching stride among the filtered runs.")
        return
    data = data.with_columns(
        (_family(data) + pl.lit(" · ") + pl.col("scheduler").fill_null("?")).alias("series"),
        *interval_bounds(data),
    ).select("experiment", "variation", "model", "sampler", "series", "stride", "n", "mean", "ci95", "lo",
             "hi").sort("stride")
    # A DeepCache interval and an FD stride are different quantities: one chart per cache kind,
    # each axis titled with what it plots.
    for kind in sorted(data["sampler"].unique().to_list(), key=lambda k: (k not in STRIDE_AXIS, k)):
        _stride_chart(data.filter(pl.col("sampler") == kind), quality,
                      STRIDE_AXIS.get(kind, f"{kind} stride"), kind, key)


def _stride_chart(data: pl.DataFrame, quality: str, x_title: str, kind: str, key: str) -> None:
    x = {"field": "stride", "type": "quantitative", "title": x_title, "axis": {"tickMinStep": 1},
         "scale": {"zero": False, "nice": False, "padding": 20}}
    colour = {"field": "series", "type": "nominal", "title": "sampler · fine-tuning · scheduler",
              "legend": {"labelLimit": 320}}
    y_title = ui.metric_label(quality)
    layered = {"layer": [
        {"mark": {"type": "errorbar", "ticks": True},
         "encoding": {"x": x, "color": colour, "y": {"field": "lo", "type": "quantitative", "title": y_title},
                      "y2": {"field": "hi"}}},
        {"mark": {"type": "line", "point": {"filled": True, "size": 70}},
         "encoding": {"x": x, "color": colour,
                      "y": {"field": "mean", "type": "quantitative", "title": y_title, "scale": {"zero": False}},
                      "tooltip": [{"field": "variation"}, {"field": "series"},
                                  {"field": "stride", "type": "quantitative"}, {"field": "n", "type": "quantitative"},
                                  {"field": "mean", "type": "quantitative", "format": ".4g"},
                                  {"field": "ci95", "type": "quantitative", "format": ".3g"}]}},
    ]}
    if data["model"].n_unique() > 1:
        spec = {"facet": {"column": {"field": "model", "type": "nominal", "title": None}},
                "spec": {**layered, "height": 300, "width": 320}}
    else:
        spec = {**layered, "height": 300}
    ui.vega_chart(spec, data, f"{quality}-vs-stride-{kind}", f"{key}-{kind}")
