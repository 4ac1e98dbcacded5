"""Mechanism: where the cache error enters on the sampling trajectory (the ``cache_attribution``
rows: a step × feature heat map and the per-step table of one variation), encoder-feature variance
σ²_Δ against Δ, and σ²_Δ against the FID difference.

Where the store holds both Δ ranges (``feature_stats.delta_unit``: the cache's range in sampler
steps and the paper's literal 1…Δ_max timesteps) one is chosen, never averaged into the other;
where it holds the features' energy, σ²_Δ / energy (scale-free) can be shown instead."""

from __future__ import annotations

import altair as alt
import polars as pl
import streamlit as st

from fcr_results_explorer import queries as q
from fcr_results_explorer import ui
from fcr_results_explorer.context import ViewContext
from fcr_results_explorer.stats import linear_fit


def default_reference(frame: pl.DataFrame) -> str | None:
    """The FD baseline at the smallest stride without FCR (FD-5-baseline in exp-1)."""
    if frame.is_empty():
        return None
    own = pl.col("lambda_fcr").is_null() & pl.col("lambda_oc").is_null()  # the model's own weights
    base = frame.filter(own & (pl.col("sampler") == "fd"))
    if base.is_empty():
        base = frame.filter(own | (pl.col("lambda_fcr") == 0))
    if base.is_empty():
        base = frame
    base = base.sort(pl.col("stride").fill_null(10**6), "variation")
    return base["variation"][0]


#: What each heat-map quantity of ``cache_attribution`` is (fcr-sample's names).
ATTRIBUTION_LABELS = {
    "only_stale_error": "one-step ε error, only this feature stale",
    "only_fresh_error": "one-step ε error, only this feature fresh",
    "relative_change": "feature change on the trajectory (σ²_Δ / energy)",
    "decoder_gain": "decoder gain (error / change)",
    "change": "feature change σ²_Δ",
    "energy": "feature energy (mean square)",
}


def _attribution(ctx: ViewContext) -> None:
    """The cache-error attribution of one variation (mean over its filtered seeds)."""
    reader, flt, state = ctx.reader, ctx.run_filter, ctx.state
    have = q.attribution_variations(reader, flt)
    if have.is_empty():
        return
    st.subheader("Where the cache error enters (attribution on the sampling trajectory)")
    options = [f"{e} / {v}" for e, v in zip(have["experiment"], have["variation"], strict=True)]
    c1, c2 = st.columns([3, 2])
    chosen = state.selectbox("Variation", options, key="attr_var", default=options[0], container=c1)
    quantity = state.selectbox("Heat map", list(q.ATTRIBUTION_HEAT_QUANTITIES), key="attr_q",
                               default="only_stale_error", container=c2,
                               format_func=lambda x: ATTRIBUTION_LABELS.get(x, x))
    exp, var = chosen.split(" / ", 1)
    info = have.filter((pl.col("experiment") == exp) & (pl.col("variation") == var)).row(0, named=True)
    cells = q.attribution_cells(reader, flt, exp, var, quantity)
    if cells.is_empty():
        st.info(f"No {quantity} rows for {chosen}.")
    else:
        heat = alt.Chart(cells).mark_rect().encode(
            x=alt.X("step:O", title="sampler step (served from the cache)"),
            y=alt.Y("feature:N", title="cached feature", sort=None),
            color=alt.Color("value:Q", title=quantity, scale=alt.Scale(type="symlog", scheme="magma")),
            tooltip=["step", "feature", alt.Tooltip("value:Q", format=".4g"), "runs"],
        )
        ui.chart(heat.properties(height=220), cells, f"attribution-{var}-{quantity}", "attr-heat")
    steps = q.attribution_steps(reader, flt, exp, var)
    st.caption(f"{info['cache'] or ''} · {info['runs']} run(s) × {info['n_samples']} samples; relative "
               "squared errors pooled over the samples, mean over runs. final_error: the sample's error "
               "when only that step is served from the cache.")
    ui.table(steps, f"attribution-steps-{var}", "attr-steps")


