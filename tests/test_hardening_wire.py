"""Hostile and broken clients against the real server (``server.py`` in a subprocess): each gets its
documented outcome, and the server still serves a fresh client afterwards. The server runs on the asyncio
backend; ``HUBBUB_BACKEND=trio pytest ...`` runs the same tests against the trio shell."""

from __future__ import annotations

import json
import selectors
import socket
import threading
import time
import zlib
from collections.abc import Iterator

import pytest

from tests.servers import RunningServer, spawn_server
from tests.wire import Figure, RawClient, RssWatch, assert_still_serves, frame, healthz, wait_for


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    """One server for the module (a 1 s handshake timeout keeps the slowloris cases short; every
    other limit at its default), shared because each case must leave it healthy anyway."""
    with spawn_server("--handshake-timeout", "1") as running:
        yield running


def raw_answer(port: int, data: bytes) -> bytes:
    """Send raw bytes, read until the server closes; everything it answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


def close_code_of(server: RunningServer, data: bytes, target: str = "/chat?user=mallory") -> int | None:
    """Open a connection, send ``data`` (the server may fail it before reading it all), return the close code."""
    client = RawClient(server.port, target)
    try:
        client.send(data)
    except (BrokenPipeError, ConnectionResetError):
        pass
    code = client.read_until_closed()
    client.close()
    return code


# -- handshake ---------------------------------------------------------------------------------

UPGRADE_HEAD = b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (UPGRADE_HEAD + b"Sec-WebSocket-Version: 13\r\n\r\n", 400),
        (UPGRADE_HEAD + b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 7\r\n\r\n", 426),
        (b"\x00\x01\x02\x03garbage\r\n\r\n", 400),
        (b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Filler: " + b"b" * 20_000 + b"\r\n\r\n", 431),
        (UPGRADE_HEAD + b"".join(b"X-H%d: v\r\n" % i for i in range(70)) + b"\r\n", 431),
    ],
    ids=["missing-key", "wrong-version", "garbage", "long-request-line", "huge-header", "too-many-headers"],
)
def test_bad_handshakes_get_their_status(server: RunningServer, figure: Figure, request_bytes: bytes,
                                         status: int) -> None:
    answer = raw_answer(server.port, request_bytes)
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer[:80]
    figure(f"HTTP {answer[9:12].decode()}")
    assert_still_serves(server)


def test_a_head_that_never_ends_is_refused_431_with_a_bounded_buffer(server: RunningServer, figure: Figure) -> None:
    """8 MiB of header lines with no blank line: the server answers 431 once the head passes
    --max-header-bytes (16 KiB) and never buffers the rest; its RSS does not follow what we send."""
    rss = RssWatch(server.process.pid)
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:

        def flood() -> None:
            nonlocal sent
            line = b"X-Filler: " + b"b" * 1000 + b"\r\n"
            try:
                sock.sendall(b"GET /chat HTTP/1.1\r\nHost: x\r\n")
                while sent < 8 * 1024 * 1024:
                    sock.sendall(line * 64)
                    sent += len(line) * 64
            except OSError:
                pass  # the server gave up on us: that is the point

        sender = threading.Thread(target=flood)
        sender.start()
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
        sender.join()
    rss.stop()
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:80]
    # an unbounded buffer would hold all of it (8 MiB); 2 MiB leaves room for allocator noise
    assert rss.peak_growth < 2 * 1024, rss
    figure(f"HTTP 431 while {sent // 1024} KiB were sent; {rss}")
    assert_still_serves(server)


def test_slowloris_is_dropped_after_the_handshake_timeout(server: RunningServer, figure: Figure) -> None:
    """One header byte every 0.1 s, never finishing: the 1 s handshake timeout counts from the connect,
    not from the last byte, so trickling does not keep the socket alive."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /chat HTTP/1.1\r\n")
        dropped_after = None
        for _ in range(50):  # 5 s of trickle at most, five times the timeout
            try:
                sock.sendall(b"X")
                if sock.recv(100, socket.MSG_DONTWAIT) == b"":  # the server's FIN
                    dropped_after = time.monotonic() - started
                    break
            except BlockingIOError:
                pass  # still open, nothing to read
            except OSError:  # a reset: dropped all the same
                dropped_after = time.monotonic() - started
                break
            time.sleep(0.1)
    assert dropped_after is not None, "still open after 5 s of trickle"
    figure(f"dropped {dropped_after:.2f} s after connecting (handshake timeout 1 s)")
    assert_still_serves(server)


