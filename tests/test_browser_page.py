"""The demo page in a real browser: headless Chromium (Debian's package) driven by Playwright.

The page speaks protocol v2 through ``/hubbub.js``: one ``/ws`` socket per page for every room
and for presence. Two pages on one real ``server.py`` chat in two rooms (a room list, switching,
unread counts), see each other's presence with a status from ``meta`` ("typing…"), a latecomer
reads the history, and a page comes back by itself after a server restart, sending what was
written during the outage. Screenshots of every page land in the test's tmp dir.

Skipped only when no Chromium (or no Playwright) is installed *and* ``CI`` is unset; under CI a
missing browser fails (see ``tests/browser.py``).
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser import chromium
from tests.servers import RunningServer, spawn_server


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    yield from chromium()


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

    def add_room(self, room: str) -> None:
        """Add a room with the room list's form (it becomes the room on screen)."""
        from playwright.sync_api import expect

        self.page.fill("#new-room", room)
        self.page.press("#new-room", "Enter")
        expect(self.page.locator("#rooms li.active .name")).to_have_text(room)

    def switch(self, room: str) -> None:
        from playwright.sync_api import expect

        self.room(room).locator("button.pick").click()
        expect(self.page.locator("#rooms li.active .name")).to_have_text(room)

    def room(self, room: str) -> Any:
        """The room list's entry for ``room``."""
        return self.page.locator("#rooms li").filter(has=self.page.get_by_text(room, exact=True))

    def unread(self, room: str) -> Any:
        return self.room(room).locator(".unread")

    def say(self, text: str) -> None:
        self.page.fill("#text", text)
        self.page.press("#text", "Enter")

    def texts(self) -> Any:
        return self.page.locator("#messages .msg .text")

    def presence(self) -> Any:
        return self.page.locator("#presence li .name")

    def status_of(self, user: str) -> Any:
        """The status line (from the user's ``meta``) under ``user`` in the presence list."""
        return self.page.locator(f'#presence li[data-user="{user}"] .state')


def test_get_root_serves_the_page_from_the_real_server() -> None:
    """No browser needed: server.py wires the page in at GET / and its client at GET /hubbub.js."""
    with spawn_server() as server:
        with urllib.request.urlopen(server.http + "/") as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "text/html; charset=utf-8"
            policy = response.headers["Content-Security-Policy"]
            assert f"ws://{server.host}:{server.port}" in policy
            assert "script-src 'self' 'sha256-" in policy  # the module import, and the one inline module
            assert "require-trusted-types-for 'script'" in policy
            html = response.read()
            assert b"<title>hubbub</title>" in html
            assert b'import { connect } from "/hubbub.js";' in html
            assert b"new WebSocket" not in html and b'connect("/ws"' in html  # v2 only, through the client
        with urllib.request.urlopen(server.http + "/hubbub.js") as response:
            assert response.headers["Content-Type"] == "text/javascript"
            assert b"export function connect(" in response.read()


