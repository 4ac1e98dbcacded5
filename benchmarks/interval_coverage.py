"""Coverage of the nominal 95 % intervals at the cluster counts used (G = 3, 6, 10), with a known truth.

    uv run python benchmarks/interval_coverage.py                        # 2000 reps, 200 for the bootstrap
    uv run python benchmarks/interval_coverage.py --reps 500 --boot-reps 50   # a quick look

Each cell simulates ``--reps`` data sets of G clusters (fine-tunes) × ``--per-cluster`` paired
samples (``fcr_eval.analysis.replication.CoverageConfig``: with and without a cluster-level
effect, normal and skewed log-normal values like cache MSE) and counts how often each interval
method contains the truth. The cluster-level methods and the sampling-noise-only one are
vectorised over all replications; the project's two-stage percentile bootstrap
(``fcr_eval.analysis.stats.paired_bootstrap_ci`` / ``recovered_fraction_ci``) is not, so it runs on the
first ``--boot-reps`` replications with ``--boot-resamples`` resamples each. A last table stresses
the ratio methods with a gap that varies 50 % between clusters. Prints Markdown (and a JSON record
of the settings) for docs/benchmarks.md.
"""

from __future__ import annotations

import itertools
import json
import logging
import platform
import sys
import time

from fcr_common.provenance import code_version
from fcr_eval.analysis.replication import CoverageConfig, CoverageResult, simulate_coverage
from fcr_eval.analysis.stats import paired_bootstrap_ci, recovered_fraction_ci
from tqdm import tqdm

BOOT = "two-stage bootstrap (fcr_eval.analysis.stats)"


def _bootstrap(statistic: str, n_resamples: int):
    def interval(c, b, t, clusters):
        if statistic == "recovered_fraction":
            r = recovered_fraction_ci(c, b, t, clusters=clusters, n_resamples=n_resamples)
        else:
            r = paired_bootstrap_ci(c, b, clusters=clusters, statistic=statistic, n_resamples=n_resamples)
        return r.ci_low, r.ci_high
    return interval


def _rows(res: CoverageResult) -> list[str]:
    cfg = res.config
    head = (f"| {cfg.n_clusters} | {'yes' if cfg.cluster_effect else 'no'} | {cfg.statistic} | "
            f"{cfg.distribution} | ")
    return [f"{head}{m.method} | {m.coverage:.3f} ± {m.mc_se:.3f} | {m.mean_width:.3g} | "
            f"{m.n_unbounded} / {m.n_reps} |" for m in res.methods]


def _table(results: list[CoverageResult]) -> str:
    lines = ["| G | cluster effect | statistic | values | method | coverage ± MC SE | mean width | unbounded |",
             "|---:|---|---|---|---|---:|---:|---:|"]
    for res in results:
        lines += _rows(res)
    return "\n".join(lines)


def main(argv=None) -> int:
    from bench_cli import parser
    from fcr_common.cli_errors import int_at_least

    ap = parser(__doc__)
    ap.add_argument("--reps", type=int_at_least(10), default=2000, help="replications per cell (vectorised methods)")
    ap.add_argument("--boot-reps", type=int_at_least(0), default=200, help="replications per cell for the bootstrap")
    ap.add_argument("--boot-resamples", type=int_at_least(100), default=250, help="resamples per bootstrap interval")
    ap.add_argument("--per-cluster", type=int_at_least(2), default=100, help="samples per cluster (m)")
    ap.add_argument("--clusters", type=int_at_least(2), nargs="+", default=[3, 6, 10],
                    help="cluster counts (an interval over clusters needs at least 2)")
    ap.add_argument("--seed", type=int_at_least(0), default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    t0 = time.perf_counter()
    # (G, cluster effect, statistic, values, gap spread): the main grid, then the ratio stress cells
    cells = [(g, eff, stat, dist, 0.05) for g, eff, stat, dist in itertools.product(
        args.clusters, (True, False), ("mean_difference", "recovered_fraction"), ("normal", "lognormal"))]
    cells += [(g, True, "recovered_fraction", dist, 0.5) for g in args.clusters for dist in ("normal", "lognormal")]
    results = []
    for i, (g, effect, stat, dist, spread) in enumerate(tqdm(cells, desc="cells")):
        cfg = CoverageConfig(n_clusters=g, n_per_cluster=args.per_cluster, statistic=stat, distribution=dist,
                             cluster_effect=effect, gap_spread=spread, reps=args.reps, seed=args.seed + i)
        extra = {BOOT: _bootstrap(stat, args.boot_resamples)} if args.boot_reps else None
        results.append(simulate_coverage(cfg, extra_intervals=extra, extra_reps=args.boot_reps))
    main_results = [r for r in results if r.config.gap_spread == 0.05]
    stress_results = [r for r in results if r.config.gap_spread == 0.5]
    wall = time.perf_counter() - t0

    truths = {(r.config.statistic, r.config.distribution): r.truth for r in main_results}
    print("Truths: " + "; ".join(f"{s} ({d}) {v:.4g}" for (s, d), v in sorted(truths.items())) + "\n")
    print(_table(main_results))
    print("\nStress: the gap varies 50 % between clusters (cluster effect on, recovered fraction):\n")
    print(_table(stress_results))
    print("\n" + json.dumps({"reps": args.reps, "boot_reps": args.boot_reps, "boot_resamples": args.boot_resamples,
                             "per_cluster": args.per_cluster, "clusters": args.clusters, "seed": args.seed,
                             "wall_s": round(wall, 1), "code": code_version(), "python": platform.python_version(),
                             "machine": platform.machine()}))
    return 0


if __name__ == "__main__":
    from bench_cli import run

    sys.exit(run(main))