def open_at_once(port: int, count: int) -> list[socket.socket]:
    """``count`` TCP connections started together (non-blocking connects), returned once all are up.
    They come from 127.0.0.2 (loopback too): the clients that must still be served meanwhile come from
    127.0.0.1, an address of their own, as they would in the wild (--max-connections-per-address)."""
    socks = []
    with selectors.DefaultSelector() as selector:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.2", 0))
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            selector.register(sock, selectors.EVENT_WRITE)
            socks.append(sock)
        pending = count
        while pending:
            ready = selector.select(timeout=10)
            assert ready, f"{pending} connects still pending after 10 s"
            for key, _ in ready:
                selector.unregister(key.fileobj)
                pending -= 1
    for sock in socks:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        sock.settimeout(10)
    return socks


def test_a_thousand_half_open_sockets_are_dropped_and_nobody_waits(server: RunningServer, figure: Figure) -> None:
    """1,000 connections that never send a byte: a fresh client is served meanwhile, and every one of
    them is dropped by the handshake timeout (the server's socket count returns to the /healthz probe)."""
    socks = open_at_once(server.port, 1000)
    opened = time.monotonic()
    try:
        assert_still_serves(server)  # served while 1,000 sockets sit idle
        assert wait_for(lambda: healthz(server)["sockets"] == 1)  # only the /healthz request itself
        all_gone = time.monotonic() - opened
        for sock in socks[:50]:
            assert sock.recv(10) == b""
    finally:
        for sock in socks:
            sock.close()
    figure(f"1,000 half-open sockets all dropped {all_gone:.2f} s after they opened (handshake timeout 1 s)")
    assert_still_serves(server)


# -- frames ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (frame(b'{"event":"list"}', masked=False), 1002),
        (frame(b"x", rsv=4), 1002),  # RSV1 without permessage-deflate
        (frame(b"x", rsv=2), 1002),
        (frame(b"x", rsv=1), 1002),
        (frame(b"x", opcode=0x3), 1002),
        (frame(b"x", opcode=0xB), 1002),
        (frame(b"x" * 126, opcode=0x9), 1002),
        (frame(b"x" * 126, opcode=0xA), 1002),
        (frame(b"\x03\xe8" + b"x" * 124, opcode=0x8), 1002),
        (frame(b"x", opcode=0x9, fin=False), 1002),
        (frame(b"x", opcode=0x0), 1002),  # a continuation with nothing to continue
        (frame(b"x", fin=False) + frame(b"y"), 1002),  # a new message inside a fragmented one
        (frame(b"x", opcode=0x8), 1002),  # close with a 1-byte payload
        (frame(b"\x03\xed", opcode=0x8), 1002),  # close code 1005 may not be sent
        (frame(b"\xff\xfe"), 1007),
        (frame(b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80"), 1007),
        (frame(b'{"event":"message","text":"\xce', fin=False) + frame(b'\x41"}', opcode=0x0), 1007),
        (frame(b"x" * 70_000), 1009),
        (b"".join(frame(b"y" * 20_000, opcode=0x1 if i == 0 else 0x0, fin=False) for i in range(4)), 1009),
        # 164 fragments of 400 bytes pass 64 KiB, before the rate limit (every fragment costs a token) would
        (b"".join(frame(b"z" * 400, opcode=0x1 if i == 0 else 0x0, fin=False) for i in range(180)), 1009),
        (frame(b"\x00\x01", opcode=0x2), 1003),
    ],
    ids=["unmasked", "rsv1", "rsv2", "rsv3", "reserved-opcode", "reserved-control-opcode", "big-ping", "big-pong",
         "big-close", "fragmented-ping", "orphan-continuation", "interleaved-message", "bad-close",
         "close-code-1005", "bad-utf8", "bad-utf8-surrogate", "bad-utf8-across-fragments", "too-big",
         "too-big-4-fragments", "too-big-180-fragments", "binary-on-json"],
)
def test_bad_frames_get_their_close_code(server: RunningServer, figure: Figure, data: bytes, code: int) -> None:
    got = close_code_of(server, data)
    assert got == code
    figure(f"close {got}")
    assert_still_serves(server)


