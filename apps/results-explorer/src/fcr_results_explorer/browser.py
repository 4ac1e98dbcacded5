"""Serve the explorer with ``streamlit run`` and look at it with headless Chromium.

Used by the screenshots script and the end-to-end test. Chromium is the Debian package
``chromium`` (``apt-get install chromium``).

Example::

    with serve("results/fcr.duckdb") as url:
        with Page(width=1400, height=1000) as page:
            text = page.open(url + "/?view=compare", expect="Comparison table")
            page.screenshot(Path("docs/explorer-compare.png"))
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

from fcr_results_explorer.app_env import ENV_DB, ENV_HUMAN_STUDY

APP = Path(__file__).with_name("app.py")
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


class ChromiumMissing(RuntimeError):
    pass


def find_chromium() -> str:
    """The Chromium executable, or :class:`ChromiumMissing` saying how to install it."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    raise ChromiumMissing(
        "headless Chromium is needed to load the explorer in a browser; install it with "
        "`apt-get install chromium` (Debian package `chromium`)"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(
    db: str | os.PathLike[str],
    human_study: str | os.PathLike[str] | None = None,
    port: int | None = None,
    timeout_s: float = 90.0,
) -> Iterator[str]:
    """Run ``streamlit run app.py`` headless on 127.0.0.1 and yield its base URL."""
    port = port or free_port()
    env = dict(os.environ)
    env[ENV_DB] = str(Path(db).resolve())
    if human_study:
        env[ENV_HUMAN_STUDY] = str(Path(human_study).resolve())
    cmd = [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.headless", "true",
        "--server.address", "127.0.0.1",
        "--server.port", str(port),
        "--server.fileWatcherType", "none",
        "--browser.gatherUsageStats", "false",
        "--theme.base", "light",
        "--client.toolbarMode", "viewer",
    ]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"streamlit exited with {proc.returncode}:\n"
                                   + log.read().decode(errors="replace")[-4000:])
            try:
                with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"streamlit did not answer on {url} within {timeout_s:.0f} s")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


class Page:
    """A headless Chromium page driven through the DevTools protocol (CDP)."""

    def __init__(self, width: int = 1400, height: int = 1000, timeout_s: float = 120) -> None:
        self.width, self.height, self.timeout_s = width, height, timeout_s
        self._profile = tempfile.TemporaryDirectory(prefix="fcr-chromium-",
                                                    ignore_cleanup_errors=True)
        self._proc = subprocess.Popen(
            [find_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={self._profile.name}",
             "--remote-debugging-port=0", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self._id = 0
        self._stack = contextlib.ExitStack()
        try:
            self._ws = self._stack.enter_context(
                connect(self._page_ws_url(), max_size=None, open_timeout=30))
            self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                      deviceScaleFactor=1, mobile=False)
        except BaseException:
            self.close()
            raise

    def _page_ws_url(self) -> str:
        deadline = time.monotonic() + 60
        port = None
        assert self._proc.stderr is not None
        while port is None:
            line = self._proc.stderr.readline()
            if not line and self._proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self._proc.returncode}")
            match = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            if match:
                port = int(match.group(1))
            if time.monotonic() > deadline:
                raise TimeoutError("chromium did not open its DevTools port")
        threading.Thread(target=self._proc.stderr.read, daemon=True).start()  # drain
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                pages = [t for t in json.load(r) if t.get("type") == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
            if time.monotonic() > deadline:
                raise TimeoutError("chromium opened no page")
            time.sleep(0.2)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        self._ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self._ws.recv(timeout=self.timeout_s))
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"CDP {method}: {msg['error']}")
                return msg.get("result", {})

    def evaluate(self, expression: str) -> Any:
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return res.get("result", {}).get("value")

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def open(self, url: str, expect: str | None = None, timeout_s: float = 90,
             settle_s: float = 1.5) -> str:
        """Load ``url`` and wait until the app has finished running (and ``expect`` shows).

        Returns the page's text.
        """
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout_s
        time.sleep(0.5)
        while True:
            done = self.evaluate(_APP_IDLE_JS)
            text = self.text()
            if done and (expect is None or expect in text):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not finish within {timeout_s:.0f} s "
                                   f"(expected {expect!r}); page text: {text[:800]!r}")
            time.sleep(0.3)
        time.sleep(settle_s)  # let charts draw
        return self.text()

    def screenshot(self, out: Path) -> Path:
        out = Path(out).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        data = self.call("Page.captureScreenshot", format="png")["data"]
        out.write_bytes(base64.b64decode(data))
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._stack.close()
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._profile.cleanup()

    def __enter__(self) -> Page:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# The app root says whether the script is running (``data-test-script-state``); tables draw into
# a canvas and charts into a canvas or SVG once their data has arrived.
_APP_IDLE_JS = """(() => {
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
  return true;
})()"""
