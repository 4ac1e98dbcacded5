"""Compare every stored row of two results stores of the same experiment (e.g. the main job run by
two versions of the code): per table, rows matched on their key, the largest absolute difference
of each numeric column and the count of differing text/JSON values; sample PNGs pixel by pixel.

    uv run --no-sync python benchmarks/compare_stores.py A/fcr.duckdb B/fcr.duckdb

Columns that measure the machine (wall times, s/img, peak memory, timestamps, code version, run
folders) are listed under "timing / provenance" and are not expected to agree.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

#: table → key columns (rows are matched on them)
KEYS = {
    "runs": ("run_id",),
    "metrics": ("run_id", "metric"),
    "per_prompt_scores": ("run_id", "metric", "prompt_id"),
    "sample_metrics": ("run_id", "metric", "sample_index"),
    "sample_metric_definitions": ("run_id", "metric"),
    "feature_stats": ("run_id", "block", "delta", "delta_unit"),
    "samples": ("run_id", "prompt_id"),
    "cache_attribution": ("run_id", "step", "feature", "quantity"),
    "timings": ("run_id", "batch_size"),
    "contrasts": ("experiment_id", "contrast_id", "metric", "candidate", "baseline"),
    "criteria": ("experiment_id", "criterion"),
}
#: columns that measure the machine or the moment, not the experiment
TIMING = {"started_at", "finished_at", "code_version", "run_dir", "computed_at", "evaluated_at", "sec_per_image",
          "peak_memory_bytes", "device"}
TIMING_METRICS = ("sample_wall_s_per_image", "sec_per_image")
#: criteria and contrasts that read timings
TIMED_ROWS = ("speedup", "extra_memory")


def _rows(path: Path, table: str) -> dict:
    from fcr_eval.store import ResultsStore

    s = ResultsStore.open_readonly(path)
    df = s.sql(f"SELECT * FROM {table}")
    return {tuple(r[k] for k in KEYS[table]): r for r in df.iter_rows(named=True)}


def _timed(table: str, key: tuple, col: str) -> bool:
    if col in TIMING:
        return True
    if table == "metrics" and key[1] in TIMING_METRICS:
        return True
    if table in ("criteria", "contrasts") and any(t in str(key) for t in TIMED_ROWS):
        return True
    return table == "runs" and col == "params"  # holds the process count, the rest is in config


def _norm(v):
    if isinstance(v, str) and v[:1] in "{[":
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v


def _strip_timing(v):
    """JSON details without the machine's measurements (a note on wall time)."""
    if isinstance(v, dict):
        return {k: _strip_timing(x) for k, x in v.items() if k not in ("note",)}
    return v


def _same(u, v, roots: tuple[str, str]) -> bool:
    """Equal as JSON (NaN equals NaN), with each store's folder written as <store>."""
    def text(x, root):
        return json.dumps(_strip_timing(x), sort_keys=True, default=str).replace(root, "<store>")

    return text(u, roots[0]) == text(v, roots[1])


def compare(a: Path, b: Path) -> dict:
    roots = (str(a.parent.resolve()), str(b.parent.resolve()))
    report = {}
    for table in KEYS:
        ra, rb = _rows(a, table), _rows(b, table)
        out = {"rows": (len(ra), len(rb)), "only_a": len(ra.keys() - rb.keys()), "only_b": len(rb.keys() - ra.keys()),
               "max_abs": {}, "differing": {}, "timing_max_abs": {}}
        for key in ra.keys() & rb.keys():
            x, y = ra[key], rb[key]
            for col in x:
                if col in KEYS[table]:
                    continue
                u, v = _norm(x[col]), _norm(y[col])
                timed = _timed(table, key, col)
                if isinstance(u, (int, float)) and isinstance(v, (int, float)) and not isinstance(u, bool):
                    if (math.isinf(u) or math.isinf(v)) and u == v:
                        d = 0.0
                    elif math.isnan(u) and math.isnan(v):
                        d = 0.0
                    else:
                        d = abs(float(u) - float(v))
                    bucket = out["timing_max_abs"] if timed else out["max_abs"]
                    bucket[col] = max(bucket.get(col, 0.0), d)
                elif not timed and not _same(u, v, roots):
                    out["differing"][col] = out["differing"].get(col, 0) + 1
        report[table] = out
    report["pngs"] = _compare_pngs(a, b)
    return report


def _compare_pngs(a: Path, b: Path) -> dict:
    from PIL import Image

    ra, rb = _rows(a, "samples"), _rows(b, "samples")
    worst, n = 0, 0
    for key in ra.keys() & rb.keys():
        pa, pb = a.parent / ra[key]["image_path"], b.parent / rb[key]["image_path"]
        ia, ib = np.asarray(Image.open(pa), dtype=int), np.asarray(Image.open(pb), dtype=int)
        worst = max(worst, int(np.abs(ia - ib).max()))
        n += 1
    return {"compared": n, "max_abs_pixel": worst}


def main(argv: list[str]) -> int:
    a, b = Path(argv[0]), Path(argv[1])
    rep = compare(a, b)
    for table, out in rep.items():
        if table == "pngs":
            print(f"{'PNGs':27s} {out['compared']} compared, max |Δpixel| = {out['max_abs_pixel']}")
            continue
        worst = max(out["max_abs"].values(), default=0.0)
        print(f"{table:27s} rows {out['rows'][0]} / {out['rows'][1]}, unmatched {out['only_a']} / {out['only_b']}, "
              f"max |Δ| = {worst:.3g}" + (f" {out['max_abs']}" if worst else "")
              + (f", differing {out['differing']}" if out["differing"] else "")
              + (f"; timing / provenance max |Δ| {_fmt(out['timing_max_abs'])}" if out["timing_max_abs"] else ""))
    return 0


def _fmt(d: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:.3g}" for k, v in d.items()) + "}"


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
