"""Contrasts: the paired comparisons that carry an experiment's claims, as the runner stored them.

Shown at the top of the comparison view: one row per stored contrast of the filtered experiments
(estimate, 95% CI, pairs, seeds, method, criterion and verdict) and a forest chart per scale
(kind and metric): a point and CI bar per contrast, the criterion's threshold as a tick, the
value of "no effect" as a rule. The numbers are the stored ones; nothing is recomputed here.
"""

from __future__ import annotations

import json

import polars as pl
import streamlit as st

from fcr_results_explorer import queries as q
from fcr_results_explorer import ui
from fcr_results_explorer.context import ViewContext

#: How each kind of contrast (fcr_eval.analysis.contrasts.CONTRAST_KINDS) reads, and its "no effect" value.
KIND_TEXT = {
    "difference": ("candidate − baseline", 0.0),
    "relative_difference": ("(candidate − baseline) / |baseline|", 0.0),
    "recovered_fraction": ("fraction of the gap baseline → target recovered by the candidate", 0.0),
}
DIRECTION_OP = {"at_least": "≥", "at_most": "≤"}


def _comparison(row: dict) -> str:
    if row["kind"] == "recovered_fraction":
        return f"{row['candidate']} on the gap {row['baseline']} → {row['target']}"
    sign = "−" if row["kind"] == "difference" else "rel. −"
    return f"{row['candidate']} {sign} {row['baseline']}"


def _criterion(row: dict) -> str | None:
    if row["threshold"] is None or row["direction"] is None:
        return None
    return f"{DIRECTION_OP.get(row['direction'], row['direction'])} {row['threshold']:g}"


def _holds(row: dict) -> str:
    """Which noise the stored interval holds (``details.replication`` / ``details.noise``, written
    by fcr-eval); contrasts stored before the replication rule say so."""
    try:
        d = json.loads(row.get("details") or "{}")
    except (TypeError, ValueError):
        d = {}
    if "noise" not in d:
        return "not recorded (stored before the replication rule)"
    text = f"{d.get('replication', '?')}: {d['noise']}"
    return text + (f" — {d['verdict_reason']}" if d.get("verdict_reason") else "")


def contrast_table(frame: pl.DataFrame) -> pl.DataFrame:
    """The stored contrasts as shown: numbers untouched, the comparison, criterion and the noise
    each interval holds as text."""
    rows = frame.to_dicts()
    return frame.with_columns(
        pl.Series("comparison", [_comparison(r) for r in rows], dtype=pl.String),
        pl.Series("criterion", [_criterion(r) for r in rows], dtype=pl.String),
        pl.Series("interval holds", [_holds(r) for r in rows], dtype=pl.String),
        pl.col("verdict").fill_null("—"),
    ).select("experiment", "contrast", "metric", "comparison", "estimate", "ci_low", "ci_high",
             "n_samples", "n_clusters", "method", "interval holds", "criterion", "verdict", "confidence")


