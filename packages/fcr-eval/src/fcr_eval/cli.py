"""``fcr-eval``: plan and run designed experiments.

    fcr-eval plan experiments/mini-exp-1.toml --profile quick          # runs, fine-tunes, compute
    fcr-eval plan experiments/*.toml --json                            # the design's output form
    fcr-eval plan experiments/exp-1-main-ablation.toml --gpus 1,8,64   # + GPU-hours, wall, RAM, disk per GPU count
    fcr-eval run  experiments/mini-exp-1.toml --profile quick          # fine-tune, sample, evaluate, store
    fcr-eval report experiments/mini-exp-1.toml --profile quick        # table, criteria and plots from the store

    accelerate launch -m fcr_eval.cli run experiments/exp-1-main-ablation.toml   # one process per GPU

A bad input (experiment file, profile, store path, device, a model or file that is not here) is one
line ``fcr-eval: error: ...`` on stderr before any work, exit code 2 (3: a model is not available);
``--debug`` or FCR_DEBUG=1 adds the traceback. ``run`` exits 1 when a run failed and lists it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from fcr_common.cli_errors import (
    EXIT_MODEL_NOT_AVAILABLE,
    EXIT_USAGE,
    UserError,
    add_debug_argument,
    float_in,
    int_at_least,
    run_cli,
)

__all__ = ["main", "USER_ERRORS"]

logger = logging.getLogger("fcr_eval.cli")

# Bad input besides UserError and missing paths (named by module: nothing heavy is imported).
USER_ERRORS = {
    "fcr_eval.spec.checker:ExperimentFileError": EXIT_USAGE,
    "fcr_eval.store.db:StoreError": EXIT_USAGE,
    "fcr_sample.loading:ModelNotAvailableError": EXIT_MODEL_NOT_AVAILABLE,
    "fcr_train.models:ModelNotAvailableError": EXIT_MODEL_NOT_AVAILABLE,
    "fcr_common.locking:LockHeldError": EXIT_USAGE,
    "fcr_train.checkpoints:CheckpointError": EXIT_USAGE,  # a fine-tune folder of other settings or torn
    "fcr_eval.run.batches:ResumeMismatchError": EXIT_USAGE,  # a run folder of another run
}


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default=None, help="a profile of the experiment file (e.g. quick, full)")
    p.add_argument("--store", default="results/fcr.duckdb", help="DuckDB results store (default %(default)s)")
    add_debug_argument(p, subcommand=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fcr-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_debug_argument(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="print the plan and its estimated compute")
    p.add_argument("files", nargs="+", help="experiment .toml file(s)")
    _add_common(p)
    p.add_argument("--json", action="store_true", help="print the experiments in the design's JSON form")
    p.add_argument("--no-calibrate", action="store_true",
                   help="estimate wall time with a stated throughput instead of timing this machine")
    p.add_argument("--strict", action="store_true",
                   help="fail as `run` would when a model or local file it needs is not on this machine (by "
                        "default each is a warning in the plan; the plan itself never needs the network)")
    p.add_argument("--gpus", type=_gpu_counts, default=None, metavar="N[,N...]",
                   help="also project the plan on these GPU counts (GPU-hours, wall, RAM per process, disk); "
                        "default 1,8,64 for a real model, none for the embedded one")
    # The default since plans became offline; kept so that older scripts still run.
    p.add_argument("--skip-checks", action="store_true", help=argparse.SUPPRESS)

    p = sub.add_parser("run", help="fine-tune, sample, evaluate and store every variation × seed (resumes)")
    p.add_argument("file", help="experiment .toml file")
    _add_common(p)
    p.add_argument("--threads", type=int_at_least(1), default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--wait", type=float_in(0), default=0, metavar="SECONDS",
                   help="when another runner holds the store, wait up to this long for it (default: refuse at "
                        "once, naming it)")
    p.add_argument("--reference", choices=("spill", "sample"), default="spill",
                   help="cached runs' uncached reference batches: read back from the float spill the experiment's "
                        "uncached run wrote (spill: disk, default) or sampled again in each cached run (sample: no "
                        "disk, one more uncached sampling per cached run); the numbers are the same")
    p.add_argument("--no-resource-check", action="store_true",
                   help="run even when the plan says this machine lacks the RAM or free disk the runs need")

    p = sub.add_parser("report", help="summary table, criteria and plots from the store (no compute; opens the "
                                      "store read-only, plots go beside it)")
    p.add_argument("file", help="experiment .toml file")
    _add_common(p)
    p.add_argument("--no-plots", action="store_true")

    p = sub.add_parser("migrate", help="bring a results store written by an older fcr-eval to this schema")
    p.add_argument("--store", default="results/fcr.duckdb", help="DuckDB results store (default %(default)s)")
    add_debug_argument(p, subcommand=True)
    return parser


def _gpu_counts(text: str) -> tuple[int, ...]:
    """``--gpus 1,8,64`` → (1, 8, 64)."""
    try:
        counts = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of GPU counts >= 1; pass e.g. 1,8,64")
    return counts


def _processes_on_this_node() -> int:
    """Processes `accelerate launch` / `torchrun` start on this node (1 when launched plainly)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _plan(args) -> int:
    from fcr_eval.plan.validation import check_inputs, check_store, model_problems
    from fcr_eval.spec.experiment import load_experiment

    exps = [load_experiment(f, args.profile) for f in args.files]  # an unknown profile lists the file's
    check_store(args.store, must_exist=False)
    # the planner and its statistics (scipy) only once the files and the store are known good: a bad
    # input is refused in a fraction of a second
    from fcr_eval.plan.output import format_plan, long_plan_line, plan_json
    from fcr_eval.plan.planner import make_plan
    from fcr_eval.plan.resources import machine_problems, plan_resources

    results_dir = Path(args.store).parent
    gflops = None
    if not args.json and not args.no_calibrate:
        from fcr_eval.plan.costs import calibrate_throughput

        gflops = calibrate_throughput()
    # One plan per experiment, built once: the checks, the JSON and the printed plan read the same object.
    plans = [make_plan(e, results_dir=results_dir, calibrate=False, gflops_per_s=gflops) for e in exps]
    if gflops is not None:
        for plan in plans:
            plan.calibration = "measured on this machine just now (embedded UNet, batch 64)"
    for e, plan in zip(exps, plans, strict=True):  # what `run` checks before any work, offline
        found = [f"experiment {e.id}: {p}" for p in model_problems(e)]
        try:
            check_inputs(e, plan)
        except FileNotFoundError as exc:
            found.append(str(exc).replace(" Nothing has been run.", ""))
        if found and args.strict:
            from fcr_sample.loading import ModelNotAvailableError

            raise (ModelNotAvailableError if model_problems(e) else FileNotFoundError)(found[0])
        plan.warnings[:0] = [f"{w} (`fcr-eval run` stops here)" for w in found]
        if args.json:  # the printed plan shows them at its top; the JSON form has no place for them
            for w in [long_plan_line(plan), *plan.warnings]:
                if w:
                    logger.warning("%s", w)
    if args.json:
        print(json.dumps(plan_json(plans), indent=2))
        return 0
    for e, plan in zip(exps, plans, strict=True):
        done = _finished(args.store, e.id)
        res = plan_resources(plan)
        plan.warnings += [f"this machine: {w}" for w in machine_problems(res, Path(args.store).parent, done=done)]
        print(format_plan(plan, done, resources=res, gpus=args.gpus))
        print()
    return 0


