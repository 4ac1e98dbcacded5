"""A real browser (headless Chromium under Playwright) rates pairs on the page.

Needs the Debian package `chromium` (`apt-get install chromium`); without it this test fails
and says so rather than being skipped (the `browser` fixture of tests/apps/conftest.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fcr_human_study.app import build_app, launch_app
from fcr_human_study.build import add_raters, build_study
from fcr_human_study.rating import RatingService
from fcr_human_study.store import StudyStore

from ..browser import free_port
from .conftest import VARIATIONS, make_results_store

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword).*"),
]
TIMEOUT_MS = 30_000


def test_a_browser_rates_pairs_through_the_page(tmp_path: Path, browser):
    results = make_results_store(tmp_path)
    study = tmp_path / "results" / "human-study.duckdb"
    build_study(results, study, n_pairs=20, attention_share=0.1, pairs_per_rater=10)
    (_, token), = add_raters(study, 1)
    service = RatingService(StudyStore(study, idle_close_s=1.0))
    demo = build_app(service)
    _, url, _ = launch_app(demo, service, server_name="127.0.0.1", server_port=free_port(),
                           prevent_thread_lock=True, quiet=True)
    try:
        page = browser.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        page.locator("input[type=password]").first.fill(token)
        page.locator("button", has_text="Start").first.click()
        progress = page.locator("#progress-wrap")
        progress.filter(has_text="Pair 1 of 10").wait_for()
        for k, label in enumerate(["A is better", "B is better", "About the same", "Both are bad"]):
            page.locator("button", has_text=label).first.click()
            progress.filter(has_text=f"Pair {k + 2} of 10").wait_for()
        dom = page.content()
    finally:
        demo.close()
    votes = service.store.query("SELECT clicked, choice, left_side FROM votes ORDER BY voted_at")
    service.store.close()
    assert [c for c, _, _ in votes] == ["left", "right", "tie", "both_bad"]
    for clicked, choice, left in votes[:2]:
        assert choice == (left if clicked == "left" else {"a": "b", "b": "a"}[left])
    for v in VARIATIONS:
        assert v.split("-")[0] not in dom
