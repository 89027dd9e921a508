"""The handshake, byte for byte: every refusal is a real HTTP response before any upgrade."""

from __future__ import annotations

import json

import pytest

from hubbub.core import State
from tests.hub import Hub, raw_exchange, upgrade_request


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def test_upgrade_answers_101_with_the_accept_token() -> None:
    conn, response = raw_exchange(Hub(), upgrade_request("/chat"))
    assert response.startswith(b"HTTP/1.1 101 ")
    # RFC 6455's own example key and accept value
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in response
    assert conn.state is State.OPEN


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (upgrade_request("/nope"), 404),
        (upgrade_request("/chat/a/b"), 404),
        (upgrade_request("/chat", Sec_WebSocket_Version="8"), 426),
        (upgrade_request("/chat", Sec_WebSocket_Key="short"), 400),
        (upgrade_request("/chat", Sec_WebSocket_Key="not base64!!"), 400),
        (upgrade_request("/chat", Connection="keep-alive"), 400),
        (upgrade_request("/chat", Origin="http://evil.example"), 403),
        (upgrade_request("/chat").replace(b"GET", b"POST", 1), 405),
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
        (b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        (b"GET /chat HTTP/1.1\r\nHost: x\r\n\r\n", 426),  # plain GET on a WebSocket route
    ],
)
def test_refusals_are_http_responses(request_bytes: bytes, status: int) -> None:
    conn, response = raw_exchange(Hub(), request_bytes)
    assert status_of(response) == status
    assert b"Connection: close" in response
    assert conn.closed and conn.status == status


def test_wrong_version_names_the_supported_one() -> None:
    _, response = raw_exchange(Hub(), upgrade_request("/chat", Sec_WebSocket_Version="8"))
    assert b"Sec-WebSocket-Version: 13" in response


def test_missing_key_is_400() -> None:
    request = upgrade_request("/chat").replace(b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", b"")
    _, response = raw_exchange(Hub(), request)
    assert status_of(response) == 400


def test_oversized_headers_are_431_and_buffering_stops() -> None:
    hub = Hub(max_header_bytes=4096)
    conn = hub.server.connect(peer=None, now=hub.now)
    hub.server.receive(conn, b"GET /chat HTTP/1.1\r\nHost: x\r\nX-Big: ", hub.now)
    for _ in range(10):
        hub.server.receive(conn, b"a" * 1000, hub.now)
    assert status_of(conn.data_to_send()) == 431
    assert conn.closed


def test_too_many_headers_are_431() -> None:
    extra = "".join(f"X-H{i}: v\r\n" for i in range(100))
    request = upgrade_request("/chat").replace(b"\r\n\r\n", ("\r\n" + extra + "\r\n").encode())
    _, response = raw_exchange(Hub(), request)
    assert status_of(response) == 431


@pytest.mark.parametrize(
    ("origin", "allowed", "status"),
    [
        (None, None, 101),  # not a browser
        ("http://localhost:8765", None, 101),  # same host
        ("http://evil.example", None, 403),
        ("http://localhost:9999", None, 403),  # same host name, other port: another origin
        ("https://app.example", ("https://app.example",), 101),
        ("http://localhost:8765", ("https://app.example",), 403),
        ("http://anything.example", ("*",), 101),
    ],
)
def test_origin_policy(origin: str | None, allowed: tuple[str, ...] | None, status: int) -> None:
    hub = Hub(allowed_origins=allowed)
    _, response = raw_exchange(hub, upgrade_request("/chat", Origin=origin))
    assert status_of(response) == status


def test_server_full_is_503_before_upgrade() -> None:
    hub = Hub(max_connections=2)
    hub.join("/chat?user=a")
    hub.join("/chat?user=b")
    _, response = raw_exchange(hub, upgrade_request("/chat"))
    assert status_of(response) == 503
    assert hub.server.open_count == 2


def test_healthz_reports_counts_not_content() -> None:
    hub = Hub()
    alice = hub.join("/chat/secret-room?user=alice")
    alice.send_json({"event": "message", "text": "the password is swordfish"})
    _, response = raw_exchange(hub, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(response) == 200
    head, body = response.split(b"\r\n\r\n", 1)
    assert b"application/json" in head
    stats = json.loads(body)
    assert stats["connections"] == 1 and stats["routes"] == {"chat": 1}
    assert b"swordfish" not in response and b"secret-room" not in response


def test_request_split_into_single_bytes_still_upgrades() -> None:
    hub = Hub()
    conn = hub.server.connect(peer=None, now=hub.now)
    for byte in upgrade_request("/echo"):
        hub.server.receive(conn, bytes([byte]), hub.now)
    assert conn.data_to_send().startswith(b"HTTP/1.1 101 ")


def test_frames_pipelined_behind_the_request_are_processed() -> None:
    hub = Hub()
    key = b"\x01\x02\x03\x04"
    masked_hello = bytes([0x81, 0x85]) + key + bytes(b ^ key[i % 4] for i, b in enumerate(b"hello"))
    _, response = raw_exchange(hub, upgrade_request("/echo") + masked_hello)
    assert response.endswith(b"\x81\x05hello")


def test_unfinished_handshake_is_dropped_after_the_timeout() -> None:
    hub = Hub(handshake_timeout=10)
    conn = hub.server.connect(peer=None, now=hub.now)
    hub.server.receive(conn, b"GET /chat HTTP/1.1\r\n", hub.now)
    hub.advance(9.9)
    assert conn.state is State.HANDSHAKE
    hub.advance(0.2)
    assert conn.closed and conn.data_to_send() == b""


def test_deflate_is_negotiated_with_server_no_context_takeover() -> None:
    request = upgrade_request("/chat", Sec_WebSocket_Extensions="permessage-deflate; client_max_window_bits")
    conn, response = raw_exchange(Hub(), request)
    assert b"Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover" in response
    assert conn.deflate_bits == 15


def test_deflate_is_not_negotiated_when_turned_off() -> None:
    request = upgrade_request("/chat", Sec_WebSocket_Extensions="permessage-deflate")
    conn, response = raw_exchange(Hub(compression=False), request)
    assert b"Sec-WebSocket-Extensions" not in response
    assert conn.deflate_bits is None