def _report(args) -> int:
    from fcr_eval.plan.validation import check_store
    from fcr_eval.spec.experiment import load_experiment

    exp = load_experiment(args.file, args.profile)
    check_store(args.store, must_exist=True)
    if not args.no_plots:
        _check_plots_writable(Path(args.store).parent)
    # the report's statistics (scipy) once the inputs are known good
    from fcr_eval.report.report import report

    report(exp, Path(args.store), plots=not args.no_plots)
    return 0


def _run(args) -> int:
    from fcr_eval.plan.validation import check_device, check_store
    from fcr_eval.spec.experiment import load_experiment

    exp = load_experiment(args.file, args.profile)
    check_store(args.store, must_exist=False, for_writing=True)
    if args.threads and args.threads > (os.cpu_count() or 1):
        logger.warning("--threads %d is more than this machine's %d CPU(s); torch will oversubscribe them",
                       args.threads, os.cpu_count() or 1)
    check_device(args.device)
    from fcr_eval.run.distributed import launched_processes

    if not args.wait and launched_processes() == 1:  # a busy store refused now, not after loading torch
        from fcr_eval.store import refuse_if_writer_busy

        refuse_if_writer_busy(args.store)
    if not args.no_resource_check:
        _check_resources(exp, args)
    from fcr_eval.run.runner import RunnerOptions, run_experiment

    opts = RunnerOptions(store=Path(args.store), threads=args.threads, device=args.device, wait=args.wait,
                         reference=args.reference)
    outcome = run_experiment(exp, opts)
    if outcome.main:  # the process that wrote the store reports it, and keeps the verdicts
        _report_after_run(exp, Path(args.store), plots=not args.no_plots)
    failed = outcome.failed
    if failed:
        print(f"\n{len(failed)} run(s) failed (the store holds only the finished ones; run the same "
              "command again to retry them):", file=sys.stderr)
        for f in failed:
            print(f"  {f.variation_id} seed {f.seed} ({f.run_id}): {f.error}  [traceback: {f.run_dir}/error.txt]",
                  file=sys.stderr)
    return 0 if outcome.ok else 1


def _check_resources(exp, args) -> None:
    """Refuse before any work when this machine cannot hold the runs still to do (RAM per process ×
    processes on this node, free disk at the store's folder). A model that is not here is the
    first thing to fix: the runner names it before this check matters."""
    from fcr_eval.plan.planner import make_plan
    from fcr_eval.plan.resources import machine_problems, plan_resources
    from fcr_eval.plan.validation import model_problems

    if model_problems(exp):
        return

    plan = make_plan(exp, results_dir=Path(args.store).parent, calibrate=False)
    gpu = args.device not in (None, "cpu") or (args.device is None and _cuda_available())
    problems = machine_problems(plan_resources(plan, args.reference), Path(args.store).parent,
                                done=_finished_now(args.store, exp.id),
                                processes=_processes_on_this_node(), gpu=gpu)
    if problems:
        raise UserError(f"experiment {exp.id}: this machine cannot hold it — {'; '.join(problems)}. Nothing has been "
                        "run (--no-resource-check runs anyway)")


