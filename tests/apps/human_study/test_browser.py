"""A real browser (headless Chromium over the DevTools protocol) rates pairs on the page.

Skipped where Chromium is not installed (Debian: ``apt-get install chromium``).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from fcr_human_study.app import build_app, launch_app
from fcr_human_study.build import add_raters, build_study
from fcr_human_study.rating import RatingService
from fcr_human_study.store import StudyStore

from .conftest import VARIATIONS, make_results_store
from .test_app import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed"),
    pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword).*"),
]
websockets = pytest.importorskip("websockets")


class Page:
    """The smallest DevTools client: evaluate JavaScript, wait for a condition."""

    def __init__(self, ws):
        self.ws, self.n = ws, 0

    async def call(self, method: str, **params):
        self.n += 1
        await self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(await self.ws.recv())
            if msg.get("id") == self.n:
                return msg

    async def js(self, expr: str):
        r = await self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        return r["result"]["result"].get("value")

    async def wait_for(self, expr: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = await self.js(expr)
            if value:
                return value
            await asyncio.sleep(0.2)
        raise TimeoutError(expr)


def click(label: str) -> str:
    return (f"(() => {{ const b = [...document.querySelectorAll('button')]"
            f".find(b => b.innerText.includes({json.dumps(label)})); if (b) b.click(); return !!b; }})()")


PROGRESS = "(document.querySelector('#progress-wrap') || {}).innerText || ''"


def test_a_browser_rates_pairs_through_the_page(tmp_path: Path):
    results = make_results_store(tmp_path)
    study = tmp_path / "results" / "human-study.duckdb"
    build_study(results, study, n_pairs=20, attention_share=0.1, pairs_per_rater=10)
    (_, token), = add_raters(study, 1)
    service = RatingService(StudyStore(study, idle_close_s=1.0))
    demo = build_app(service)
    _, url, _ = launch_app(demo, service, server_name="127.0.0.1", server_port=free_port(),
                           prevent_thread_lock=True, quiet=True)
    port = free_port()
    browser = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tempfile.mkdtemp()}", f"--remote-debugging-port={port}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def rate() -> str:
        for _ in range(150):
            try:
                targets = httpx.get(f"http://127.0.0.1:{port}/json").json()
                break
            except httpx.HTTPError:
                await asyncio.sleep(0.2)
        ws_url = next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"]
        async with websockets.connect(ws_url, max_size=None) as ws:
            page = Page(ws)
            await page.call("Page.navigate", url=url)
            await page.wait_for("!!document.querySelector('input[type=password]')")
            await page.js(
                "(() => { const i = document.querySelector('input[type=password]'); "
                f"i.value = {json.dumps(token)}; i.dispatchEvent(new Event('input', {{bubbles: true}})); }})()")
            await asyncio.sleep(0.3)
            assert await page.js(click("Start"))
            await page.wait_for(f"({PROGRESS}).includes('Pair 1 of 10')")
            for k, label in enumerate(["A is better", "B is better", "About the same", "Both are bad"]):
                assert await page.js(click(label))
                await page.wait_for(f"({PROGRESS}).includes('Pair {k + 2} of 10')")
            return await page.js("document.documentElement.outerHTML")

    try:
        dom = asyncio.run(asyncio.wait_for(rate(), timeout=120))
    finally:
        browser.kill()
        browser.wait()
        demo.close()
    votes = service.store.query("SELECT clicked, choice, left_side FROM votes ORDER BY voted_at")
    service.store.close()
    assert [c for c, _, _ in votes] == ["left", "right", "tie", "both_bad"]
    for clicked, choice, left in votes[:2]:
        assert choice == (left if clicked == "left" else {"a": "b", "b": "a"}[left])
    for v in VARIATIONS:
        assert v.split("-")[0] not in dom
