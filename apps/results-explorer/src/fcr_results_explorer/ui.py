"""Shared drawing helpers: every table and chart comes with a CSV download of its data."""

from __future__ import annotations

import re
from typing import Any

import altair as alt
import polars as pl
import streamlit as st
from fcr_eval.store.csv_export import FORMULA_START

from fcr_results_explorer.queries import lower_is_better

METRIC_LABELS = {
    "fd_efficientnet_lite0": "FD (EfficientNet-Lite0 features)",
    "kid_efficientnet_lite0": "KID (EfficientNet-Lite0 features)",
    "fid_inception": "FID (Inception)",
    "kid_inception": "KID (Inception)",
    "inception_score": "Inception Score",
    "clip_score": "CLIPScore",
    "class_agreement": "class agreement",
    "clip_drift": "CLIP drift (1 − cos, cached vs no cache)",
    "fgsm_image_mse": "FGSM image MSE vs clean",
    "sec_per_image": "seconds / image",
    "sec_per_image_interleaved": "seconds / image (interleaved session)",
    "peak_memory_bytes": "peak memory (bytes)",
    "flops_per_image": "FLOPs / image",
    "unet_calls": "UNet calls",
    "encoder_forwards": "encoder forwards",
    "decoder_forwards": "decoder forwards",
    "feature_variance": "σ²_Δ (mean over Δ)",
    # per-sample metrics (fcr_eval.metrics.paired.SAMPLE_METRICS)
    "cache_mse": "cache error (pixel MSE to the uncached sample)",
    "cache_psnr": "cache PSNR (dB, to the uncached sample)",
    "cache_feature_l2": "cache error in feature space (L2 to the uncached sample)",
    "class_correct": "prompted class recognised (per sample)",
    "class_logprob": "log p(prompted class)",
}

#: Colours of a verdict, in charts and badges.
VERDICT_COLOURS = {"PASS": "green", "FAIL": "red", "INCONCLUSIVE": "orange", "no criterion": "gray"}
VERDICT_HEX = {"PASS": "#2ca02c", "FAIL": "#d62728", "INCONCLUSIVE": "#ff7f0e", "no criterion": "#7f7f7f"}


def verdict_badge(verdict: str | None) -> None:
    """A coloured badge: PASS, FAIL, INCONCLUSIVE (the CI straddles the threshold) or not evaluated."""
    if verdict == "PASS":
        st.badge("PASS", icon=":material/check_circle:", color="green")
    elif verdict == "FAIL":
        st.badge("FAIL", icon=":material/cancel:", color="red")
    elif verdict == "INCONCLUSIVE":
        st.badge("INCONCLUSIVE", icon=":material/help:", color="orange")
    else:
        st.badge("not evaluated", color="gray")

PARAM_LABELS = {
    "lambda_fcr": "λ",
    "lambda_oc": "λ_OC",
    "delta_max": "Δ_max",
    "num_inference_steps": "steps",
    "guidance_scale": "CFG",
    "parallel_decoding": "parallel dec.",
}


def metric_label(metric: str) -> str:
    base, _, bs = metric.partition("@bs")
    label = METRIC_LABELS.get(base, base)
    if bs:
        label += f", batch {bs}"
    arrow = "↓" if lower_is_better(metric) else "↑"
    return f"{label} {arrow}"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "data"


def csv_bytes(frame: pl.DataFrame) -> bytes:
    """CSV of a frame; list and struct columns become text so that any frame exports, and a text
    cell that a spreadsheet would run as a formula (``=...``) gets a leading ``'``."""
    exprs = []
    for name, dtype in frame.schema.items():
        if isinstance(dtype, pl.List):
            exprs.append(pl.col(name).cast(pl.List(pl.String)).list.join(" ").alias(name))
        elif isinstance(dtype, (pl.Struct, pl.Array, pl.Object)):
            exprs.append(pl.col(name).map_elements(str, return_dtype=pl.String).alias(name))
    if exprs:
        frame = frame.with_columns(exprs)
    # Text cells a spreadsheet would run as formulas get a leading ' (fcr_eval.store.csv_export).
    text = [name for name, dtype in frame.schema.items() if dtype == pl.String]
    if text:
        frame = frame.with_columns(pl.when(pl.col(c).str.contains(FORMULA_START)).then(pl.lit("'") + pl.col(c))
                                   .otherwise(pl.col(c)).alias(c) for c in text)
    return frame.write_csv().encode()


def download(frame: pl.DataFrame, name: str, key: str, label: str = "Download CSV") -> None:
    st.download_button(
        label,
        data=csv_bytes(frame),
        file_name=f"{slug(name)}.csv",
        mime="text/csv",
        key=f"csv-{key}",
        on_click="ignore",
        icon=":material/download:",
    )


def table(
    frame: pl.DataFrame,
    name: str,
    key: str,
    *,
    export: pl.DataFrame | None = None,
    column_config: dict[str, Any] | None = None,
    height: int | str | None = None,
) -> None:
    """A table with a CSV download (of ``export`` when given, e.g. unformatted numbers).

    Up to 25 rows are shown without a scroll bar."""
    if height is None:
        height = 35 * (min(frame.height, 25) + 1) + 3
    st.dataframe(
        frame,
        hide_index=True,
        width="stretch",
        column_config=column_config,
        height=height,
        key=f"table-{key}",
    )
    download(export if export is not None else frame, name, key)


def chart(ch: alt.TopLevelMixin, data: pl.DataFrame, name: str, key: str) -> None:
    """An Altair chart with a CSV download of the data behind it."""
    st.altair_chart(ch, width="stretch", key=f"chart-{key}")
    download(data, name, key, label="Download chart data (CSV)")


def vega_chart(spec: dict[str, Any], data: pl.DataFrame, name: str, key: str) -> None:
    """A chart from a plain Vega-Lite spec over ``data`` (its only dataset), with a CSV download.

    For charts drawn often on large stores: building a spec as a dict skips Altair's per-layer
    schema validation, which costs tens of milliseconds per chart."""
    st.vega_lite_chart(data, spec, width="stretch", key=f"chart-{key}")
    download(data, name, key, label="Download chart data (CSV)")


def params_text(row: dict[str, Any], columns: list[str]) -> str:
    return ", ".join(f"{PARAM_LABELS.get(c, c)}={row[c]}" for c in columns if row.get(c) is not None)
