"""End to end: `streamlit run` the explorer and load it in headless Chromium (Playwright).

Needs the Debian package `chromium` (`apt-get install chromium`); without it this test fails
and says so rather than being skipped (the `browser` fixture of tests/apps/conftest.py).
"""

from __future__ import annotations

import re

import pytest

from .served import open_view, serve

# slow: a served app in a real browser
pytestmark = pytest.mark.slow


def _number_after(label: str, text: str) -> str:
    match = re.search(rf"{re.escape(label)}\s+([\d,]+)", text)
    assert match, f"{label!r} not on the page: {text[:1500]!r}"
    return match.group(1)


def test_the_served_app_shows_the_store_in_a_browser(small_store, tmp_path, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    with serve(small_store) as url:
        text = open_view(page, url + "/", expect="Variations", timeout_s=120)
        shot = tmp_path / "explorer-overview.png"
        page.screenshot(path=shot)
        assert "FCR results" in text and "Overview" in text
        assert _number_after("Experiments", text) == "2"
        assert _number_after("Runs", text) == "11"
        assert shot.stat().st_size > 20_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        # a shared URL opens a filtered view in a fresh page load
        text = open_view(page, url + "/?view=overview&experiment_id=exp-b", expect="Variations")
        assert _number_after("Runs", text) == "2"

        text = open_view(page, url + "/?view=criteria", expect="criteria pass")
        assert "1 of 3 criteria pass" in text
        assert "value 0.125 · threshold ≤ 0.05" in text
        page.screenshot(path=tmp_path / "explorer-criteria.png")
