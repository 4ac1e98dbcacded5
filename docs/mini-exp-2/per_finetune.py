"""Per-fine-tune values of mini-exp-2 (either backbone) from its store: the mean over a run's paired
samples, one row per seed (one control and one FCR fine-tune each), and each seed's recovered
fraction of the control's FD-5 → FD-10 cache-error gap. What results.md's per-fine-tune table prints.

    uv run --no-sync python docs/mini-exp-2/per_finetune.py results/mini-exp-2-emoji/fcr.duckdb
"""

from __future__ import annotations

import sys

import polars as pl
from fcr_eval.analysis.stats import recovered_fraction
from fcr_eval.store import ResultsStore

EXPERIMENT = "mini-exp-2"
COLUMNS = {  # column: (variation, metric)
    "FD-5 cache MSE": ("ft-0.00-fd-5", "cache_mse"),
    "FD-10 cache MSE": ("ft-0.00-fd-10", "cache_mse"),
    "FCR FD-10 cache MSE": ("fcr-ss-0.15-fd-10", "cache_mse"),
    "DC-N3 cache MSE": ("ft-0.00-dc-3", "cache_mse"),
    "uncached log-prob": ("ft-0.00-none", "class_logprob"),
    "FCR uncached log-prob": ("fcr-ss-0.15-none", "class_logprob"),
    "FD-10 log-prob": ("ft-0.00-fd-10", "class_logprob"),
    "FCR FD-10 log-prob": ("fcr-ss-0.15-fd-10", "class_logprob"),
    "FD-5 log-prob": ("ft-0.00-fd-5", "class_logprob"),
    "DC-N3 log-prob": ("ft-0.00-dc-3", "class_logprob"),
    "uncached class correct": ("ft-0.00-none", "class_correct"),
    "FCR uncached class correct": ("fcr-ss-0.15-none", "class_correct"),
}


def per_finetune(store_path: str) -> pl.DataFrame:
    """One row per seed: the run means of ``COLUMNS`` and the seed's recovered fraction."""
    store = ResultsStore.open_readonly(store_path)
    df = store.sample_metrics(experiment_id=EXPERIMENT, metric=sorted({m for _, m in COLUMNS.values()}))
    means = (df.group_by("variation_id", "seed", "metric").agg(pl.col("value").mean())
             .with_columns((pl.col("metric") + ":" + pl.col("variation_id")).alias("col"))
             .pivot(on="col", index="seed", values="value").sort("seed"))
    rows = []
    for r in means.iter_rows(named=True):
        row = {"seed": r["seed"], **{name: r.get(f"{m}:{v}") for name, (v, m) in COLUMNS.items()}}
        parts = (row["FCR FD-10 cache MSE"], row["FD-10 cache MSE"], row["FD-5 cache MSE"])
        row["recovered fraction"] = None if None in parts else recovered_fraction(*parts)
        rows.append(row)
    return pl.DataFrame(rows)


if __name__ == "__main__":
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=300, float_precision=4):
        print(per_finetune(sys.argv[1]))
