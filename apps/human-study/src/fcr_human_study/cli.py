"""``fcr-human-study``: build a study, invite raters, serve the rating app, analyse the votes.

    fcr-human-study build   --store results/fcr.duckdb --out results/human-study.duckdb --pairs 1000
    fcr-human-study invite  --study results/human-study.duckdb -n 20 > invitations.csv
    fcr-human-study serve   --study results/human-study.duckdb [--share] [--port 7860]
    fcr-human-study analyse --study results/human-study.duckdb
    fcr-human-study export  --study results/human-study.duckdb --csv votes.csv

A bad input (no study, a file that is not one, a busy --port, an option out of range) is one line
``fcr-human-study: error: ...`` on stderr, exit code 2; ``--debug`` or FCR_DEBUG=1 adds the
traceback. A failed ``build`` leaves nothing at ``--out``. ``analyse`` of a study nobody has voted
in yet says "no votes yet", writes nothing and exits with 1 (:data:`EXIT_NO_VOTES`): the input is
right, there is just nothing to analyse yet, and a script can tell that apart from a wrong input.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from fcr_common.cli_errors import (
    EXIT_USAGE,
    UserError,
    add_debug_argument,
    check_port_free,
    float_in,
    int_at_least,
    port,
    run_cli,
)

from .store import DEFAULT_STUDY_PATH

logger = logging.getLogger("fcr_human_study")

#: ``analyse`` of a study without votes: nothing to analyse yet (a valid study, so not EXIT_USAGE).
EXIT_NO_VOTES = 1


def _require_study(path: str) -> None:
    if Path(path).is_dir():
        raise UserError(f"--study {path} is a directory; pass the study's DuckDB file (e.g. {Path(path) / 'human-study.duckdb'})")
    if not Path(path).exists():
        raise UserError(f"no study at {path}; build one with `fcr-human-study build` or pass the right --study")


def _require_folder(path: str, flag: str) -> None:
    """The folder ``path`` goes in exists and can be written (checked before anything is made)."""
    from fcr_eval.store.db import store_path

    store_path(path, flag, Path(DEFAULT_STUDY_PATH).name if flag == "--out" else "votes.csv")  # "x/": a folder
    parent = Path(path).parent
    if not parent.is_dir():
        raise UserError(f"the folder of {flag} {path} ({parent}) does not exist; create it or pass a path in an "
                        "existing folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"the folder of {flag} {path} ({parent}) is read-only; pass a path in a folder you can "
                        "write, or make that one writable")


def _check_study(path: str) -> None:
    """Open the study once, briefly, before anything is served: a file that is not a study fails
    here with the store's own message (and no connection is left to a background thread)."""
    from .rating import RatingService
    from .store import StudyStore

    store = StudyStore(path, read_only=True)
    try:
        RatingService(store)
    finally:
        store.close()


def _cmd_build(args: argparse.Namespace) -> int:
    from fcr_eval.store.results import check_results_store

    from .build import add_raters, build_study

    _require_folder(args.out, "--out")
    # read-only, whole and a results store (a study file, a pipe or a folder is named as such)
    check_results_store(args.store, must_exist=True, for_writing=False)

    report = build_study(
        args.store, args.out, n_pairs=args.pairs, attention_share=args.attention_share,
        pairs_per_rater=args.pairs_per_rater, experiment_id=args.experiment,
        variations=args.variations, seed=args.seed, progress=True,
    )
    secret_file = Path(args.out).resolve().parent / f"{Path(args.out).stem}-admin-secret.txt"
    secret_file.write_text(report.admin_secret + "\n")
    os.chmod(secret_file, 0o600)
    print(f"study {report.study_id}: {report.n_pairs} pairs ({report.n_attention} attention checks) "
          f"over {report.n_prompts} prompts, variations: {', '.join(report.variations)}")
    print(f"{'variation pair':<60} {'pairs':>6}")
    for name, n in report.pairs_per_variation_pair.items():
        print(f"{name:<60} {n:>6}")
    for w in report.warnings:
        print(f"warning: {w}")
    print(f"admin secret (also in {secret_file}, mode 600): {report.admin_secret}")
    if args.raters:
        _print_invitations(add_raters(args.out, args.raters))
    return 0


def _print_invitations(rows: list[tuple[str, str]]) -> None:
    print("rater_id,token")
    for rater_id, token in rows:
        print(f"{rater_id},{token}")


def _cmd_invite(args: argparse.Namespace) -> int:
    from .build import add_raters

    _require_study(args.study)
    _print_invitations(add_raters(args.study, args.n, label=args.label))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    _require_study(args.study)
    if args.port is not None:
        check_port_free(args.host, args.port)
    _check_study(args.study)
    from .server_temp import server_temp_folder, stop_on_sigterm

    # Gradio serves whatever lies in its upload and example-cache folders (shared by every Gradio
    # app on the machine by default): give this server private, empty ones, removed when it stops.
    with stop_on_sigterm(), server_temp_folder() as private:
        os.environ["GRADIO_TEMP_DIR"] = str(private / "gradio")
        os.environ["GRADIO_EXAMPLES_CACHE"] = str(private / "examples")
        from .app import build_app, launch_app
        from .rating import RatingService
        from .store import StudyStore

        store = StudyStore(args.study, idle_close_s=args.idle_close)
        service = RatingService(store)
        print(f"serving study {service.study_id} ({service.n_pairs} pairs, {service.per_rater} per "
              f"rater) from {args.study}; images from {store.images_dir}; temp files in {private} "
              "(removed when the server stops)", flush=True)
        demo = None
        try:
            demo = build_app(service, title=args.title, export_dir=private / "gradio" / "exports")
            launch_app(demo, service, server_name=args.host, server_port=args.port, share=args.share)
        except OSError as e:  # the port was taken between the check and the launch
            raise UserError(f"cannot serve on {args.host}:{args.port or 'the default port'}: {e}. Pass a free "
                            "port with --port") from None
        finally:
            if demo is not None:
                demo.close(verbose=False)
            store.close()
    return 0


