"""Per-fine-tune values of mini-exp-1-rollout from its store: the mean over a run's 60 paired samples,
one row per seed (= one fine-tune per arm), and each seed's recovered fraction of the N5 → N10 (or
FD-5 → FD-10) gap. What results.md's per-fine-tune tables print. The second argument is the arm's
variation-id prefix, up to the cache name (``ro-0.50-dc-`` for the rollout arm, ``fcr-ss-0.15-``
for the FCR arm):

    uv run --no-sync python docs/mini-exp-1-rollout/per_finetune.py results/main/fcr.duckdb ro-0.50-dc-
    uv run --no-sync python docs/mini-exp-1-rollout/per_finetune.py results/main/fcr.duckdb fcr-ss-0.15-
"""

from __future__ import annotations

import sys

import polars as pl
from fcr_eval.analysis.stats import recovered_fraction
from fcr_eval.store import ResultsStore

EXPERIMENT = "mini-exp-1-rollout"


def per_finetune(store_path: str, prefix: str) -> pl.DataFrame:
    """One row per seed: mean cache MSE and class log-probability of every run, and the recovered fractions."""
    store = ResultsStore.open_readonly(store_path)
    df = store.sample_metrics(experiment_id=EXPERIMENT, metric=["cache_mse", "class_logprob"])
    means = (df.group_by("variation_id", "seed", "metric").agg(pl.col("value").mean())
             .with_columns((pl.col("metric") + ":" + pl.col("variation_id")).alias("col"))
             .pivot(on="col", index="seed", values="value").sort("seed"))
    rows = []
    for r in means.iter_rows(named=True):
        def g(variation: str, metric: str = "cache_mse", r=r) -> float | None:
            return r.get(f"{metric}:{variation}")

        row = {"seed": r["seed"]}
        for cache in ("dc-5", "dc-10", "fd-10"):
            row[f"control {cache}"] = g(f"ft-0.00-{cache}")
            row[f"arm {cache}"] = g(f"{prefix}{cache}")
        row["control fd-5"] = g("ft-0.00-fd-5")
        row["recovered dc"] = _rf(row["arm dc-10"], row["control dc-10"], row["control dc-5"])
        row["recovered fd"] = _rf(row["arm fd-10"], row["control fd-10"], row["control fd-5"])
        row["logprob control none"] = g("ft-0.00-none", "class_logprob")
        row["logprob arm none"] = g(f"{prefix}none", "class_logprob")
        row["logprob control dc-10"] = g("ft-0.00-dc-10", "class_logprob")
        row["logprob arm dc-10"] = g(f"{prefix}dc-10", "class_logprob")
        rows.append(row)
    return pl.DataFrame(rows)


def _rf(candidate, baseline, target):
    if None in (candidate, baseline, target):
        return None
    return recovered_fraction(candidate, baseline, target)


if __name__ == "__main__":
    table = per_finetune(sys.argv[1], sys.argv[2])
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=250, float_precision=4):
        print(table)
