"""Human study: pairwise win-rates with confidence intervals and Bradley–Terry scores.

Read from the human-study app's own store (``human-study.duckdb`` beside the results store),
attached read-only.
"""

from __future__ import annotations

import altair as alt
import polars as pl
import streamlit as st

from fcr_results_explorer import queries as q
from fcr_results_explorer import ui
from fcr_results_explorer.context import ViewContext


def render(ctx: ViewContext) -> None:
    reader, state = ctx.reader, ctx.state
    if not reader.has_human_study:
        where = reader.location.human_study_path
        msg = (f"No human-study results yet: expected `human_study_results` in `{where}`. "
               "Collect votes with `fcr-human-study` and run its `analyse` step.")
        if reader.note.human_study_error:
            msg += f"\n\nThe file exists but could not be read: {reader.note.human_study_error}"
        st.info(msg)
        return
    studies = q.human_study_ids(reader)
    if not studies:
        st.info("The human-study store has no analysed study yet (`fcr-human-study analyse`).")
        return
    study = state.selectbox("Study", studies, key="study", default=studies[-1])
    results = q.human_study_results(reader, study)
    if results.height:
        when = results["analysed_at"][0]
        st.caption(f"Analysed {when:%Y-%m-%d %H:%M}" if when is not None else "")
    summary = q.human_study_summary(reader, study)
    if summary:
        cols = st.columns(4)
        cols[0].metric("Votes used", f"{summary.get('n_votes_used') or 0:,}",
                       help=f"{summary.get('n_votes') or 0:,} votes cast")
        cols[1].metric("Raters", summary.get("n_raters") or 0,
                       help=f"{summary.get('n_raters_excluded') or 0} excluded by attention checks")
        alpha = summary.get("krippendorff_alpha")
        cols[2].metric("Krippendorff's α", "—" if alpha is None else f"{alpha:.2f}")
        kappa = summary.get("fleiss_kappa")
        cols[3].metric("Fleiss' κ", "—" if kappa is None else f"{kappa:.2f}")
    st.subheader("Pairwise win-rates (A over B)")
    data = results.with_columns(
        (pl.col("variation_a") + " vs " + pl.col("variation_b")).alias("pair"),
        (pl.col("n_a") + pl.col("n_b") + pl.col("n_tie") + pl.col("n_both_bad")).alias("votes"),
    )
    base = alt.Chart(data).encode(
        y=alt.Y("pair:N", sort=None, title=None, axis=alt.Axis(labelLimit=400)))
    rule = alt.Chart(pl.DataFrame({"x": [0.5]})).mark_rule(strokeDash=[4, 4], color="#999") \
        .encode(x="x:Q")
    err = base.mark_rule(strokeWidth=2).encode(x="ci_low:Q", x2="ci_high:Q")
    pts = base.mark_point(filled=True, size=110).encode(
        x=alt.X("win_rate_a:Q", title="win-rate of A (95% CI)", scale=alt.Scale(domain=[0, 1])),
        color=alt.condition("datum.ci_low > 0.5 || datum.ci_high < 0.5",
                            alt.value("#d62728"), alt.value("#1f77b4")),
        tooltip=["variation_a", "variation_b", "n_a", "n_b", "n_tie", "n_both_bad",
                 alt.Tooltip("win_rate_a:Q", format=".3f"), alt.Tooltip("ci_low:Q", format=".3f"),
                 alt.Tooltip("ci_high:Q", format=".3f"), alt.Tooltip("p_value:Q", format=".3g")],
    )
    ui.chart((rule + err + pts).properties(height=max(160, 44 * data.height)), data,
             f"{study}-win-rates", "hs-win")
    ui.table(
        data.select("variation_a", "variation_b", "votes", "n_a", "n_b", "n_tie", "n_both_bad",
                    "win_rate_a", "ci_low", "ci_high", "p_value"),
        f"{study}-pairs", "hs-pairs",
        column_config={
            "win_rate_a": st.column_config.NumberColumn("win-rate A", format="%.3f"),
            "ci_low": st.column_config.NumberColumn("CI low", format="%.3f"),
            "ci_high": st.column_config.NumberColumn("CI high", format="%.3f"),
            "p_value": st.column_config.NumberColumn("p", format="%.3g"),
        },
    )
    scores = q.human_study_scores(reader, study)
    if scores.height:
        st.subheader("Bradley–Terry scores")
        base = alt.Chart(scores).encode(
            y=alt.Y("variation:N", sort=None, title=None, axis=alt.Axis(labelLimit=400)))
        ch = (
            base.mark_rule(strokeWidth=2).encode(x="ci_low:Q", x2="ci_high:Q")
            + base.mark_point(filled=True, size=110).encode(
                x=alt.X("bt_score:Q", title="Bradley–Terry score (95% CI)"),
                tooltip=["variation", alt.Tooltip("bt_score:Q", format=".3f"),
                         alt.Tooltip("ci_low:Q", format=".3f"),
                         alt.Tooltip("ci_high:Q", format=".3f")],
            )
        ).properties(height=max(160, 44 * scores.height))
        ui.chart(ch, scores, f"{study}-bradley-terry", "hs-bt")