def _cmd_analyse(args: argparse.Namespace) -> int:
    from .analysis import analyse_study, format_table, write_analysis
    from .store import StudyStore

    _require_study(args.study)
    store = StudyStore(args.study, read_only=args.dry_run)
    try:
        result = analyse_study(store, min_attention_accuracy=args.min_attention_accuracy,
                               n_bootstrap=args.bootstrap, seed=args.seed)
        if result.n_votes == 0:  # empty tables would read as a result; say what there is instead
            n_pairs, n_raters = store.query("SELECT (SELECT count(*) FROM pairs), (SELECT count(*) FROM raters)")[0]
            raise UserError(
                f"study {result.study_id} in {args.study} has no votes yet ({n_pairs} pairs, {n_raters} raters "
                "invited): nothing to analyse, nothing was written. Invite raters (`fcr-human-study invite`), "
                "serve the study (`fcr-human-study serve`) and analyse once they have voted",
                exit_code=EXIT_NO_VOTES)
        if not args.dry_run:
            write_analysis(store, result)
    finally:
        store.close()
    print(format_table(result))
    if not args.dry_run:
        print(f"\nwritten to human_study_results / human_study_scores / human_study_summary in {args.study}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .rating import RatingService
    from .store import StudyStore

    _require_study(args.study)
    _require_folder(args.csv, "--csv")
    store = StudyStore(args.study, read_only=True)
    try:
        path = RatingService(store).export_votes_csv(args.csv)
    finally:
        store.close()
    print(f"votes written to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fcr-human-study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true")
    add_debug_argument(p)
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="build a study of A/B pairs from the results store's samples")
    b.add_argument("--store", default="results/fcr.duckdb", help="the fcr-eval results store")
    b.add_argument("--out", default=str(DEFAULT_STUDY_PATH), help="the study's own DuckDB file")
    b.add_argument("--pairs", type=int_at_least(1), default=1000, help="pairs in the study, attention checks included")
    b.add_argument("--attention-share", type=float_in(0, 1, high_open=True), default=0.1)
    b.add_argument("--pairs-per-rater", type=int_at_least(1), default=50)
    b.add_argument("--experiment", help="experiment id (required if the store holds several)")
    b.add_argument("--variations", nargs="+", help="variation ids to compare (default: all)")
    b.add_argument("--raters", type=int_at_least(0), default=0, help="also create this many invitation tokens")
    b.add_argument("--seed", type=int_at_least(0), default=0)
    b.set_defaults(fn=_cmd_build)

    i = sub.add_parser("invite", help="create raters; prints rater_id,token CSV (tokens shown once)")
    i.add_argument("--study", default=str(DEFAULT_STUDY_PATH))
    i.add_argument("-n", type=int_at_least(1), default=1)
    i.add_argument("--label", default="rater")
    i.set_defaults(fn=_cmd_invite)

    s = sub.add_parser("serve", help="serve the rating app")
    s.add_argument("--study", default=str(DEFAULT_STUDY_PATH))
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=port, default=None)
    s.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    s.add_argument("--title", default="Image preference study")
    s.add_argument("--idle-close", type=float_in(0), default=1.0,
                   help="seconds without votes after which the study file is released for readers")
    s.set_defaults(fn=_cmd_serve)

    a = sub.add_parser("analyse", help="win rates, Bradley-Terry scores, agreement; writes them to the study file")
    a.add_argument("--study", default=str(DEFAULT_STUDY_PATH))
    a.add_argument("--min-attention-accuracy", type=float_in(0, 1), default=0.8)
    a.add_argument("--bootstrap", type=int_at_least(1), default=1000)
    a.add_argument("--seed", type=int_at_least(0), default=0)
    a.add_argument("--dry-run", action="store_true", help="print only, write nothing")
    a.set_defaults(fn=_cmd_analyse)

    e = sub.add_parser("export", help="write every vote with its pair as CSV")
    e.add_argument("--study", default=str(DEFAULT_STUDY_PATH))
    e.add_argument("--csv", default="human-study-votes.csv")
    e.set_defaults(fn=_cmd_export)
    return p


# Bad input besides UserError and missing paths (named by module: nothing is imported to check).
USER_ERRORS = {
    "fcr_human_study.build:StudyBuildError": EXIT_USAGE,
    "fcr_human_study.store:StudyStoreError": EXIT_USAGE,
    "fcr_eval.store.db:StoreError": EXIT_USAGE,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_cli(lambda: args.fn(args), prog="fcr-human-study", debug=args.debug, user_errors=USER_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
