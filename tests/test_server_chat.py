"""The real server over real sockets with the websockets client, on both anyio backends."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.request

import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.conftest import InProcessServer


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_bob_receives_alice_and_alice_only_her_ack(hubbub: InProcessServer) -> None:
    async def scenario() -> None:
        async with websockets.connect(hubbub.url + "/chat?user=alice") as alice, \
                websockets.connect(hubbub.url + "/chat?user=bob") as bob:
            await alice.send(json.dumps({"event": "message", "text": "hi bob", "ref": "r1"}))
            message = json.loads(await bob.recv())
            assert {k: message[k] for k in ("event", "room", "user", "text")} == {
                "event": "message", "room": "lobby", "user": "alice", "text": "hi bob"}
            assert isinstance(message["id"], str) and isinstance(message["ts"], int)
            assert json.loads(await alice.recv()) == {"event": "ack", "ref": "r1", "id": message["id"]}
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(alice.recv(), 0.2)

    run(scenario())


def test_rooms_are_separate_over_the_wire(hubbub: InProcessServer) -> None:
    async def scenario() -> None:
        async with websockets.connect(hubbub.url + "/chat/red?user=a") as red1, \
                websockets.connect(hubbub.url + "/chat/red?user=b") as red2, \
                websockets.connect(hubbub.url + "/chat/blue?user=c") as blue:
            await red1.send(json.dumps({"event": "message", "text": "red only"}))
            assert json.loads(await red2.recv())["text"] == "red only"
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(blue.recv(), 0.2)

    run(scenario())


def test_unknown_path_is_refused_with_404(hubbub: InProcessServer) -> None:
    async def scenario() -> None:
        with pytest.raises(InvalidStatus) as refused:
            async with websockets.connect(hubbub.url + "/nope"):
                pass
        assert refused.value.response.status_code == 404

    run(scenario())


def test_presence_over_the_wire(hubbub: InProcessServer) -> None:
    async def scenario() -> None:
        async with websockets.connect(hubbub.url + "/presence?user=alice") as alice:
            assert json.loads(await alice.recv()) == {"event": "presence_state", "users": ["alice"]}
            async with websockets.connect(hubbub.url + "/presence?user=bob") as bob:
                assert json.loads(await bob.recv()) == {"event": "presence_state", "users": ["alice", "bob"]}
                assert json.loads(await alice.recv()) == {"event": "presence_diff", "joins": ["bob"], "leaves": []}
            assert json.loads(await alice.recv()) == {"event": "presence_diff", "joins": [], "leaves": ["bob"]}

    run(scenario())


def test_history_returns_what_was_said(hubbub: InProcessServer) -> None:
    async def scenario() -> None:
        async with websockets.connect(hubbub.url + "/chat/h?user=alice") as alice:
            for i in range(3):
                await alice.send(json.dumps({"event": "message", "text": f"m{i}", "ref": i}))
                await alice.recv()
            await alice.send(json.dumps({"event": "history", "limit": 2}))
            reply = json.loads(await alice.recv())
            assert reply["event"] == "history" and [m["text"] for m in reply["messages"]] == ["m1", "m2"]

    run(scenario())


def test_echo_with_compression_and_large_messages(hubbub: InProcessServer) -> None:
    async def scenario() -> None:
        async with websockets.connect(hubbub.url + "/echo", max_size=None) as echo:
            assert echo.response.headers.get("Sec-WebSocket-Extensions", "").startswith("permessage-deflate")
            big = "hubbub " * 200_000
            await echo.send(big)
            assert await echo.recv() == big
            await echo.send(b"\x00\xff" * 1000)
            assert await echo.recv() == b"\x00\xff" * 1000

    run(scenario())


def test_bad_json_gets_an_error_and_the_connection_stays(hubbub: InProcessServer) -> None:
    async def scenario() -> None:
        async with websockets.connect(hubbub.url + "/chat?user=a") as conn:
            await conn.send("{oops")
            assert json.loads(await conn.recv())["code"] == "bad_json"
            await conn.send(b"binary")
            with pytest.raises(ConnectionClosed) as closed:
                await conn.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1003

    run(scenario())


def test_healthz_and_garbage_over_raw_sockets(hubbub: InProcessServer) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{hubbub.port}/healthz", timeout=5) as response:
        assert response.status == 200 and json.loads(response.read())["status"] == "ok"
    with socket.create_connection(("127.0.0.1", hubbub.port), timeout=5) as raw:
        raw.sendall(b"\x16\x03\x01\x02\x00garbage that is not HTTP\r\n\r\n")
        answer = raw.recv(4096)
        assert answer.startswith(b"HTTP/1.1 400 ")
        assert raw.recv(4096) == b""  # and the server closed the connection


def test_many_clients_each_receive_every_message(hubbub: InProcessServer) -> None:
    async def scenario() -> None:
        clients = [await websockets.connect(hubbub.url + f"/chat/many?user=u{i}") for i in range(50)]
        try:
            sender = clients[0]
            for i in range(40):
                await sender.send(json.dumps({"event": "message", "text": str(i)}))
            for client in clients[1:]:
                texts = [json.loads(await client.recv())["text"] for _ in range(40)]
                assert texts == [str(i) for i in range(40)]
        finally:
            for client in clients:
                await client.close()

    run(scenario())