def test_two_pages_chat_in_two_rooms_and_see_each_other_type(browser: Any, tmp_path: Path) -> None:
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

        # a second room on the same socket: the room list, switching, unread counts
        alice.add_room("random")
        expect(alice.page.locator("#rooms li .name")).to_have_text(["general", "random"])
        expect(alice.presence()).to_have_text(["alice"])  # the presence of the room on screen
        expect(alice.texts()).to_have_count(0)
        bob.add_room("random")
        expect(alice.presence()).to_have_text(["alice", "bob"])
        bob.switch("general")
        alice.say("over in random")
        expect(bob.unread("random")).to_have_text("1")
        alice.say("still here")
        expect(bob.unread("random")).to_have_text("2")
        expect(bob.texts()).to_have_text(["hello bob", "hi alice <b>not bold</b>"])  # general, untouched
        expect(bob.unread("general")).to_be_hidden()
        bob.switch("random")
        expect(bob.texts()).to_have_text(["over in random", "still here"])
        expect(bob.unread("random")).to_be_hidden()

        # a status from meta: bob typing shows under his name on alice's page, and clears
        bob.page.fill("#text", "typing a long")
        bob.page.locator("#text").press_sequentially(" answer")
        expect(alice.status_of("bob")).to_have_text("typing…")
        expect(alice.status_of("alice")).to_have_text("")
        alice.page.screenshot(path=tmp_path / "alice-sees-bob-typing.png")
        bob.page.press("#text", "Enter")  # sending stops the typing status at once
        expect(alice.texts()).to_have_text(["over in random", "still here", "typing a long answer"])
        expect(alice.status_of("bob")).to_have_text("")
        bob.page.locator("#text").press_sequentially("hmm")
        expect(alice.status_of("bob")).to_have_text("typing…")
        expect(alice.status_of("bob")).to_have_text("")  # a pause (2.5 s) clears it by itself
        alice.switch("general")
        expect(alice.status_of("bob")).to_have_text("")  # typing was in random only

        # a latecomer reads the room's history; its one socket carries the token
        carol = Tab(browser, server, width=1400)
        carol.join("carol", "general", token="header.payload.signature")
        expect(carol.texts()).to_have_text(["hello bob", "hi alice <b>not bold</b>"])
        carol.add_room("random")
        expect(carol.texts()).to_have_text(["over in random", "still here", "typing a long answer"])
        assert len(carol.sockets) == 1 and "/ws?" in carol.sockets[0]
        assert "token=header.payload.signature" in carol.sockets[0]
        carol.context.close()

        for tab in (alice, bob):
            assert len(tab.sockets) == 1 and "/ws?" in tab.sockets[0]  # two rooms and presence, one socket
        assert bob.page.evaluate("document.documentElement.scrollWidth") <= 400  # no sideways scroll
        for name, tab in (("alice", alice), ("bob", bob)):
            tab.page.screenshot(path=tmp_path / f"{name}.png")
            assert (tmp_path / f"{name}.png").stat().st_size > 0

        bob.context.close()
        expect(alice.presence()).to_have_text(["alice"])
        alice.switch("random")
        expect(alice.presence()).to_have_text(["alice"])
        alice.page.screenshot(path=tmp_path / "alice-alone.png")
        assert alice.errors == [] and bob.errors == []  # CSP and Trusted Types violations would show up here
        alice.context.close()


def test_page_reconnects_after_the_server_restarts(browser: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    with spawn_server() as server:
        port = server.port
        dave = Tab(browser, server, width=800)
        dave.join("dave", "ops")
        dave.say("before the restart")
        expect(dave.page.locator("#messages .msg.mine:not(.pending)")).to_have_count(1)
        dave.add_room("dev")
        dave.switch("ops")
        assert server.stop() == 0
        status = dave.page.locator("#status")
        expect(status).to_have_attribute("data-state", "reconnecting")
        expect(status).to_contain_text("reconnecting")
        dave.say("during the outage")  # kept, shown as pending, sent once the server is back
        expect(dave.page.locator("#messages .msg.mine.pending")).to_have_count(1)
        dave.page.screenshot(path=tmp_path / "dave-reconnecting.png")
    with spawn_server("--port", str(port)) as again:
        expect(status).to_have_attribute("data-state", "open")
        expect(dave.presence()).to_have_text(["dave"])
        expect(dave.texts()).to_have_text(["before the restart", "during the outage"])  # kept on the page
        expect(dave.page.locator("#messages .msg.mine:not(.pending)")).to_have_count(2)  # acked by the new one
        dave.switch("dev")
        expect(dave.presence()).to_have_text(["dave"])  # both rooms rejoined
        erin = Tab(browser, again, width=800)  # the new server stored what was sent during the outage
        erin.join("erin", "ops")
        expect(erin.texts()).to_have_text(["during the outage"])
        expect(erin.presence()).to_have_text(["dave", "erin"])
        dave.page.screenshot(path=tmp_path / "dave-back.png")
        assert [e for e in dave.errors if "WebSocket connection to" not in e] == []  # refused while it was down
        assert erin.errors == []
        erin.context.close()
        dave.context.close()
