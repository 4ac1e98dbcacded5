"""``fcr-eval``: plan and run designed experiments.

    fcr-eval plan experiments/mini-exp-1.toml --profile quick          # runs, fine-tunes, compute
    fcr-eval plan experiments/*.toml --json                            # the design's output form
    fcr-eval run  experiments/mini-exp-1.toml --profile quick          # fine-tune, sample, evaluate, store
    fcr-eval report experiments/mini-exp-1.toml --profile quick        # table, criteria and plots from the store

    accelerate launch -m fcr_eval.cli run experiments/exp-1-main-ablation.toml   # one process per GPU
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

__all__ = ["main"]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default=None, help="a profile of the experiment file (e.g. quick, full)")
    p.add_argument("--store", default="results/fcr.duckdb", help="DuckDB results store (default %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fcr-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="print the plan and its estimated compute")
    p.add_argument("files", nargs="+", help="experiment .toml file(s)")
    _add_common(p)
    p.add_argument("--json", action="store_true", help="print the experiments in the design's JSON form")
    p.add_argument("--no-calibrate", action="store_true",
                   help="estimate wall time with a stated throughput instead of timing this machine")

    p = sub.add_parser("run", help="fine-tune, sample, evaluate and store every variation × seed (resumes)")
    p.add_argument("file", help="experiment .toml file")
    _add_common(p)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")

    p = sub.add_parser("report", help="summary table, criteria and plots from the store (no compute)")
    p.add_argument("file", help="experiment .toml file")
    _add_common(p)
    p.add_argument("--no-plots", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("accelerate", "diffusers", "matplotlib", "PIL", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from .experiment import ExperimentFileError, load_experiment

    try:
        if args.command == "plan":
            from .planner import format_plan, make_plan, plan_json

            exps = [load_experiment(f, args.profile if args.profile in _profiles(f) else None) for f in args.files] \
                if args.profile else [load_experiment(f) for f in args.files]
            results_dir = Path(args.store).parent
            if args.json:
                plans = [make_plan(e, results_dir=results_dir, calibrate=False) for e in exps]
                print(json.dumps(plan_json(plans), indent=2))
                return 0
            gflops = None
            if not args.no_calibrate:
                from .planner import calibrate_throughput

                gflops = calibrate_throughput()
            for e in exps:
                plan = make_plan(e, results_dir=results_dir, calibrate=False, gflops_per_s=gflops)
                if gflops is not None:
                    plan.calibration = "measured on this machine just now (embedded UNet, batch 64)"
                done = _finished(args.store, e.id)
                print(format_plan(plan, done))
                print()
            return 0

        exp = load_experiment(args.file, args.profile)
        from .reporting import report
        from .runner import RunnerOptions, run_experiment

        if args.command == "run":
            opts = RunnerOptions(store=Path(args.store), threads=args.threads, plots=not args.no_plots,
                                 device=args.device)
            outcome = run_experiment(exp, opts)
            return 0 if outcome.ok else 1
        if args.command == "report":
            report(exp, Path(args.store), plots=not args.no_plots)
            return 0
    except ExperimentFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished runs are in the store; run the same command again to resume",
              file=sys.stderr)
        return 130
    except Exception as e:  # model-not-available and other actionable errors: one clear line
        from fcr_sample import ModelNotAvailableError as SampleMNA
        from fcr_train.models import ModelNotAvailableError as TrainMNA

        if isinstance(e, (TrainMNA, SampleMNA)):
            print(f"error: model not available: {e}", file=sys.stderr)
            return 3
        raise
    return 0


def _profiles(path: str) -> tuple[str, ...]:
    from .experiment import tomllib

    try:
        return tuple(tomllib.loads(Path(path).read_text()).get("profiles", {}))
    except Exception:  # noqa: BLE001 - load_experiment reports the real problem
        return ()


def _finished(store: str, experiment_id: str) -> set[str]:
    if not Path(store).is_file():
        return set()
    try:
        from .store import ResultsStore

        return ResultsStore.open_readonly(store).finished_run_ids(experiment_id)
    except Exception:  # noqa: BLE001 - the plan does not need the store
        return set()


if __name__ == "__main__":
    raise SystemExit(main())
