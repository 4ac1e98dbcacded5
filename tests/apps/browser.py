"""Headless Chromium through Playwright, for both apps' browser tests and screenshot scripts.

The one owner of how a browser starts here: Playwright's Python package drives the Debian
package ``chromium`` through ``executable_path``, so ``playwright install`` (a browser download)
is never needed. Tests take the ``browser`` fixture of ``tests/apps/conftest.py``; scripts put
the repository root on ``sys.path`` and call :func:`open_chromium`. Nothing here ships in an
app's ``src``.

Example::

    with open_chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"http://127.0.0.1:{port}/")
        page.screenshot(path="docs/shot.png")
"""

from __future__ import annotations

import contextlib
import shutil
import socket
from collections.abc import Iterator

from playwright.sync_api import Browser, sync_playwright

#: Chromium flags that work as root in a container with no GPU and no network. Playwright adds
#: ``--headless`` (and ``--hide-scrollbars``) itself.
CHROMIUM_ARGS = (
    "--no-sandbox",  # root in a container: Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # no update checks, component downloads or sync calls out of an offline machine
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


class ChromiumMissing(RuntimeError):
    """``chromium`` is not on PATH."""


def find_chromium() -> str:
    """The Debian ``chromium`` executable on PATH.

    Raises:
        ChromiumMissing: saying to run ``apt-get install chromium``.

    Example:
        >>> find_chromium()
        '/usr/bin/chromium'
    """
    found = shutil.which("chromium")
    if found is None:
        raise ChromiumMissing(
            "the apps' browser tests and screenshots need headless Chromium, and `chromium` is "
            "not on PATH: install the Debian package with `apt-get install chromium` "
            "(./run.sh test installs it)")
    return found


@contextlib.contextmanager
def open_chromium() -> Iterator[Browser]:
    """Start headless Chromium under Playwright; close both on exit.

    Each call gets its own browser process and throw-away profile, so parallel tests share
    nothing.

    Raises:
        ChromiumMissing: before Playwright starts, when ``chromium`` is not installed.

    Example:
        >>> with open_chromium() as browser:
        ...     page = browser.new_page()
        ...     page.set_content("<p>hi</p>")
        ...     page.inner_text("p")
        'hi'
    """
    executable = find_chromium()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=list(CHROMIUM_ARGS))
        try:
            yield browser
        finally:
            browser.close()


def free_port() -> int:
    """A local TCP port that was free a moment ago, for a server a test starts.

    Binding port 0 lets the OS choose, so parallel test workers do not collide.

    Example:
        >>> 1024 <= free_port() <= 65535
        True
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
