"""The demo page in a real browser: headless Chromium (Debian's package) driven by Playwright.

Two pages join one room over a real ``server.py``: one sends, the other shows
it; presence shows both, then one page closes and the other sees the leave.
Screenshots of every page land in the test's tmp dir.

Skipped only when no Chromium (or no Playwright) is installed *and* ``CI`` is
unset; under CI a missing browser fails. ``.ci/run`` installs Debian's
``chromium``; ``playwright install`` is never needed (it downloads its own build).
"""

from __future__ import annotations

import os
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.servers import RunningServer, spawn_server

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


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium for the module; every test opens its own contexts (fresh profiles)."""
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
        chromium = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


class Tab:
    """One page in its own browser context, recording console errors and WebSocket URLs."""

    def __init__(self, browser: Any, server: RunningServer, width: int) -> None:
        self.context = browser.new_context(viewport={"width": width, "height": 800})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.sockets: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("websocket", lambda ws: self.sockets.append(ws.url))
        self.page.goto(server.http + "/")

    def join(self, name: str, room: str, token: str = "") -> None:
        from playwright.sync_api import expect

        self.page.fill("#name", name)
        self.page.fill("#room", room)
        self.page.fill("#token", token)
        self.page.click("#join-button")
        expect(self.page.locator("#status")).to_have_attribute("data-state", "open")

    def say(self, text: str) -> None:
        self.page.fill("#text", text)
        self.page.press("#text", "Enter")

    def texts(self) -> Any:
        return self.page.locator("#messages .msg .text")

    def presence(self) -> Any:
        return self.page.locator("#presence li .name")


def test_get_root_serves_the_page_from_the_real_server() -> None:
    """No browser needed: server.py wires the page in at GET /."""
    with spawn_server() as server, urllib.request.urlopen(server.http + "/") as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/html; charset=utf-8"
        policy = response.headers["Content-Security-Policy"]
        assert f"ws://{server.host}:{server.port}" in policy
        assert b"<title>hubbub</title>" in response.read()


def test_two_pages_chat_and_see_each_other_come_and_go(browser: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    with spawn_server() as server:
        alice = Tab(browser, server, width=1400)
        bob = Tab(browser, server, width=400)
        alice.join("alice", "general")
        bob.join("bob", "general")
        for tab in (alice, bob):
            expect(tab.presence()).to_have_text(["alice", "bob"])

        alice.say("hello bob")
        expect(bob.texts()).to_have_text(["hello bob"])
        expect(alice.page.locator("#messages .msg.mine:not(.pending)")).to_have_count(1)  # acked
        bob.say("hi alice <b>not bold</b>")
        expect(alice.texts()).to_have_text(["hello bob", "hi alice <b>not bold</b>"])  # text, never HTML

        carol = Tab(browser, server, width=1400)  # a latecomer sees the room's history
        carol.join("carol", "general", token="header.payload.signature")
        expect(carol.texts()).to_have_text(["hello bob", "hi alice <b>not bold</b>"])
        assert [u for u in carol.sockets if "token=header.payload.signature" in u] == carol.sockets
        assert len(carol.sockets) == 2  # /chat/general and /presence
        carol.context.close()

        assert bob.page.evaluate("document.documentElement.scrollWidth") <= 400  # no sideways scroll
        for name, tab in (("alice", alice), ("bob", bob)):
            tab.page.screenshot(path=tmp_path / f"{name}.png")
            assert (tmp_path / f"{name}.png").stat().st_size > 0

        bob.context.close()
        expect(alice.presence()).to_have_text(["alice"])
        alice.page.screenshot(path=tmp_path / "alice-alone.png")
        assert alice.errors == [] and bob.errors == []  # CSP violations would show up here
        alice.context.close()


def test_page_reconnects_after_the_server_restarts(browser: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    with spawn_server() as server:
        port = server.port
        dave = Tab(browser, server, width=800)
        dave.join("dave", "ops")
        dave.say("before the restart")
        expect(dave.page.locator("#messages .msg.mine:not(.pending)")).to_have_count(1)
        assert server.stop() == 0
        status = dave.page.locator("#status")
        expect(status).to_have_attribute("data-state", "reconnecting")
        expect(status).to_contain_text("reconnecting")
        expect(dave.page.locator("#send")).to_be_disabled()
        dave.page.screenshot(path=tmp_path / "dave-reconnecting.png")
    with spawn_server("--port", str(port)):
        expect(status).to_have_attribute("data-state", "open")
        expect(dave.page.locator("#presence li .name")).to_have_text(["dave"])
        expect(dave.texts()).to_have_text(["before the restart"])  # kept on the page
        dave.page.screenshot(path=tmp_path / "dave-back.png")
        dave.context.close()
