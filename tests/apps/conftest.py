"""Fixtures shared by both apps' tests: a headless Chromium (Playwright on the Debian package)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser

from .browser import ChromiumMissing, find_chromium, open_chromium


def require_chromium() -> str:
    """The ``chromium`` executable, or fail the calling test naming ``apt-get install chromium``.

    A failure, not a skip: CI must not go green without having run the browser tests.
    """
    try:
        return find_chromium()
    except ChromiumMissing as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture
def browser() -> Iterator[Browser]:
    """A fresh headless Chromium (own process and profile) for one test."""
    require_chromium()
    with open_chromium() as launched:
        yield launched