def render(ctx: ViewContext) -> None:
    reader, flt, state = ctx.reader, ctx.run_filter, ctx.state
    _attribution(ctx)
    blocks = q.feature_blocks(reader)
    if not blocks:
        st.info("No encoder-feature statistics (`feature_stats`) in the store yet.")
        return
    c1, c2, c3, c4 = st.columns([2, 3, 2, 1])
    # one colour per variation in both charts
    colours = alt.Scale(domain=sorted(set(q.variations_with_feature_stats(reader, flt))))
    block = state.selectbox("Feature block", blocks, key="block", default="all", container=c1)
    units = q.feature_delta_units(reader)
    unit = None
    if len(units) > 1:  # both ranges measured: never average one into the other
        unit = state.selectbox("Δ range", units, key="dunit",
                               default="sampler_steps" if "sampler_steps" in units else units[0],
                               container=c2, format_func=lambda u: DELTA_RANGES.get(u, u))
    elif units:
        c2.caption(f"Δ range: {DELTA_RANGES.get(units[0], units[0])}")
    scale_free = q.has_feature_energy(reader) and state.checkbox(
        "scale-free (σ²_Δ / energy)", key="scalefree", default=False, container=c3,
        help="σ²_Δ divided by the feature's mean square: shrinking features cannot pass for "
             "consistent ones")
    log_y = state.checkbox("log scale", key="logy", default=False, container=c4)
    what = "σ²_Δ / energy" if scale_free else "σ²_Δ"

    st.subheader(f"{what} against Δ")
    frame = q.variance_by_delta(reader, flt, block, unit, scale_free)
    if frame.is_empty():
        st.info("No feature statistics for the filtered runs.")
    else:
        data = frame.with_columns(
            (pl.col("mean") - pl.col("ci95").fill_null(0)).clip(lower_bound=1e-30).alias("lo"),
            (pl.col("mean") + pl.col("ci95").fill_null(0)).alias("hi"),
        )
        scale = alt.Scale(type="log") if log_y else alt.Scale(zero=False)
        base = alt.Chart(data).encode(
            x=alt.X("delta:Q", title="Δ (timesteps apart)", axis=alt.Axis(tickMinStep=1)),
        )
        band = base.mark_area(opacity=0.07).encode(
            y=alt.Y("lo:Q", scale=scale), y2="hi:Q",
            color=alt.Color("variation:N", legend=None, scale=colours))
        line = base.mark_line(point=True).encode(
            color=alt.Color("variation:N", legend=alt.Legend(symbolLimit=0, labelLimit=260),
                            scale=colours),
            y=alt.Y("mean:Q", title=f"{what} (block {block})", scale=scale),
            tooltip=["experiment", "variation", "delta", "n",
                     alt.Tooltip("mean:Q", format=".4g"), alt.Tooltip("ci95:Q", format=".3g")],
        )
        ui.chart((line + band).properties(height=360), data, f"variance-vs-delta-{block}",
                 "var-delta")
    _variance_vs_fid(ctx, block, colours, unit, scale_free)


#: What each ``feature_stats.delta_unit`` measured.
DELTA_RANGES = {
    "sampler_steps": "the cache's range (k sampler steps, k = 1…stride)",
    "timesteps": "the paper's literal range (1…Δ_max DDPM timesteps)",
}


