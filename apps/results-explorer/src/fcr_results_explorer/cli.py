"""``fcr-explorer``: start the Streamlit explorer on a results store.

    uv run fcr-explorer                      # results/fcr.duckdb
    uv run fcr-explorer --db runs/fcr.duckdb --port 8600
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

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
    parser.add_argument("--port", type=int, default=8501)
    parser.add_argument("--address", default="127.0.0.1",
                        help="address to serve on (default: only this machine)")
    parser.add_argument("--headless", action="store_true", help="do not open a browser")
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    location = StoreLocation.resolve(args.db, args.human_study)
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
