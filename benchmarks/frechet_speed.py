"""Fréchet distance at Inception's 2048 dimensions: the default eigendecomposition path against
clean-fid's ``scipy.linalg.sqrtm`` path, as a ratio measured in one run (interleaved repeats).

    uv run python benchmarks/frechet_speed.py                  # n_real 10000, n_fake 1000 (mini-val size)
    uv run python benchmarks/frechet_speed.py --n-fake 10000   # full-size evaluation
    uv run python benchmarks/frechet_speed.py --n-real 500     # a reference of fewer rows than dimensions:
                                                               # frechet_distance_to_reference's N × N path too

Features are synthetic (correlated Gaussians); the cost depends only on the dimension. Prints a
table and a JSON record (config, hardware, code version) for docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import numpy as np
from fcr_common.provenance import code_version
from fcr_eval.metrics.frechet import (
    feature_statistics,
    frechet_distance,
    frechet_distance_to_reference,
)
from fcr_train.provenance import hardware


def main(argv=None) -> int:
    from bench_cli import parser
    from fcr_common.cli_errors import int_at_least

    ap = parser(__doc__)
    ap.add_argument("--dim", type=int_at_least(1), default=2048)
    ap.add_argument("--n-real", type=int_at_least(2), default=10_000)
    ap.add_argument("--n-fake", type=int_at_least(2), default=1_000)
    ap.add_argument("--repeats", type=int_at_least(1), default=3)
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    mix = rng.normal(size=(args.dim, args.dim)) / np.sqrt(args.dim)
    real = rng.normal(size=(args.n_real, args.dim)) @ mix
    fake = (rng.normal(size=(args.n_fake, args.dim)) + 0.1) @ mix
    stats = (*feature_statistics(real), *feature_statistics(fake))
    times: dict[str, list[float]] = {"eigh": [], "sqrtm": []}
    if args.n_real <= args.dim:  # the reference's rows span its covariance: the N × N path applies
        times["low_rank"] = []
    values = {}
    for _ in range(args.repeats):
        for method in times:  # interleaved, so load on a shared machine hits every path alike
            t0 = time.perf_counter()
            if method == "low_rank":
                values[method] = frechet_distance_to_reference(real, *stats[2:])
            else:
                values[method] = frechet_distance(*stats, method=method)
            times[method].append(time.perf_counter() - t0)
    med = {m: statistics.median(t) for m, t in times.items()}
    print(f"{'method':<8} {'median s':>9} {'FD':>14}")
    for m in times:
        print(f"{m:<8} {med[m]:>9.2f} {values[m]:>14.6f}")
    ratio = med["sqrtm"] / med["eigh"]
    rel = abs(values["eigh"] - values["sqrtm"]) / abs(values["sqrtm"])
    print(f"eigh is {ratio:.1f}x faster; relative difference {rel:.1e}")
    if "low_rank" in med:
        print(f"low_rank (N × N) is {med['eigh'] / med['low_rank']:.0f}x faster than eigh; relative difference "
              f"to sqrtm {abs(values['low_rank'] - values['sqrtm']) / abs(values['sqrtm']):.1e}")
    print(json.dumps({"benchmark": "frechet_speed", "config": vars(args), "median_s": med, "speedup": ratio,
                      "relative_difference": rel, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                      "hardware": hardware(), "code_version": code_version()}, default=str))
    return 0


if __name__ == "__main__":
    from bench_cli import run

    sys.exit(run(main))
