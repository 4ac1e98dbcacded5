"""Success criteria: the design's criteria as a pass/fail board with the numbers behind each."""

from __future__ import annotations

import json

import polars as pl
import streamlit as st

from fcr_results_explorer import queries as q
from fcr_results_explorer import ui
from fcr_results_explorer.context import ViewContext


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
        return " · ".join(f"{k}: {_short(v)}" for k, v in obj.items())
    return str(obj)


def _short(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list) and len(v) > 6:
        return f"[{len(v)} values]"
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
    passed = int(frame["passed"].fill_null(False).sum())
    st.markdown(f"**{passed} of {frame.height}** criteria pass (latest evaluation of each).")
    shown = frame.with_columns(
        pl.when(pl.col("passed")).then(pl.lit("pass")).otherwise(pl.lit("fail")).alias("result")
    ).select("experiment", "criterion", "result", "value", "threshold", "details",
             "evaluated_at", "code_version")
    with st.expander("As a table"):
        st.dataframe(shown, hide_index=True, width="stretch")
    ui.download(shown, "success-criteria", "criteria")
    for (experiment,), group in frame.group_by("experiment", maintain_order=True):
        st.subheader(experiment)
        rows = group.to_dicts()
        per_row = 3
        for start in range(0, len(rows), per_row):
            cols = st.columns(per_row)
            for col, row in zip(cols, rows[start:start + per_row], strict=False):
                with col.container(border=True):
                    ok = row["passed"]
                    if ok:
                        st.badge("PASS", icon=":material/check_circle:", color="green")
                    elif ok is False:
                        st.badge("FAIL", icon=":material/cancel:", color="red")
                    else:
                        st.badge("not evaluated", color="gray")
                    st.markdown(f"**{row['criterion']}**")
                    st.markdown(f"value **{_fmt(row['value'])}** · threshold "
                                f"**{_fmt(row['threshold'])}**")
                    text = _details_text(row["details"])
                    if text:
                        st.caption(text)
                    when = row["evaluated_at"]
                    st.caption(f"evaluated {when:%Y-%m-%d %H:%M} · {row['code_version'] or '?'}"
                               if when else "")
