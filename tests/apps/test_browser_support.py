"""The shared browser launcher: the Debian chromium under Playwright, and a loud failure without it."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from .browser import find_chromium, open_chromium
from .conftest import require_chromium


def test_a_missing_chromium_fails_the_test_naming_apt_get(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(BaseException) as raised:  # Skipped is a BaseException too
        require_chromium()
    assert raised.type is pytest.fail.Exception, "a missing browser must fail, not skip"
    assert "apt-get install chromium" in str(raised.value)


def test_playwright_drives_the_debian_chromium(tmp_path):
    executable = require_chromium()
    installed = subprocess.run([executable, "--version"], capture_output=True, text=True,
                               check=True, timeout=60).stdout
    with open_chromium() as browser:
        # the version Playwright talks to is the Debian package's, not a downloaded build
        assert browser.version in installed
        page = browser.new_page(viewport={"width": 320, "height": 200})
        page.set_content("<p id='x'>drawn</p><script>document.title = 'ran'</script>")
        assert page.inner_text("#x") == "drawn" and page.title() == "ran"
        shot = tmp_path / "shot.png"
        page.screenshot(path=shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert find_chromium() == executable
