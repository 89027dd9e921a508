"""Hostile strings over real sockets: nothing a client sends may stop the server or make it write
what a browser cannot parse (``server.py`` in a subprocess, so a crash would show as an exit).

Each case runs against the default store (SQLite), PostgreSQL and the trio backend: the faults it
guards against used to stop the whole process in each of them (a lone surrogate in a ``ref`` made
the ack's encoding raise in the store worker's callback; one in a history ``before`` made sqlite3
and psycopg raise outside ``StoreError``).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import websockets
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.servers import RunningServer, spawn_server
from tests.services import DATABASE_URL, drop_schema, postgres_schema, require
from tests.wire import Figure, RawClient, assert_still_serves, frame

SECRET = "input-hardening-secret-long-enough-for-hs256"


def strict_json(text: str | bytes) -> Any:
    """What a browser's JSON.parse accepts: no NaN, no Infinity, UTF-8 only."""

    def refuse(name: str) -> Any:
        raise AssertionError(f"the server wrote {name}, which is not JSON")

    if isinstance(text, bytes):
        text = text.decode("utf-8")
    text.encode("utf-8")  # a lone surrogate cannot have come off the wire, but be sure
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(params=["sqlite", "postgresql", "trio"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningServer]:
    """The server as a user starts it: the default SQLite store, PostgreSQL, or trio (with SQLite)."""
    flags = ["--store", f"sqlite:///{tmp_path / 'hubbub.db'}"]
    schema = None
    if request.param == "postgresql":
        url, schema = postgres_schema(require(DATABASE_URL, 5432, "PostgreSQL"))
        flags = ["--store", url]
    elif request.param == "trio":
        flags += ["--backend", "trio"]
    try:
        with spawn_server(*flags, env={"HUBBUB_STORE": flags[1]}) as running:
            yield running
            assert running.process.poll() is None, "the server exited:\n" + "".join(running.output)
            assert "Traceback" not in "".join(running.output), "".join(running.output)
    finally:
        if schema is not None:
            drop_schema(DATABASE_URL, schema)


POISON = {
    "lone surrogate in ref": '{"event":"message","text":"x","ref":"\\ud800"}',
    "lone low surrogate in text": '{"event":"message","text":"a\\udc00b","ref":1}',
    "lone surrogate in history before": '{"event":"history","limit":5,"before":"\\udbff"}',
    "NaN ref": '{"event":"message","text":"x","ref":NaN}',
    "Infinity ref": '{"event":"message","text":"x","ref":-Infinity}',
    "overflowing ref": '{"event":"message","text":"x","ref":1e999}',
    "surrogate as a key": '{"event":"message","text":"x","\\ud800":1}',
}


def test_poisoned_strings_are_refused_and_the_rest_of_the_write_is_served(server: RunningServer,
                                                                          figure: Figure) -> None:
    alice = RawClient(server.port, "/chat/poison?user=alice")
    bob = RawClient(server.port, "/chat/poison?user=bob")
    try:
        # every poisoned frame and one valid message in a single write: the valid one must still be
        # delivered, stored and acked (a fault used to drop the rest of the loop pass)
        frames = b"".join(frame(text.encode()) for text in POISON.values())
        alice.send(frames + frame(b'{"event":"message","text":"valid","ref":"ok"}'))
        replies = [strict_json(m) for m in alice.read_messages(len(POISON) + 1)]
        errors = [r for r in replies if r["event"] == "error"]
        acks = [r for r in replies if r["event"] == "ack"]
        assert [e["code"] for e in errors] == ["bad_json"] * len(POISON), replies
        assert [a["ref"] for a in acks] == ["ok"], replies
        delivered = [strict_json(m) for m in bob.read_messages(1)]
        assert [m["text"] for m in delivered] == ["valid"]
        bob.messages.clear()
        bob.send_text(json.dumps({"event": "history", "limit": 10}))
        [history] = [strict_json(m) for m in bob.read_messages(1)]
        assert [m["text"] for m in history["messages"]] == ["valid"]
        figure(f"{len(POISON)} poisoned frames: {len(errors)} bad_json errors; the valid one acked and stored")
    finally:
        alice.close()
        bob.close()
    assert_still_serves(server)


def test_a_valid_surrogate_pair_is_a_character(server: RunningServer) -> None:
    alice = RawClient(server.port, "/chat/pair?user=alice")
    bob = RawClient(server.port, "/chat/pair?user=bob")
    try:
        alice.send_text('{"event":"message","text":"\\ud83d\\ude00","ref":1}')
        [message] = [strict_json(m) for m in bob.read_messages(1)]
        assert message["text"] == "\U0001f600"
    finally:
        alice.close()
        bob.close()


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as refused:
        return refused.code


def handshake_status(url: str) -> int:
    try:
        with connect(url, open_timeout=5):
            return 101
    except InvalidStatus as refused:
        return refused.response.status_code


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("/chat/%FE", "invalid UTF-8 in a room name"),
        ("/chat/%C0", "an overlong-encoding lead byte"),
        ("/chat/a%0Ab", "a newline in a room name"),
        ("/chat/" + "r" * 201, "a room name over 200 bytes"),
        ("/chat?user=" + "u" * 257, "a user name over 256 bytes"),
        ("/chat?user=a%0Db", "a carriage return in a user name"),
        ("/chat?user=%FF", "invalid UTF-8 in a user name"),
    ],
)
def test_bad_names_are_refused_at_the_handshake(target: str, why: str, figure: Figure) -> None:
    with spawn_server() as running:
        status = handshake_status(running.url + target)
        assert status == 400, why
        figure(f"{why}: HTTP {status}")
        assert_still_serves(running)


def signed(**claims: Any) -> str:
    return jwt.encode(claims, SECRET, algorithm="HS256")


@pytest.mark.parametrize(
    ("claims", "why"),
    [
        ({"sub": "\ud800"}, "a lone surrogate in sub"),
        ({"sub": "a\nb"}, "a newline in sub"),
        ({"sub": "s" * 300}, "a sub over 256 bytes"),
        ({"sub": "alice", "exp": 10**400}, "exp of 10**400"),
        ({"sub": "alice", "exp": str(int(time.time()) + 600)}, "exp as a numeric string"),
        ({"sub": "alice", "exp": True}, "exp as a boolean"),
    ],
)
def test_hostile_token_claims_get_401_and_the_server_lives(claims: dict[str, Any], why: str,
                                                           figure: Figure) -> None:
    with spawn_server("--jwt-secret", SECRET) as running:
        status = handshake_status(f"{running.url}/chat?token={signed(**claims)}")
        assert status == 401, why
        figure(f"{why}: HTTP {status}")
        good = signed(sub="ok", exp=int(time.time()) + 600)
        assert_still_serves(running, query=f"&token={good}")
        assert running.process.poll() is None
        assert "Traceback" not in "".join(running.output)


def test_a_newline_in_a_close_reason_cannot_forge_a_log_line() -> None:
    with spawn_server("--log-level", "debug") as running:
        async def close_with_newline() -> None:
            async with websockets.connect(f"{running.url}/chat?user=x") as ws:
                await ws.close(1000, "bye\nINFO hubbub: forged line")

        import asyncio

        asyncio.run(close_with_newline())
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any("disconnected" in line for line in running.output):
            time.sleep(0.05)
        lines = "".join(running.output).splitlines()
        assert any("bye\\x0aINFO hubbub: forged line" in line for line in lines), lines
        assert not any(line.startswith("INFO hubbub: forged line") for line in lines)
