"""Security over real sockets (``server.py`` in a subprocess): cross-site WebSocket hijacking is refused,
a token decides who you are and where you may talk, and the HTTP probes reveal no content."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import jwt
import pytest
import websockets
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from tests.servers import spawn_server
from tests.wire import Figure, assert_still_serves

SECRET = "hardening-secret-that-is-long-enough"


async def status_for(url: str, origin: str | None) -> int:
    try:
        async with websockets.connect(url, origin=origin):  # type: ignore[arg-type]
            return 101
    except InvalidStatus as refused:
        return refused.response.status_code


@pytest.mark.parametrize(
    ("flags", "origin", "status"),
    [
        ((), None, 101),
        ((), "http://evil.example", 403),
        ((), "http://127.0.0.1:{port}", 101),
        (("--allowed-origins", "https://app.example"), "https://app.example", 101),
        (("--allowed-origins", "https://app.example"), "http://127.0.0.1:{port}", 403),
        (("--allowed-origins", "https://app.example"), "https://evil.example", 403),
    ],
    ids=["no-origin", "cross-site", "same-origin", "allow-listed", "own-host-not-listed", "not-listed"],
)
def test_origin_policy_over_the_wire(figure: Figure, flags: tuple[str, ...], origin: str | None,
                                     status: int) -> None:
    with spawn_server(*flags) as server:
        origin = origin.format(port=server.port) if origin else None
        got = asyncio.run(status_for(f"{server.url}/chat?user=x", origin))
        assert got == status
        figure(f"HTTP {got}")
        assert_still_serves(server)


def token(user: str, rooms: list[str] | None = None) -> str:
    """An HS256 token for ``user``, valid for ten minutes, limited to ``rooms`` when given."""
    claims: dict[str, object] = {"sub": user, "exp": int(time.time()) + 600}
    if rooms is not None:
        claims["rooms"] = rooms
    return jwt.encode(claims, SECRET, algorithm="HS256")


def handshake_status(url: str) -> int:
    """101 if the handshake succeeds, else the HTTP status it was refused with."""
    try:
        with connect(url):
            return 101
    except InvalidStatus as refused:
        return refused.response.status_code


def recv_json(ws: ClientConnection) -> dict:
    return json.loads(ws.recv(timeout=10))


def test_user_param_is_ignored_when_jwt_is_on(figure: Figure) -> None:
    with spawn_server("--jwt-secret", SECRET) as server:
        with connect(f"{server.url}/chat/r?token={token('bob')}") as bob, \
                connect(f"{server.url}/chat/r?user=mallory&token={token('alice')}") as alice:
            alice.send(json.dumps({"event": "message", "text": "hi"}))
            shown_as = recv_json(bob)["user"]
        with connect(f"{server.url}/presence?user=mallory&token={token('alice')}") as presence:
            listed = recv_json(presence)["users"]
        without_token = handshake_status(f"{server.url}/chat/r?user=alice")
        assert_still_serves(server, query=f"&token={token('fresh')}")
    assert shown_as == "alice"
    assert listed == ["alice"]
    assert without_token == 401
    figure(f"?user=mallory with alice's token: shown as {shown_as!r}, presence {listed}; ?user= alone: "
           f"HTTP {without_token}")


def test_no_message_reaches_a_room_the_token_does_not_allow(figure: Figure) -> None:
    """Mallory's token allows ``ok-*`` only: she cannot join ``secret`` by name or by an encoded name,
    and naming it in a message from a room she may join sends nothing there."""
    with spawn_server("--jwt-secret", SECRET) as server:
        insider = token("insider", ["secret"])
        mallory = token("mallory", ["ok-*"])
        with connect(f"{server.url}/chat/secret?token={insider}") as listener:
            statuses = {target: handshake_status(f"{server.url}{target}?token={mallory}")
                        for target in ("/chat/secret", "/chat/%73ecret", "/chat/ok-1")}
            with connect(f"{server.url}/chat/ok-1?token={mallory}") as ws:
                ws.send(json.dumps({"event": "message", "room": "secret", "text": "leak", "ref": 1}))
                assert recv_json(ws)["event"] == "ack"  # accepted, for her own room
            with connect(f"{server.url}/chat/secret?token={token('colleague', ['secret'])}") as colleague:
                colleague.send(json.dumps({"event": "message", "text": "marker"}))
            first = recv_json(listener)  # the marker, with nothing from mallory before it
            listener.send(json.dumps({"event": "history", "limit": 100}))
            history = [m["text"] for m in recv_json(listener)["messages"]]
        assert_still_serves(server, query=f"&token={token('fresh')}")
    assert statuses == {"/chat/secret": 403, "/chat/%73ecret": 403, "/chat/ok-1": 101}
    assert first["text"] == "marker"
    assert history == ["marker"]
    figure(f"handshakes {statuses}; messages from mallory in 'secret': 0 live, 0 in history")


def test_metrics_and_healthz_reveal_no_message_content(figure: Figure) -> None:
    room, user, text = "room-7f3a9c", "user-7f3a9c", "text-7f3a9c"
    with spawn_server() as server:
        with connect(f"{server.url}/chat/{room}?user={user}") as ws, \
                connect(f"{server.url}/presence?user={user}"):
            ws.send(json.dumps({"event": "message", "text": text, "ref": 1}))
            assert recv_json(ws)["event"] == "ack"
            ws.send(json.dumps({"event": "history", "limit": 10}))
            assert recv_json(ws)["messages"][0]["text"] == text
            bodies = {path: urllib.request.urlopen(server.http + path, timeout=10).read().decode()
                      for path in ("/metrics", "/healthz")}
        assert_still_serves(server)
    leaks = {path: [s for s in (room, user, text) if s in body] for path, body in bodies.items()}
    assert leaks == {"/metrics": [], "/healthz": []}
    assert json.loads(bodies["/healthz"])["connections"] == 2  # it did see them: counts, not content
    figure(f"/metrics {len(bodies['/metrics'])} bytes, /healthz {len(bodies['/healthz'])} bytes: "
           f"0 occurrences of the room, user or text")
