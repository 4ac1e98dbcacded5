"""Screenshots of the explorer's main views: docs/explorer-<view>.png.

Serves the app with `streamlit run` on a free local port and captures each view in headless
Chromium (the Debian package `chromium`, driven by Playwright: tests/apps/browser.py and
tests/apps/results_explorer/served.py, shared with the end-to-end test). Re-run it on the real
store when the experiment runner's results exist:

    uv run python apps/results-explorer/scripts/screenshots.py --db results/fcr.duckdb
    uv run python apps/results-explorer/scripts/screenshots.py --demo /tmp/fcr-demo/fcr.duckdb

``--demo PATH`` first writes the demo store (``demo_store.py`` beside this script: made-up
numbers, through fcr-eval's writer) at PATH.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from urllib.parse import quote

import duckdb

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))  # the browser helpers are test support, not shipped in the app

from tests.apps.browser import open_chromium  # noqa: E402
from tests.apps.results_explorer.served import open_view, serve  # noqa: E402

# view, query string ({exp}: the experiment, {vars}: variations for the samples grid), text that
# must be on the page, viewport height
VIEWS = (
    ("overview", "view=overview", "Variations", 1250),
    ("compare", "view=compare&experiment_id={exp}", "Comparison and contrasts", 1700),
    ("paired", "view=paired&experiment_id={exp}", "against stride", 1700),
    ("quality-speed", "view=quality-speed&experiment_id={exp}", "Pareto front", 1450),
    ("mechanism", "view=mechanism&experiment_id={exp}", "σ²_Δ against the quality", 1500),
    ("criteria", "view=criteria&experiment_id={exp}", "criteria", 1250),
    ("samples", "view=samples&experiment_id={exp}{vars}", "run seed", 1150),
    ("human-study", "view=human-study", "Human study", 1300),
)


def pick(db: Path, experiment: str | None) -> tuple[str, list[str]]:
    """The experiment to show (``mini-exp-1`` when present) and, for the samples grid, the FD
    baselines next to FCR at the default λ = 0.1, stride by stride."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        exps = [r[0] for r in con.execute(
            "SELECT DISTINCT experiment_id FROM runs ORDER BY 1").fetchall()]
        exp = experiment or ("mini-exp-1" if "mini-exp-1" in exps else (exps or [""])[0])
        rows = con.execute(
            """SELECT DISTINCT variation_id, stride, lambda_fcr FROM runs
               WHERE experiment_id = ? AND sampler = 'fd'
                 AND (lambda_fcr IS NULL OR abs(lambda_fcr - 0.1) < 1e-9)
               ORDER BY stride, lambda_fcr NULLS FIRST, variation_id""", [exp]).fetchall()
    finally:
        con.close()
    return exp, [r[0] for r in rows][:6]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--db", type=Path, help="an existing results store")
    src.add_argument("--demo", type=Path, help="write the demo store here, then use it")
    parser.add_argument("--experiment", help="experiment to show (default: mini-exp-1 if present)")
    parser.add_argument("--out", type=Path, default=REPO / "docs", help="default: %(default)s")
    parser.add_argument("--views", nargs="*", default=[v[0] for v in VIEWS])
    parser.add_argument("--width", type=int, default=1400)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("fcr_eval").setLevel(logging.WARNING)
    log = logging.getLogger("screenshots")

    db = args.db
    if args.demo:
        from demo_store import build_demo_store  # beside this script (on sys.path[0])

        log.info("writing the demo store at %s", args.demo)
        db = build_demo_store(args.demo)
    if not db.is_file():
        log.error("no store at %s", db)
        return 1
    experiment, variations = pick(db, args.experiment)
    fill = {"exp": quote(experiment), "vars": "".join(f"&vars={quote(v)}" for v in variations)}
    written = []
    with serve(db) as url, open_chromium() as browser:
        for name, query, expect, height in VIEWS:
            if name not in args.views:
                continue
            query = query.format(**fill)
            t0 = time.monotonic()
            # a fresh page (own context) per view, sized to the view
            page = browser.new_page(viewport={"width": args.width, "height": height})
            open_view(page, f"{url}/?{query}", expect=expect, timeout_s=180, settle_s=2.0)
            out = (args.out / f"explorer-{name}.png").resolve()
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=out)
            page.close()
            written.append((out, time.monotonic() - t0))
    width = max(len(str(p)) for p, _ in written)
    print(f"{'screenshot':<{width}}  seconds")
    for path, secs in written:
        print(f"{str(path):<{width}}  {secs:7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
