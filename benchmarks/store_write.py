"""Writing a design-size run: one ``write_run`` of N samples and N per-prompt scores (exp-1: 30,000
prompts per run), the store's bulk insert (a scan of per-column arrays) against the parameter-bound
multi-row ``VALUES`` it replaced (kept here as the baseline), interleaved, each into a fresh store.

    uv run python benchmarks/store_write.py                 # N = 30,000, 3 repeats
    uv run python benchmarks/store_write.py --samples 100000 --repeats 1

Prints a table, the ratio and a JSON record (config, hardware, code version) for docs/benchmarks.md.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from fcr_common.provenance import code_version
from fcr_eval.store import PerPromptScore, ResultsStore, RunRecord, RunResult, SampleRecord
from fcr_train.provenance import hardware


def _values_insert(con, table: str, ncols: int, rows) -> None:
    """The baseline: chunked multi-row VALUES with bound parameters (the store's insert before 2026-12-06)."""
    if not rows:
        return
    placeholders = "(" + ", ".join("?" * ncols) + ")"
    chunk = max(1, 2000 // ncols)
    for i in range(0, len(rows), chunk):
        part = rows[i: i + chunk]
        con.execute(f"INSERT INTO {table} VALUES " + ", ".join([placeholders] * len(part)),
                    [v for row in part for v in row])


def _result(n: int) -> RunResult:
    run = RunRecord(run_id="bench/fd-10/s0/0", experiment_id="bench", variation_id="fd-10", seed=0,
                    model="sd15", dataset="coco", sampler="fd", stride=10, scheduler="ddim",
                    resolution=512, num_inference_steps=50, guidance_scale=7.5)
    return RunResult(
        run,
        per_prompt_scores=[PerPromptScore("clip_score", f"coco-val-{k:06d}", 0.25 + k * 1e-6) for k in range(n)],
        samples=[SampleRecord(f"coco-val-{k:06d}", f"a caption of image {k}", 0, f"samples/{k:06d}.png", 512, 512)
                 for k in range(n)])


def main(argv=None) -> int:
    from bench_cli import parser
    from fcr_common.cli_errors import int_at_least

    ap = parser(__doc__)
    ap.add_argument("--samples", type=int_at_least(1), default=30_000, help="samples (and per-prompt scores) per run")
    ap.add_argument("--repeats", type=int_at_least(1), default=3)
    args = ap.parse_args(argv)
    result = _result(args.samples)
    bulk = ResultsStore._insert
    times: dict[str, list[float]] = {"bulk": [], "values": []}
    for _ in range(args.repeats):
        for variant in times:  # interleaved, so load on a shared machine hits both alike
            ResultsStore._insert = staticmethod(bulk if variant == "bulk" else _values_insert)
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    store = ResultsStore(Path(tmp) / "bench.duckdb")
                    t0 = time.perf_counter()
                    store.write_run(result)
                    times[variant].append(time.perf_counter() - t0)
                    assert store.sql("SELECT count(*) AS n FROM samples")["n"][0] == args.samples
            finally:
                ResultsStore._insert = staticmethod(bulk)
    med = {v: statistics.median(t) for v, t in times.items()}
    rows = 2 * args.samples
    print(f"{'insert':<8} {'write_run s (median)':>21} {'rows/s':>10}")
    for v in times:
        print(f"{v:<8} {med[v]:>21.2f} {rows / med[v]:>10.3g}")
    print(f"bulk is {med['values'] / med['bulk']:.0f}x faster ({rows:,} rows: {args.samples:,} samples + "
          f"{args.samples:,} per-prompt scores)")
    print(json.dumps({"benchmark": "store_write", "config": vars(args), "rows": rows, "median_s": med,
                      "times_s": times, "speedup": med["values"] / med["bulk"], "code_version": code_version(),
                      "hardware": hardware()}, default=str))
    return 0


if __name__ == "__main__":
    from bench_cli import run

    sys.exit(run(main))