def test_one_mebibyte_string_on_a_json_route_is_1009(server: RunningServer, figure: Figure) -> None:
    got = close_code_of(server, frame(json.dumps({"event": "message", "text": "z" * 1024 * 1024}).encode()))
    assert got == 1009
    figure(f"close {got}")
    assert_still_serves(server)


@pytest.fixture
def unlimited() -> Iterator[RunningServer]:
    """A server with the rate limit off: what bounds a flood then is the outbound queue alone."""
    with spawn_server("--rate-limit", "0") as running:
        yield running


def test_ping_flood_without_reading_the_pongs_is_closed_1013_and_bounded(unlimited: RunningServer,
                                                                         figure: Figure) -> None:
    """100,000 pings (12 MiB of pongs owed) from a client that reads nothing: the pongs count against
    its 1 MiB outbound queue, so it is closed 1013 and its backlog dropped rather than kept. (With the
    rate limit on, which counts pings too, the flood is closed 1008 long before: test_hardening_fairness.)"""
    server = unlimited
    pings = 100_000
    rss = RssWatch(server.process.pid)
    client = RawClient(server.port, "/chat?user=pinger")
    batch = frame(b"p" * 125, opcode=0x9) * 1000
    sent = 0
    try:
        while sent < pings:
            client.send(batch)
            sent += 1000
    except (BrokenPipeError, ConnectionResetError):
        pass
    code = client.read_until_closed()
    client.close()
    rss.stop()
    assert code == 1013
    assert client.pongs < sent // 2  # most of what it owed was dropped with the backlog
    # the queue is 1 MiB plus the transport's 256 KiB high-water mark; all 100,000 pongs would be 12 MiB
    assert rss.peak_growth < 6 * 1024, rss
    figure(f"{sent} pings sent, {client.pongs} pongs received, close {code}, {rss}")
    assert_still_serves(server)


