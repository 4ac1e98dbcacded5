"""The explorer served by ``streamlit run`` and looked at in a Playwright page.

For the end-to-end test and ``apps/results-explorer/scripts/screenshots.py``; the browser itself
comes from ``tests/apps/browser.py``.

Example::

    with serve(small_store) as url, open_chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        text = open_view(page, url + "/?view=compare", expect="Comparison table")
        page.screenshot(path="docs/explorer-compare.png")
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from fcr_results_explorer.app_env import ENV_DB, ENV_HUMAN_STUDY
from fcr_results_explorer.cli import build_command
from playwright.sync_api import Page
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from ..browser import free_port

# Quiet, deterministic pages: no file watcher, the light theme, no developer toolbar.
SERVE_FLAGS = ("--server.fileWatcherType", "none", "--theme.base", "light",
               "--client.toolbarMode", "viewer")


@contextlib.contextmanager
def serve(db: str | os.PathLike[str], human_study: str | os.PathLike[str] | None = None,
          timeout_s: float = 90.0) -> Iterator[str]:
    """Run ``streamlit run app.py`` headless on a free 127.0.0.1 port and yield its base URL.

    Args:
        db: the results store the app reads.
        human_study: the human-study store (default: the app's, beside ``db``).
        timeout_s: how long Streamlit may take to answer its health check.

    Example::

        with serve("results/fcr.duckdb") as url:
            print(url)  # http://127.0.0.1:<port>
    """
    port = free_port()
    env = dict(os.environ)
    env[ENV_DB] = str(Path(db).resolve())
    if human_study:
        env[ENV_HUMAN_STUDY] = str(Path(human_study).resolve())
    cmd = build_command(argparse.Namespace(port=port, address="127.0.0.1", headless=True),
                        list(SERVE_FLAGS))
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_healthy(proc, log, url, timeout_s)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_healthy(proc: subprocess.Popen, log, url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"streamlit exited with {proc.returncode}:\n"
                               + log.read().decode(errors="replace")[-4000:])
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"streamlit did not answer on {url} within {timeout_s:.0f} s")
        time.sleep(0.3)


def open_view(page: Page, url: str, expect: str | None = None, timeout_s: float = 90,
              settle_s: float = 1.5) -> str:
    """Load ``url`` and wait until the app has finished running and ``expect`` is on the page.

    Args:
        page: a Playwright page.
        url: the view's URL, query string included.
        expect: text that must appear (``None``: any finished page).
        timeout_s: how long the script run may take.
        settle_s: extra time for charts to finish drawing.

    Returns:
        The page's visible text.

    Example::

        text = open_view(page, url + "/?view=criteria", expect="criteria pass")
    """
    page.goto(url)
    try:
        page.wait_for_function(_APP_IDLE_JS, arg=expect, timeout=timeout_s * 1000, polling=300)
    except PlaywrightTimeout:
        text = page.inner_text("body")
        raise TimeoutError(f"{url} did not finish within {timeout_s:.0f} s "
                           f"(expected {expect!r}); page text: {text[:800]!r}") from None
    page.wait_for_timeout(settle_s * 1000)  # let charts draw
    return page.inner_text("body")


# The app root says whether the script is running (``data-test-script-state``); tables draw into
# a canvas and charts into a canvas or SVG once their data has arrived.
_APP_IDLE_JS = """expect => {
  const app = document.querySelector('[data-testid="stApp"]');
  const main = document.querySelector('[data-testid="stMain"]');
  if (!app || !main || !main.innerText.trim()) return false;
  if (app.getAttribute('data-test-script-state') !== 'notRunning') return false;
  if (document.querySelector('[data-testid="stSkeleton"]')) return false;
  const grids = [...document.querySelectorAll('[data-testid="stDataFrameResizable"]')];
  const shown = e => !e.closest('details:not([open])') && e.getClientRects().length;
  if (grids.some(g => shown(g) && !g.querySelector('canvas'))) return false;
  const charts = [...document.querySelectorAll('.stVegaLiteChart, [data-testid="stVegaLiteChart"]')];
  if (charts.some(c => shown(c) && !c.querySelector('canvas, svg'))) return false;
  return expect === null || document.body.innerText.includes(expect);
}"""
