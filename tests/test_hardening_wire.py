"""Hostile and broken clients against the real server: each gets its documented outcome,
and the server still serves a fresh client afterwards."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
import zlib
from collections.abc import Iterator

import pytest

from tests.servers import RunningServer, spawn_server
from tests.wire import RawClient, frame, rss_kib


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with spawn_server("--handshake-timeout", "1", "--max-message-size", "65536") as running:
        yield running


def healthz(server: RunningServer) -> dict:
    with urllib.request.urlopen(server.http + "/healthz", timeout=5) as response:
        return json.loads(response.read())


def assert_still_serves(server: RunningServer) -> None:
    a = RawClient(server.port, "/chat/after?user=a")
    b = RawClient(server.port, "/chat/after?user=b")
    a.send_text(json.dumps({"event": "message", "text": "still alive"}))
    assert json.loads(b.read_messages(1)[0])["text"] == "still alive"
    a.close()
    b.close()


def raw_answer(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
         b"Sec-WebSocket-Version: 13\r\n\r\n", 400),  # no key
        (b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
         b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 7\r\n\r\n", 426),
        (b"\x00\x01\x02\x03garbage\r\n\r\n", 400),
        (b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Filler: " + b"b" * 20_000 + b"\r\n\r\n", 431),
    ],
    ids=["missing-key", "wrong-version", "garbage", "long-request-line", "huge-header"],
)
def test_bad_handshakes_get_their_status(server: RunningServer, request_bytes: bytes, status: int) -> None:
    answer = raw_answer(server.port, request_bytes)
    assert answer.startswith(f"HTTP/1.1 {status} ".encode())
    assert_still_serves(server)


def test_slowloris_is_dropped_after_the_handshake_timeout(server: RunningServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /chat HTTP/1.1\r\n")
        started = time.monotonic()
        for _ in range(20):  # one header byte at a time, never finishing
            try:
                sock.sendall(b"X")
            except OSError:
                break
            time.sleep(0.1)
        sock.settimeout(10)
        assert sock.recv(100) == b""
        assert time.monotonic() - started < 8  # dropped by the 1 s timeout, not by our give-up


def test_a_thousand_half_open_sockets_are_dropped_and_nobody_waits(server: RunningServer) -> None:
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(1000)]
    try:
        assert_still_serves(server)  # served while 1,000 sockets sit idle
        time.sleep(1.5)
        for sock in socks[:50]:
            assert sock.recv(10) == b""
        deadline = time.monotonic() + 10
        while healthz(server)["sockets"] > 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert healthz(server)["sockets"] == 1  # only the /healthz request itself
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (frame(b'{"event":"list"}', masked=False), 1002),
        (frame(b"x", rsv=2), 1002),
        (frame(b"x", opcode=0x3), 1002),
        (frame(b"x" * 126, opcode=0x9), 1002),  # ping over 125 bytes
        (frame(b"x", opcode=0x8) , 1002),  # close with a 1-byte payload
        (frame(b"\xff\xfe"), 1007),
        (frame(b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80"), 1007),
        (frame(b"x" * 70_000), 1009),
        (b"".join(frame(b"y" * 20_000, opcode=0x1 if i == 0 else 0x0, fin=False) for i in range(4)), 1009),
        (frame(b"\x00\x01", opcode=0x2), 1003),
    ],
    ids=["unmasked", "rsv-bits", "reserved-opcode", "big-control", "bad-close", "bad-utf8", "bad-utf8-surrogate",
         "too-big", "too-big-fragmented", "binary-on-json"],
)
def test_bad_frames_get_their_close_code(server: RunningServer, data: bytes, code: int) -> None:
    client = RawClient(server.port, "/chat?user=mallory")
    client.send(data)
    assert client.read_until_closed() == code
    client.close()
    assert_still_serves(server)


def test_one_mebibyte_string_on_a_json_route_is_1009(server: RunningServer) -> None:
    client = RawClient(server.port, "/chat?user=mallory")
    try:
        client.send(frame(json.dumps({"event": "message", "text": "z" * 1024 * 1024}).encode()))
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server may close before it has read everything
    assert client.read_until_closed() == 1009
    assert_still_serves(server)


def test_deeply_nested_json_is_an_error_event_not_a_crash(server: RunningServer) -> None:
    client = RawClient(server.port, "/chat?user=mallory")
    client.send_text("[" * 10_000 + "]" * 10_000)
    client.send_text(json.dumps({"event": "message", "text": 5}))
    replies = [json.loads(m) for m in client.read_messages(2)]
    assert [r["code"] for r in replies] == ["bad_json", "bad_field"]
    client.close()


def test_deflate_bomb_is_closed_1009_without_growing_memory(server: RunningServer) -> None:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros = b"\x00" * (1024 * 1024)
    bomb = b"".join(compressor.compress(zeros) for _ in range(1024))  # 1 GiB inflated
    bomb = (bomb + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]
    before = rss_kib(server.process.pid)
    client = RawClient(server.port, "/chat?user=mallory",
                       headers={"Sec-WebSocket-Extensions": "permessage-deflate"})
    assert b"permessage-deflate" in client.response
    try:
        client.send(frame(bomb, opcode=0x1, rsv=4))
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert client.read_until_closed() == 1009
    growth_kib = rss_kib(server.process.pid) - before
    assert growth_kib < 10 * 1024, f"RSS grew by {growth_kib} KiB"
    assert_still_serves(server)


def test_tcp_reset_mid_message_leaves_nothing_behind(server: RunningServer) -> None:
    base = healthz(server)["connections"]
    client = RawClient(server.port, "/presence?user=vanisher")
    client.send(frame(b'{"event":"list"}' * 100)[:500])  # half a frame, then a reset
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    client.sock.close()
    deadline = time.monotonic() + 5
    while (healthz(server)["connections"] != base or healthz(server)["presence_users"]) and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    assert healthz(server)["connections"] == base and healthz(server)["presence_users"] == 0
    assert_still_serves(server)