def test_deflate_bomb_is_closed_1009_without_growing_memory(server: RunningServer, figure: Figure) -> None:
    """About 1 MiB on the wire that inflates to 1 GiB: the server stops inflating at the 64 KiB
    message limit, so its memory never sees the gigabyte."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    # a full flush makes each piece independent of what came before, so 1,024 copies are one valid stream
    piece = compressor.compress(b"\x00" * (1024 * 1024)) + compressor.flush(zlib.Z_FULL_FLUSH)
    bomb = (piece * 1024)[:-4]  # permessage-deflate drops the final 00 00 ff ff
    rss = RssWatch(server.process.pid)
    client = RawClient(server.port, "/chat?user=mallory",
                       headers={"Sec-WebSocket-Extensions": "permessage-deflate"})
    assert b"permessage-deflate" in client.response
    try:
        client.send(frame(bomb, opcode=0x1, rsv=4))
    except (BrokenPipeError, ConnectionResetError):
        pass
    code = client.read_until_closed()
    client.close()
    rss.stop()
    assert code == 1009
    assert rss.peak_growth < 10 * 1024, rss  # the bound: under 10 MB
    figure(f"{len(bomb) // 1024} KiB inflating to 1 GiB: close {code}, {rss}")
    assert_still_serves(server)


# -- application -------------------------------------------------------------------------------


def test_bad_events_are_error_events_and_the_connection_stays_open(server: RunningServer, figure: Figure) -> None:
    """Bad JSON, non-objects, missing or unknown events, wrong field types and 10,000-level nesting (arrays
    and objects, under the 64 KiB limit) each get their error event; the next good message is acked."""
    bad = [
        ("not json", "bad_json"),
        ("[1, 2]", "not_object"),
        ('"a string"', "not_object"),
        ('{"text": "x"}', "missing_event"),
        ('{"event": 5}', "missing_event"),
        ('{"event": "dance"}', "unknown_event"),
        ('{"event": "message", "text": 5}', "bad_field"),
        ('{"event": "message", "text": "x", "ref": [1]}', "bad_field"),
        ('{"event": "history", "limit": "ten"}', "bad_field"),
        ('{"event": "history", "before": 5}', "bad_field"),
        ("[" * 10_000 + "]" * 10_000, "bad_json"),
        ('{"a":' * 10_000 + "1" + "}" * 10_000, "bad_json"),
    ]
    listener = RawClient(server.port, "/chat/app?user=listener")
    client = RawClient(server.port, "/chat/app?user=mallory")
    for text, _ in bad:
        client.send_text(text)
    client.send_text(json.dumps({"event": "message", "text": "fine", "ref": 7}))
    replies = [json.loads(m) for m in client.read_messages(len(bad) + 1)]
    codes = [r.get("code") for r in replies[: len(bad)]]
    assert codes == [code for _, code in bad]
    assert replies[-1]["event"] == "ack" and replies[-1]["ref"] == 7  # the same connection still works
    assert [json.loads(m)["text"] for m in listener.read_messages(1)] == ["fine"]  # errors reach nobody else
    client.close()
    listener.close()
    figure(f"{len(bad)} bad events: {len(codes)} error events, the connection stayed open (next message acked)")
    assert_still_serves(server)


def test_message_flood_is_rate_limited_then_closed_1008(server: RunningServer, figure: Figure) -> None:
    """400 messages in one write at the default 100/s: a second's worth goes through, the next
    second's worth gets ``rate_limited`` and is dropped, then the connection is closed 1008."""
    listener = RawClient(server.port, "/chat/flood?user=listener")
    flooder = RawClient(server.port, "/chat/flood?user=flooder")
    flooder.send(b"".join(frame(json.dumps({"event": "message", "text": str(i)}).encode()) for i in range(400)))
    code = flooder.read_until_closed()
    flooder.close()
    limited = sum(1 for m in flooder.messages if json.loads(m).get("code") == "rate_limited")
    marker = RawClient(server.port, "/chat/flood?user=marker")
    marker.send_text(json.dumps({"event": "message", "text": "marker"}))
    texts: list[str] = []
    while "marker" not in texts:
        before = len(listener.messages)
        texts = [json.loads(m)["text"] for m in listener.read_messages(before + 1)]
        assert len(texts) > before, "the marker never arrived"
    delivered = len(texts) - 1
    marker.close()
    listener.close()
    assert code == 1008
    assert limited >= 1
    assert delivered < 400 and texts[:delivered] == [str(i) for i in range(delivered)]
    figure(f"400 sent: {delivered} delivered, {limited} rate_limited, close {code}")
    assert_still_serves(server)


# -- vanishing clients ---------------------------------------------------------------------------


def test_tcp_reset_mid_message_leaves_nothing_behind(server: RunningServer, figure: Figure) -> None:
    base = healthz(server)["connections"]
    client = RawClient(server.port, "/presence?user=vanisher")
    assert wait_for(lambda: healthz(server)["presence_users"] == 1)
    client.send(frame(b'{"event":"list"}' * 100)[:500])  # half a frame, then a reset
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    client.sock.close()

    def clean() -> bool:
        stats = healthz(server)
        return stats["connections"] == base and stats["presence_users"] == 0

    assert wait_for(clean), healthz(server)
    stats = healthz(server)
    figure(f"after the reset: connections {stats['connections']}, presence_users {stats['presence_users']}")
    assert_still_serves(server)


# -- known bug -----------------------------------------------------------------------------------


def test_bytes_after_a_protocol_error_in_the_closing_handshake_are_not_buffered(server: RunningServer,
                                                                               figure: Figure) -> None:
    """The server closes 1003 and waits for our close frame; we send 64 MiB of junk instead. The junk
    is a protocol violation: the server must fail the connection, or at least not keep what follows."""
    rss = RssWatch(server.process.pid)
    client = RawClient(server.port, "/chat?user=mallory")
    client.send(frame(b"\x00", opcode=0x2))
    junk = b"\xff" * (1024 * 1024)
    sent = 0
    try:
        while sent < 64 * len(junk):
            client.send(junk)
            sent += len(junk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    rss.stop()
    client.close()
    figure(f"{sent // len(junk)} MiB of junk after close 1003: {rss}")
    assert rss.peak_growth < 10 * 1024, rss
    assert_still_serves(server)