def _variance_vs_fid(ctx: ViewContext, block: str, colours: alt.Scale, unit: str | None,
                     scale_free: bool) -> None:
    what = "σ²_Δ / energy" if scale_free else "σ²_Δ"
    st.subheader(f"{what} against the quality difference")
    qualities = [m for m in ctx.metrics if m not in q.TIMING_COLUMNS and "@bs" not in m
                 and m != q.FEATURE_VARIANCE]
    if not qualities:
        st.info("No quality metrics in the store yet.")
        return
    reader, flt, state = ctx.reader, ctx.run_filter, ctx.state
    var = q.metric_by_variation(reader, flt, q.FEATURE_VARIANCE, block, unit, scale_free)
    c1, c2, c3 = st.columns([2, 2, 1])
    quality = state.selectbox("Quality metric", qualities, key="quality",
                              default=q.default_quality_metric(qualities), container=c1,
                              format_func=ui.metric_label)
    qual = q.metric_by_variation(reader, flt, quality)
    # σ²_Δ explains the quality lost to caching at a given stride: fit within one stride.
    strides = sorted({int(s) for s in qual["stride"].drop_nulls().to_list()}) if qual.height else []
    fcr_strides = qual.filter(pl.col("lambda_fcr").is_not_null() | pl.col("lambda_oc").is_not_null())["stride"] \
        .drop_nulls() \
        if qual.height else pl.Series([], dtype=pl.Int64)
    default_stride = str(int(fcr_strides.mode().sort()[0])) if fcr_strides.len() else "all"
    fit_stride = state.selectbox("Stride of the fit", ["all", *map(str, strides)],
                                 key="fit_stride", default=default_stride, container=c3)
    if var.is_empty() or qual.is_empty():
        st.info("Needs both feature statistics and the quality metric for the same variations.")
        return
    ref = state.selectbox(
        "Reference variation (Δquality = variation − reference, per experiment)",
        sorted(qual["variation"].unique().to_list()), key="ref",
        default=default_reference(qual), container=c2,
    )
    refs = qual.filter(pl.col("variation") == ref).select(
        "experiment", pl.col("mean").alias("ref_quality"))
    data = (
        var.select("experiment", "variation", "model", "stride", "lambda_fcr",
                   pl.col("mean").alias("variance"), pl.col("ci95").alias("variance_ci95"))
        .join(qual.select("experiment", "variation", pl.col("mean").alias("quality"),
                          pl.col("ci95").alias("quality_ci95")),
              on=["experiment", "variation"])
        .join(refs, on="experiment")
        .with_columns((pl.col("quality") - pl.col("ref_quality")).alias("delta_quality"))
        .sort("variance")
    )
    if fit_stride not in (None, "all"):
        data = data.filter(pl.col("stride") == int(fit_stride))
    if data.is_empty():
        st.info(f"No variation at stride {fit_stride} in an experiment with the reference "
                f"variation {ref!r}.")
        return
    fit = linear_fit(data["variance"].to_list(), data["delta_quality"].to_list())
    label = f"Δ {ui.metric_label(quality).split(' (')[0]} vs {ref}"
    pts = alt.Chart(data).mark_point(filled=True, size=110).encode(
        x=alt.X("variance:Q", title=f"{what}, mean over Δ (block {block})",
                scale=alt.Scale(zero=False)),
        y=alt.Y("delta_quality:Q", title=label),
        color=alt.Color("variation:N", legend=None, scale=colours),
        tooltip=["experiment", "variation", alt.Tooltip("variance:Q", format=".4g"),
                 alt.Tooltip("delta_quality:Q", format=".4g")],
    )
    names = alt.Chart(data).mark_text(align="left", dx=9, dy=-7, fontSize=11).encode(
        x="variance:Q", y="delta_quality:Q", text="variation:N")
    layers = [pts, names]
    if fit is not None:
        xs = data["variance"]
        line_data = pl.DataFrame({"variance": [xs.min(), xs.max()]}).with_columns(
            (pl.col("variance") * fit.slope + fit.intercept).alias("delta_quality"))
        layers.insert(0, alt.Chart(line_data).mark_line(color="#888", strokeDash=[6, 4]).encode(
            x="variance:Q", y="delta_quality:Q"))
    ui.chart(alt.layer(*layers).properties(height=340), data, f"variance-vs-delta-{quality}",
             "var-fid")
    if fit is None:
        st.caption("A fit needs at least three variations with different σ²_Δ.")
    else:
        cols = st.columns(4)
        cols[0].metric("R²", f"{fit.r2:.3f}")
        cols[1].metric("Pearson r", f"{fit.pearson_r:.3f}")
        cols[2].metric("slope", f"{fit.slope:.4g}")
        cols[3].metric("points", fit.n)
        st.caption(f"Least-squares fit Δquality = {fit.slope:.4g}·σ²_Δ + {fit.intercept:.4g} "
                   f"over variations{'' if fit_stride == 'all' else f' at stride {fit_stride}'}; "
                   f"p = {fit.p_value:.3g}. The design's criterion asks for R² ≥ 0.6.")