def render_contrasts(ctx: ViewContext) -> bool:
    """Draw the contrasts section; ``False`` (and nothing drawn) when there are none."""
    frame = q.contrasts(ctx.reader, ctx.experiments)
    if frame.is_empty():
        return False
    st.subheader("Contrasts")
    levels = sorted({f"{c:.0%}" for c in frame["confidence"].drop_nulls().to_list()}) or ["95%"]
    st.caption(
        "The paired comparisons named in each experiment file, as the runner computed and stored "
        f"them: estimate and {' / '.join(levels)} interval over samples paired by seed and sample (same "
        "x_T and prompt), taken at the unit of replication — over the seeds when each seed has its own "
        "fine-tune (t with G − 1 df, Fieller for a ratio), over the pairs when no fine-tune varies. "
        "**interval holds** says which noise it covers: a contrast between weights of one fine-tune "
        "shared by every seed holds sampling noise only and gets no PASS/FAIL about the training "
        "method. A verdict is PASS when the whole interval is on the right side of its threshold, "
        "FAIL when it is wholly on the wrong side, INCONCLUSIVE when it straddles it."
    )
    shown = contrast_table(frame)
    single = shown["experiment"].n_unique() == 1
    table = shown.drop("experiment") if single else shown
    if set(frame["confidence"].drop_nulls().to_list()) <= {0.95}:
        table = table.drop("confidence")
    ui.table(
        table, "contrasts", "contrasts", export=frame,
        column_config={
            "estimate": st.column_config.NumberColumn("estimate", format="%.4g"),
            "ci_low": st.column_config.NumberColumn("CI low", format="%.4g"),
            "ci_high": st.column_config.NumberColumn("CI high", format="%.4g"),
            "n_samples": st.column_config.NumberColumn("pairs", format="%d"),
            "n_clusters": st.column_config.NumberColumn("seeds", format="%d"),
        },
    )
    counts = frame["verdict"].drop_nulls().value_counts(sort=True)
    if counts.height:
        st.caption("Verdicts: " + ", ".join(f"{n} {v}" for v, n in counts.iter_rows()))
    _forest(frame, single)
    return True


def _forest(frame: pl.DataFrame, single: bool) -> None:
    """One forest chart per (kind, metric): contrasts on one scale share an axis."""
    data = frame.with_columns(
        (pl.col("contrast") if single else pl.col("experiment") + " · " + pl.col("contrast")).alias("label"),
        pl.col("verdict").fill_null("no criterion").alias("result"),
    )
    colour = {"field": "result", "type": "nominal", "title": "verdict",
              "scale": {"domain": list(ui.VERDICT_HEX), "range": list(ui.VERDICT_HEX.values())},
              "legend": {"orient": "bottom"}}
    y = {"field": "label", "type": "nominal", "sort": None, "title": None, "axis": {"labelLimit": 400}}
    tooltip = [{"field": f, "type": "nominal"} for f in ("experiment", "contrast", "candidate", "baseline",
                                                          "target", "result")] + [
        {"field": f, "type": "quantitative", "format": ".4g"} for f in ("estimate", "ci_low", "ci_high",
                                                                         "threshold")] + [
        {"field": f, "type": "quantitative"} for f in ("n_samples", "n_clusters")]
    for (kind, metric), group in data.group_by(["kind", "metric"], maintain_order=True):
        what, null_value = KIND_TEXT.get(kind, (kind, 0.0))
        title = f"{kind.replace('_', ' ')} of {ui.metric_label(metric)}: {what}"
        group = group.select("label", "experiment", "contrast", "candidate", "baseline", "target",
                             "estimate", "ci_low", "ci_high", "n_samples", "n_clusters", "threshold",
                             "direction", "result")
        x = {"type": "quantitative", "title": title, "scale": {"zero": False}}
        spec = {
            "height": {"step": 34},
            "layer": [
                {"mark": {"type": "rule", "color": "#999", "strokeDash": [4, 4]},
                 "encoding": {"x": {"datum": null_value, **x}}},
                {"mark": {"type": "rule", "strokeWidth": 2},
                 "encoding": {"y": y, "x": {"field": "ci_low", **x}, "x2": {"field": "ci_high"},
                              "color": {**colour, "legend": None}}},
                {"mark": {"type": "point", "filled": True, "size": 100},
                 "encoding": {"y": y, "x": {"field": "estimate", **x}, "color": colour, "tooltip": tooltip}},
                {"transform": [{"filter": "isValid(datum.threshold)"}],
                 "mark": {"type": "tick", "color": "#444", "thickness": 2, "size": 22},
                 "encoding": {"y": y, "x": {"field": "threshold", **x}, "tooltip": tooltip}},
            ],
        }
        ui.vega_chart(spec, group, f"contrasts-{kind}-{metric}", f"forest-{kind}-{metric}")
    st.caption("Point: the estimate; bar: its CI; dark tick: the criterion's threshold; dashed "
               "line: no effect.")
