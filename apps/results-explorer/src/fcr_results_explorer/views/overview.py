"""Overview: experiments, variations, seeds, status, code versions."""

from __future__ import annotations

import polars as pl
import streamlit as st

from fcr_results_explorer import queries as q
from fcr_results_explorer import ui
from fcr_results_explorer.context import ViewContext


def render(ctx: ViewContext) -> None:
    reader, flt = ctx.reader, ctx.run_filter
    counts = q.table_counts(reader)
    exps = q.experiments_overview(reader, flt)

    cols = st.columns(7)
    cols[0].metric("Experiments", exps.height)
    cols[1].metric("Variations", int(exps["variations"].sum()) if exps.height else 0)
    cols[2].metric("Runs", int(exps["runs"].sum()) if exps.height else 0)
    cols[3].metric("Metric values", f"{counts.get('metrics', 0):,}")
    cols[4].metric("Samples", f"{counts.get('samples', 0):,}")
    cols[5].metric("Per-sample values", f"{counts.get('sample_metrics', 0):,}",
                   help="rows of `sample_metrics`: one value per sample per metric")
    cols[6].metric("Contrasts", f"{counts.get('contrasts', 0):,}")

    st.subheader("Experiments")
    ui.table(
        exps,
        "experiments",
        "overview-experiments",
        column_config={
            "seeds": st.column_config.ListColumn("seeds"),
            "first_started": st.column_config.DatetimeColumn("first started", format="YYYY-MM-DD HH:mm"),
            "last_finished": st.column_config.DatetimeColumn("last finished", format="YYYY-MM-DD HH:mm"),
            "code_versions": st.column_config.TextColumn("code versions (runs)"),
        },
    )

    st.subheader("Variations")
    variations = q.variations_overview(reader, flt)
    varying, constant = q.varying_params(variations)
    if constant:
        st.caption(
            "Same for every variation shown: "
            + ", ".join(f"**{ui.PARAM_LABELS.get(k, k)}** = {v}" for k, v in constant.items())
        )
    shown = variations.select(
        ["experiment", "variation", "runs", "seeds", "status", "code_versions", *varying,
         "last_finished"]
    )
    ui.table(
        shown,
        "variations",
        "overview-variations",
        export=variations,
        column_config={
            "seeds": st.column_config.ListColumn("seeds"),
            "last_finished": st.column_config.DatetimeColumn("last finished", format="YYYY-MM-DD HH:mm"),
            **{c: ui.PARAM_LABELS.get(c, c) for c in varying},
        },
    )
    if variations.height >= 1000:
        st.caption("Showing the first 1,000 variations; narrow the filters to see the rest.")
    _metric_coverage(ctx)


def _metric_coverage(ctx: ViewContext) -> None:
    """Which metrics exist for how many runs: tells at a glance what is still missing."""
    cte, params = ctx.run_filter.runs_cte()
    frame = pl.DataFrame() if not ctx.reader.has("metrics") else ctx.reader.frame(
        f"""
        WITH {cte}
        SELECT m.metric, count(DISTINCT m.run_id) AS runs,
               string_agg(DISTINCT m.feature_extractor, ', ') AS feature_extractor,
               string_agg(DISTINCT m.preprocessing, ', ') AS preprocessing,
               max(m.n_samples) AS n_samples
        FROM r JOIN metrics m USING (run_id) GROUP BY m.metric ORDER BY m.metric
        """,
        params,
    )
    if not frame.is_empty():
        with st.expander(f"Metrics recorded ({frame.height})"):
            ui.table(frame.with_columns(pl.col("runs").cast(pl.Int64)), "metric-coverage",
                     "overview-metrics")
    if ctx.reader.has("sample_metric_definitions"):
        # one row per run and metric: cheap however many per-sample rows there are
        per_sample = ctx.reader.frame(
            f"""
            WITH {cte}
            SELECT d.metric, count(DISTINCT d.run_id) AS runs, sum(d.n_samples) AS samples,
                   string_agg(DISTINCT d.feature_extractor, ', ') AS feature_extractor
            FROM r JOIN sample_metric_definitions d USING (run_id) GROUP BY d.metric ORDER BY d.metric
            """,
            params,
        )
        if not per_sample.is_empty():
            with st.expander(f"Per-sample metrics recorded ({per_sample.height})"):
                ui.table(per_sample.with_columns(pl.col("runs").cast(pl.Int64),
                                                 pl.col("samples").cast(pl.Int64)),
                         "per-sample-metric-coverage", "overview-sample-metrics")
