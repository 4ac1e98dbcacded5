"""``fcr-explorer``: start the Streamlit explorer on a results store.

    uv run fcr-explorer                      # results/fcr.duckdb
    uv run fcr-explorer --db runs/fcr.duckdb --port 8600

A bad input (a --db that is a directory or not a DuckDB file, a busy or impossible --port) is one
line ``fcr-explorer: error: ...`` on stderr, exit code 2, before Streamlit starts; ``--debug`` or
FCR_DEBUG=1 adds the traceback. A --db that does not exist yet is fine: the explorer shows how
to create one.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

from fcr_common.cli_errors import EXIT_USAGE, add_debug_argument, check_port_free, port, run_cli

from fcr_results_explorer.app_env import ENV_DB, ENV_HUMAN_STUDY
from fcr_results_explorer.reader import DEFAULT_STORE, StoreLocation

APP = Path(__file__).with_name("app.py")


def build_command(args: argparse.Namespace, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP),
           "--browser.gatherUsageStats", "false",
           "--server.port", str(args.port), "--server.address", args.address]
    if args.headless:
        cmd += ["--server.headless", "true"]
    return cmd + extra


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fcr-explorer", description="Explore the FCR results store in the browser.")
    parser.add_argument("--db", default=str(DEFAULT_STORE),
                        help="results store (DuckDB file); default: %(default)s")
    parser.add_argument("--human-study", default=None,
                        help="human-study votes store; default: human-study.duckdb beside --db")
    parser.add_argument("--port", type=port, default=8501)
    parser.add_argument("--address", default="127.0.0.1",
                        help="address to serve on (default: only this machine)")
    parser.add_argument("--headless", action="store_true", help="do not open a browser")
    add_debug_argument(parser)
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_cli(lambda: _serve(args, extra), prog="fcr-explorer", debug=args.debug,
                   user_errors={"fcr_eval.store.db:StoreError": EXIT_USAGE})


def _check_human_study(path: Path) -> None:
    """A human-study file that exists must be one (read-only, nothing created or migrated)."""
    from fcr_eval.store.db import StoreUnreadableError, connect, database_kind, describe_database

    if not (path.exists() or path.is_symlink()):
        return
    with connect(path, read_only=True, timeout=5.0, describe="human-study store") as con:
        kind, tables = database_kind(con)
    if kind not in ("human-study file", "empty"):
        raise StoreUnreadableError(f"--human-study {path} is not a human-study file: it is "
                                   f"{describe_database(kind, tables)}. Pass the study file `fcr-human-study build "
                                   "--out` wrote, or leave --human-study out")


def _serve(args: argparse.Namespace, extra: list[str]) -> int:
    from fcr_eval.store.results import check_results_store

    location = StoreLocation.resolve(args.db, args.human_study)
    # A store that exists must be a results store, read whole (read-only; a missing one gets guidance).
    check_results_store(os.path.expanduser(args.db), must_exist=False, for_writing=False)
    _check_human_study(location.human_study_path)
    check_port_free(args.address, args.port)
    if not location.path.exists():
        logging.getLogger("fcr-explorer").warning(
            "no store at %s yet: the explorer will show how to create one", location.path)
    env = dict(os.environ)
    env[ENV_DB] = str(location.path)
    env[ENV_HUMAN_STUDY] = str(location.human_study_path)
    try:
        return subprocess.call(build_command(args, extra), env=env)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
