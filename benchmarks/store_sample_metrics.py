"""Bulk insert of per-sample metrics: one ``write_run`` holding N rows of ``sample_metrics``
(the default: 1,000,000 rows = 5 metrics × 200,000 samples), inside the run's one transaction,
then reading them back as polars.

    uv run python benchmarks/store_sample_metrics.py               # 1M rows
    uv run python benchmarks/store_sample_metrics.py --rows 10000000 --repeats 1

Values are random; the cost depends on the row count and the prompt-id strings. Each repeat
writes into a fresh store file in a temporary folder. Prints a table and a JSON record
(config, hardware, code version) for docs/benchmarks.md.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from fcr_common.provenance import code_version
from fcr_eval.store import ResultsStore, RunRecord, RunResult, SampleMetrics
from fcr_train.provenance import hardware

METRICS = ("cache_mse", "cache_psnr", "cache_feature_l2", "class_correct", "class_logprob")


def _result(n_samples: int, metrics: tuple[str, ...]) -> RunResult:
    rng = np.random.default_rng(0)
    ids = [f"coco-val-{i:06d}" for i in range(n_samples)]
    run = RunRecord(run_id="bench/fd-10/s0/0", experiment_id="bench", variation_id="fd-10", seed=0,
                    model="embedded", dataset="coco", sampler="fd", stride=10, scheduler="ddim",
                    resolution=512, num_inference_steps=50, guidance_scale=7.5)
    return RunResult(run, sample_metrics=[
        SampleMetrics(m, rng.random(n_samples), ids, seeds=0, reference="bench/none/s0/0") for m in metrics])


def main(argv=None) -> int:
    from bench_cli import UserError, parser
    from fcr_common.cli_errors import int_at_least

    ap = parser(__doc__)
    ap.add_argument("--rows", type=int_at_least(1), default=1_000_000, help=f"rows to write ({len(METRICS)} metrics)")
    ap.add_argument("--repeats", type=int_at_least(1), default=3)
    args = ap.parse_args(argv)
    if args.rows < len(METRICS):
        raise UserError(f"--rows {args.rows} is fewer than the {len(METRICS)} metrics written per sample")
    n_samples = args.rows // len(METRICS)
    writes, reads = [], []
    for _ in range(args.repeats):
        result = _result(n_samples, METRICS)
        with tempfile.TemporaryDirectory() as tmp:
            store = ResultsStore(Path(tmp) / "bench.duckdb")
            t0 = time.perf_counter()
            store.write_run(result)
            writes.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            frame = store.sample_metrics(experiment_id="bench")
            reads.append(time.perf_counter() - t0)
            assert frame.height == n_samples * len(METRICS)
    rows = n_samples * len(METRICS)
    print(f"{'rows':>10} {'write_run s (min/median)':>26} {'rows/s':>12} {'read s (median)':>16}")
    print(f"{rows:>10} {min(writes):>12.2f} / {statistics.median(writes):<11.2f} "
          f"{rows / statistics.median(writes):>12.3g} {statistics.median(reads):>16.2f}")
    print(json.dumps({"benchmark": "store_sample_metrics", "rows": rows, "metrics": len(METRICS),
                      "write_s": writes, "read_s": reads, "code_version": code_version(),
                      "hardware": hardware()}))
    return 0


if __name__ == "__main__":
    from bench_cli import run

    sys.exit(run(main))
