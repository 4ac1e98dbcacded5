"""Success criteria: the design's criteria as a pass/fail board with the numbers behind each."""

from __future__ import annotations

import json

import polars as pl
import streamlit as st

from fcr_results_explorer import queries as q
from fcr_results_explorer import ui
from fcr_results_explorer.context import ViewContext

# The criteria fcr-eval evaluates (fcr_eval.analysis.criteria): what the value is, and how it passes.
DESCRIPTIONS = {
    "quality_delta": ("relative quality change of FCR-10 vs FD-5 (lower is better)", "≤"),
    "alignment_delta": ("relative text–image alignment change vs FD-5", "≥"),
    "speedup": ("sec/img of FD-5 ÷ sec/img of FCR-10", "≥"),
    "extra_memory": ("relative peak-memory change vs FD-5", "≤"),
    "variance_reduction": ("1 − σ²_Δ(FCR) / σ²_Δ(same sampler without FCR)", "≥"),
    "variance_quality_r2": ("R² of σ²_Δ against the quality difference across variations", "≥"),
    "finetune_compute": ("fine-tune compute as a fraction of pre-training compute", "≤"),
}


def _fmt(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.4g}"


def _details_text(details: str | None) -> str:
    if not details:
        return ""
    try:
        obj = json.loads(details)
    except (TypeError, ValueError):
        return str(details)
    if isinstance(obj, dict):
        # the sides of the comparison and scalar facts; the full config stays in the CSV
        return " · ".join(f"{k}: {_short(v)}" for k, v in obj.items()
                          if not isinstance(v, dict) or "mean" in v)
    return str(obj)


def _short(v: object) -> str:
    if isinstance(v, dict) and "mean" in v:  # a side of the comparison: mean [95% CI] (n)
        text = _short(v["mean"])
        if v.get("ci_low") is not None and v.get("ci_high") is not None:
            text += f" [{_short(v['ci_low'])}, {_short(v['ci_high'])}]"
        if v.get("n_seeds") is not None:
            text += f" (n={v['n_seeds']})"
        return text
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return f"[{len(v)} values]" if len(v) > 3 else "[" + ", ".join(map(_short, v)) + "]"
    return str(v)


def render(ctx: ViewContext) -> None:
    if not ctx.reader.has("criteria"):
        st.info("This store has no `criteria` table.")
        return
    frame = q.latest_criteria(ctx.reader, ctx.experiments)
    if frame.is_empty():
        st.info(
            "No success criteria have been evaluated for these experiments yet. The experiment "
            "runner writes them to the `criteria` table when an experiment's runs are complete."
        )
        return
    passed = int((frame["verdict"] == "PASS").sum())
    inconclusive = int((frame["verdict"] == "INCONCLUSIVE").sum())
    missing = int(frame["verdict"].is_null().sum())
    notes = ([f"{inconclusive} inconclusive (the CI straddles the threshold)"] if inconclusive else []) \
        + ([f"{missing} could not be evaluated"] if missing else [])
    st.markdown(f"**{passed} of {frame.height}** criteria pass (latest evaluation of each)"
                + ("; " + "; ".join(notes) if notes else "") + ".")
    shown = frame.with_columns(
        pl.col("verdict").fill_null("not evaluated").alias("result")
    ).select("experiment", "criterion", "result", "value", "ci_low", "ci_high", "threshold",
             "details", "evaluated_at", "code_version")
    order = {name: i for i, name in enumerate(DESCRIPTIONS)}
    for (experiment,), group in frame.group_by("experiment", maintain_order=True):
        st.subheader(experiment)
        rows = sorted(group.to_dicts(),
                      key=lambda r: (order.get(r["criterion"], len(order)), r["criterion"]))
        per_row = 3
        for start in range(0, len(rows), per_row):
            cols = st.columns(per_row)
            for col, row in zip(cols, rows[start:start + per_row], strict=False):
                with col.container(border=True):
                    ui.verdict_badge(row["verdict"])
                    what, op = DESCRIPTIONS.get(row["criterion"], ("", ""))
                    st.markdown(f"**{row['criterion']}**")
                    if what:
                        st.caption(what)
                    ci = (f" (CI [{_fmt(row['ci_low'])}, {_fmt(row['ci_high'])}])"
                          if row["ci_low"] is not None and row["ci_high"] is not None else "")
                    st.markdown(f"value **{_fmt(row['value'])}**{ci} · threshold "
                                f"{op + ' ' if op else ''}**{_fmt(row['threshold'])}**")
                    text = _details_text(row["details"])
                    if text:
                        st.caption(text)
                    when = row["evaluated_at"]
                    version = (row["code_version"] or "?").split(" ")[0]
                    st.caption(f"evaluated {when:%Y-%m-%d %H:%M} · {version}" if when else "")
    with st.expander("As a table (with the full details)"):
        st.dataframe(shown, hide_index=True, width="stretch")
    ui.download(shown, "success-criteria", "criteria")
