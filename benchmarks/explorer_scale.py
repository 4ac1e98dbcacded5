"""The results explorer at exp-1 scale: every view's page run over a store of 10M per-sample rows.

    uv run python benchmarks/explorer_scale.py                        # 10M sample_metrics rows
    uv run python benchmarks/explorer_scale.py --rows 1000000 --repeats 7
    uv run python benchmarks/explorer_scale.py --store /tmp/s10m/fcr.duckdb   # reuse a built store

Builds the store with ``tests/apps/results_explorer/synthetic_store.py`` (DuckDB
``INSERT ... SELECT`` over ``range()``; 2 experiments × 10 variations × 3 seeds, 5 per-sample
metrics, plus proportional samples, per-prompt scores, metrics, timings, σ²_Δ, contrasts and
criteria), then runs each view through Streamlit's AppTest: one untimed run (imports, first
connection), then ``--repeats`` timed page runs, each a full script run that opens the store
read-only, queries it, draws the page and closes it. Also records the largest frame any query
returned (the views aggregate in DuckDB: no query may hand Python per-sample rows). Prints a
table and a JSON record (config, hardware, code version, load average) for docs/benchmarks.md.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# The synthetic store is test support (tests/apps/results_explorer/), not shipped in the app.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: (case, query parameters): every view, the paired view with and without a reference.
CASES: tuple[tuple[str, dict[str, str]], ...] = (
    ("overview", {"view": "overview"}),
    ("compare (contrasts + metrics)", {"view": "compare"}),
    ("compare, one experiment", {"view": "compare", "experiment_id": "scale-exp-0"}),
    ("paired", {"view": "paired"}),
    ("paired, Δ vs fd-5", {"view": "paired", "sref": "fd-5"}),
    ("paired, class_logprob", {"view": "paired", "smetric": "class_logprob"}),
    ("quality-speed", {"view": "quality-speed"}),
    ("mechanism", {"view": "mechanism"}),
    ("criteria", {"view": "criteria"}),
    ("samples", {"view": "samples"}),
    ("human-study", {"view": "human-study"}),
)


def _time_view(app: Path, query: dict[str, str], repeats: int) -> dict:
    from fcr_results_explorer.reader import StoreReader
    from streamlit.testing.v1 import AppTest

    largest = [0]
    original = StoreReader.frame

    def frame(self, sql, params=None):  # records the size of every result handed to Python
        out = original(self, sql, params)
        largest[0] = max(largest[0], out.height)
        return out

    StoreReader.frame = frame
    try:
        at = AppTest.from_file(str(app), default_timeout=600)
        for key, value in query.items():
            at.query_params[key] = value
        at.run()
        if at.exception:
            raise RuntimeError(f"{query}: {[e.value for e in at.exception]}")
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            at.run()
            times.append(time.perf_counter() - t0)
        return {"min_s": min(times), "median_s": statistics.median(times), "max_s": max(times),
                "times_s": times, "largest_frame_rows": largest[0]}
    finally:
        StoreReader.frame = original


def main(argv=None) -> int:
    from bench_cli import UserError, parser, report_file
    from fcr_common.cli_errors import int_at_least
    from fcr_eval.store.results import check_results_store

    ap = parser(__doc__)
    ap.add_argument("--rows", type=int_at_least(1), default=10_000_000, help="sample_metrics rows to build")
    ap.add_argument("--repeats", type=int_at_least(1), default=5, help="timed page runs per view")
    ap.add_argument("--store", type=Path, help="an existing store to read (skips the build)")
    ap.add_argument("--keep", type=Path, help="build the store here (a new file) and keep it")
    args = ap.parse_args(argv)
    if args.store and args.keep:
        raise UserError("--store reads an existing store, --keep builds one: pass one of them")
    if args.store:
        check_results_store(args.store, must_exist=True, for_writing=False)
    if args.keep:
        if args.keep.exists():
            raise UserError(f"--keep {args.keep} exists; the benchmark builds a new store and never writes over a "
                            "file: pass a new path (or read that store with --store)")
        report_file(args.keep, "--keep")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("streamlit").setLevel(logging.ERROR)

    import duckdb
    import fcr_results_explorer
    from fcr_common.provenance import code_version
    from fcr_results_explorer.app_env import ENV_DB, ENV_HUMAN_STUDY
    from fcr_train.provenance import hardware

    from tests.apps.results_explorer.synthetic_store import build_synthetic_store

    tmp = None
    build = None
    if args.store:
        path = args.store
    else:
        if args.keep:
            path = args.keep
        else:
            tmp = tempfile.TemporaryDirectory(prefix="explorer-scale-")
            path = Path(tmp.name) / "fcr.duckdb"
        info = build_synthetic_store(path, sample_metric_rows=args.rows)
        build = {"seconds": info.seconds, "runs": info.runs, "samples_per_run": info.samples_per_run,
                 "sample_metric_rows": info.sample_metric_rows}
        print(f"built {info.sample_metric_rows:,} per-sample rows ({info.runs} runs) in {info.seconds:.1f} s")
    with duckdb.connect(str(path), read_only=True) as con:
        counts = dict(con.execute(
            "SELECT 'sample_metrics', count(*) FROM sample_metrics UNION ALL SELECT 'samples', count(*) "
            "FROM samples UNION ALL SELECT 'per_prompt_scores', count(*) FROM per_prompt_scores UNION ALL "
            "SELECT 'runs', count(*) FROM runs").fetchall())
        threads = con.execute("SELECT current_setting('threads')").fetchall()[0][0]
    os.environ[ENV_DB] = str(path)
    os.environ.pop(ENV_HUMAN_STUDY, None)
    app = Path(fcr_results_explorer.__file__).with_name("app.py")
    load_before = os.getloadavg()
    results = {}
    for name, query in CASES:
        results[name] = _time_view(app, query, args.repeats)
    load_after = os.getloadavg()
    print(f"{'view':32} {'min s':>7} {'median s':>9} {'max s':>7} {'largest frame':>14}")
    for name, r in results.items():
        print(f"{name:32} {r['min_s']:7.3f} {r['median_s']:9.3f} {r['max_s']:7.3f} {r['largest_frame_rows']:14,}")
    print(f"rows: {counts}; DuckDB threads {threads}; load average before {load_before[0]:.1f}, "
          f"after {load_after[0]:.1f}")
    print(json.dumps({"benchmark": "explorer_scale", "rows": counts, "build": build, "repeats": args.repeats,
                      "duckdb_threads": threads, "views": results, "load_average": [load_before, load_after],
                      "code_version": code_version(), "hardware": hardware()}))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    from bench_cli import run

    sys.exit(run(main))
