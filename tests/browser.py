"""Headless Chromium (Debian's package) driven by Playwright, for the browser tests.

Skipped only when no Chromium (or no Playwright) is installed *and* ``CI`` is unset; under CI a
missing browser fails. ``.ci/run`` installs Debian's ``chromium``; ``playwright install`` is never
needed (it downloads its own build).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
GIVE_UP_MS = 30_000  # how long an expectation retries before the test fails; never a speed check


def find_chromium() -> str | None:
    for candidate in (shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def skip_or_fail(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}, and CI is set: the browser test must run (see .ci/run)")
    pytest.skip(reason)


def chromium() -> Iterator[Any]:
    """One headless Chromium (for a module-scoped fixture); every test opens its own contexts."""
    executable = find_chromium()
    if executable is None:
        skip_or_fail("no Chromium installed (apt-get install chromium)")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        skip_or_fail("Playwright is not installed (pip install -e '.[test]')")
    expect.set_options(timeout=GIVE_UP_MS)
    with sync_playwright() as playwright:
        # Playwright adds --headless and a fresh temporary --user-data-dir itself.
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()
