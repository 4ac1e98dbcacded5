"""``fcr-human-study``: build a study, invite raters, serve the rating app, analyse the votes.

    fcr-human-study build   --store results/fcr.duckdb --out results/human-study.duckdb --pairs 1000
    fcr-human-study invite  --study results/human-study.duckdb -n 20 > invitations.csv
    fcr-human-study serve   --study results/human-study.duckdb [--share] [--port 7860]
    fcr-human-study analyse --study results/human-study.duckdb
    fcr-human-study export  --study results/human-study.duckdb --csv votes.csv
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

from .store import DEFAULT_STUDY_PATH

logger = logging.getLogger("fcr_human_study")


def _require_study(path: str) -> None:
    from .store import StudyStoreError

    if not Path(path).exists():
        raise StudyStoreError(f"no study at {path}; build one with `fcr-human-study build`")


def _cmd_build(args: argparse.Namespace) -> int:
    from .build import add_raters, build_study

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
    # Gradio serves whatever lies in its upload and example-cache folders (shared by every Gradio
    # app on the machine by default): give this server private, empty ones.
    private = Path(tempfile.mkdtemp(prefix="fcr-human-study-gradio-"))
    os.environ.setdefault("GRADIO_TEMP_DIR", str(private / "uploads"))
    os.environ.setdefault("GRADIO_EXAMPLES_CACHE", str(private / "examples"))
    from .app import build_app, launch_app
    from .rating import RatingService
    from .store import StudyStore

    _require_study(args.study)
    store = StudyStore(args.study, idle_close_s=args.idle_close)
    service = RatingService(store)
    print(f"serving study {service.study_id} ({service.n_pairs} pairs, {service.per_rater} per "
          f"rater) from {args.study}; images from {store.images_dir}", flush=True)
    demo = build_app(service, title=args.title)
    try:
        launch_app(demo, service, server_name=args.host, server_port=args.port, share=args.share)
    finally:
        store.close()
    return 0


def _cmd_analyse(args: argparse.Namespace) -> int:
    from .analysis import analyse_study, format_table, write_analysis
    from .store import StudyStore

    _require_study(args.study)
    store = StudyStore(args.study)
    try:
        result = analyse_study(store, min_attention_accuracy=args.min_attention_accuracy,
                               n_bootstrap=args.bootstrap, seed=args.seed)
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
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="build a study of A/B pairs from the results store's samples")
    b.add_argument("--store", default="results/fcr.duckdb", help="the fcr-eval results store")
    b.add_argument("--out", default=str(DEFAULT_STUDY_PATH), help="the study's own DuckDB file")
    b.add_argument("--pairs", type=int, default=1000, help="pairs in the study, attention checks included")
    b.add_argument("--attention-share", type=float, default=0.1)
    b.add_argument("--pairs-per-rater", type=int, default=50)
    b.add_argument("--experiment", help="experiment id (required if the store holds several)")
    b.add_argument("--variations", nargs="+", help="variation ids to compare (default: all)")
    b.add_argument("--raters", type=int, default=0, help="also create this many invitation tokens")
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(fn=_cmd_build)

    i = sub.add_parser("invite", help="create raters; prints rater_id,token CSV (tokens shown once)")
    i.add_argument("--study", default=str(DEFAULT_STUDY_PATH))
    i.add_argument("-n", type=int, default=1)
    i.add_argument("--label", default="rater")
    i.set_defaults(fn=_cmd_invite)

    s = sub.add_parser("serve", help="serve the rating app")
    s.add_argument("--study", default=str(DEFAULT_STUDY_PATH))
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=None)
    s.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    s.add_argument("--title", default="Image preference study")
    s.add_argument("--idle-close", type=float, default=1.0,
                   help="seconds without votes after which the study file is released for readers")
    s.set_defaults(fn=_cmd_serve)

    a = sub.add_parser("analyse", help="win rates, Bradley-Terry scores, agreement; writes them to the study file")
    a.add_argument("--study", default=str(DEFAULT_STUDY_PATH))
    a.add_argument("--min-attention-accuracy", type=float, default=0.8)
    a.add_argument("--bootstrap", type=int, default=1000)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--dry-run", action="store_true", help="print only, write nothing")
    a.set_defaults(fn=_cmd_analyse)

    e = sub.add_parser("export", help="write every vote with its pair as CSV")
    e.add_argument("--study", default=str(DEFAULT_STUDY_PATH))
    e.add_argument("--csv", default="human-study-votes.csv")
    e.set_defaults(fn=_cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .build import StudyBuildError
    from .store import StudyStoreError

    try:
        from fcr_eval.store import StoreError
    except ImportError:  # pragma: no cover
        StoreError = RuntimeError  # noqa: N806
    try:
        return args.fn(args)
    except (StudyBuildError, StudyStoreError, StoreError) as e:
        print(f"fcr-human-study {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