def _finished_now(store: str, experiment_id: str) -> set[str]:
    """The runs already stored, for the resource check: none when the store cannot be read at
    once (another runner writing it, an older schema) — every run then counts as still to do."""
    if not Path(store).is_file():
        return set()
    from fcr_eval.store import ResultsStore
    from fcr_eval.store.db import StoreError

    try:
        return ResultsStore.open_readonly(store, lock_timeout=1.0).finished_run_ids(experiment_id)
    except StoreError:
        return set()


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _report_after_run(exp, store_path: Path, *, plots: bool) -> None:
    """Print the report, keep its verdicts in the store, then draw the plots — in that order, so the
    contrast plots show this run's contrasts (drawn before, they showed the previous run's)."""
    from fcr_eval.report.report import report, write_plots

    rep = report(exp, store_path, plots=False)
    _keep_verdicts(exp.id, store_path, rep)
    if plots:
        write_plots(exp, store_path)


def _keep_verdicts(experiment_id: str, store_path: Path, rep) -> None:
    """Store the contrasts and criteria the report computed, replacing the experiment's earlier
    ones (the explorer shows them); the report itself writes nothing."""
    from fcr_common.provenance import code_version

    from fcr_eval.store import ResultsStore

    store = ResultsStore(store_path)
    if rep.contrasts:
        store.write_contrasts(experiment_id, rep.contrasts, code_version=code_version())
    if rep.criteria:
        store.write_criteria(rep.criteria)


#: What `plan`, `run` and `report` need beyond the light install (which only reads a store).
RUNNER_PACKAGES = ("fcr_sample", "fcr_train", "torch", "matplotlib")


def _require_runner(command: str) -> None:
    """The experiment commands need the ``run`` extra; the base install reads stores only."""
    import importlib.util

    missing = [m for m in RUNNER_PACKAGES if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"`fcr-eval {command}` needs the experiment runner, and this install lacks "
                        f"{', '.join(missing)} (the base install of fcr-eval only reads results stores). "
                        "Install it: pip install 'fcr-eval[run]'")


def _check_plots_writable(store_folder: Path) -> None:
    """`report` only reads the store, but writes its plots beside it: say so before any work."""
    plots = store_folder / "plots"
    where = plots if plots.exists() else store_folder
    if not os.access(where, os.W_OK | os.X_OK):
        raise UserError(f"the plots go to {plots}, and {where} is read-only; pass --no-plots to report without "
                        "them, or make it writable")


def _migrate(args) -> int:
    """Bring the results store at --store to this code's schema (what readers ask for)."""
    from fcr_eval.store.db import connect
    from fcr_eval.store.results import (
        SCHEMA_VERSION,
        ResultsStore,
        check_results_store,
        read_schema_version,
    )

    check_results_store(args.store, must_exist=True, for_writing=True)
    with connect(args.store, read_only=True, timeout=5.0, describe="results store") as con:
        before = read_schema_version(con)
    if before > SCHEMA_VERSION:
        raise UserError(f"{args.store} is at schema version {before}, newer than this fcr-eval's {SCHEMA_VERSION}; "
                        "upgrade fcr-eval (uv sync) to read it")
    ResultsStore(args.store)
    print(f"{args.store}: schema version {before} -> {SCHEMA_VERSION}" if before != SCHEMA_VERSION
          else f"{args.store}: already at schema version {SCHEMA_VERSION}; nothing to do")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("accelerate", "diffusers", "matplotlib", "PIL", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    body = {"plan": _plan, "run": _run, "report": _report, "migrate": _migrate}[args.command]

    def command() -> int:
        if args.command != "migrate":  # migrating a store needs the light install only
            _require_runner(args.command)
        return body(args)

    return run_cli(command, prog="fcr-eval", debug=args.debug, user_errors=USER_ERRORS,
                   on_interrupt="interrupted: finished runs are in the store; run the same command again to resume")


def _finished(store: str, experiment_id: str) -> set[str]:
    """Run ids of ``experiment_id`` already in ``store`` (none when there is no store yet).

    A path that is not a store is an error (``check_store`` ran first); a store of an older
    schema is read after the next ``run`` or ``report`` migrates it."""
    if not Path(store).is_file():
        return set()
    from fcr_eval.store import ResultsStore
    from fcr_eval.store.db import StoreSchemaError

    try:
        return ResultsStore.open_readonly(store).finished_run_ids(experiment_id)
    except StoreSchemaError as e:
        logger.warning("%s; the plan counts no run as done", e)
        return set()


if __name__ == "__main__":
    raise SystemExit(main())
