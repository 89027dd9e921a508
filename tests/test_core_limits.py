"""Limits, all driven by the core: sizes, deflate bombs, slow consumers, rates, keepalive."""

from __future__ import annotations

import zlib

from wsproto.events import Message

from hubbub.core import State
from tests.hub import Hub


def test_message_over_the_limit_closes_1009() -> None:
    hub = Hub(max_message_size=1000)
    alice = hub.join("/chat?user=alice")
    alice.send_text('{"event":"message","text":"' + "x" * 1000 + '"}')
    assert alice.closed_with == 1009


def test_fragmented_message_is_counted_across_fragments() -> None:
    hub = Hub(max_message_size=1000)
    alice = hub.join("/chat?user=alice")
    for _ in range(5):
        if alice.closed_with is None:
            alice.feed(alice.client.send(Message(data="x" * 300, message_finished=False)))
    assert alice.closed_with == 1009


def test_echo_has_its_own_larger_limit() -> None:
    hub = Hub(max_message_size=1000, max_echo_message_size=100_000)
    echo = hub.join("/echo")
    echo.send_bytes(b"x" * 50_000)
    assert echo.inbox == [b"x" * 50_000]


def deflate_bomb(size: int) -> bytes:
    """A permessage-deflate payload that inflates to ``size`` zero bytes."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = b"\x00" * (1024 * 1024)
    data = b"".join(compressor.compress(chunk) for _ in range(size // len(chunk)))
    return (data + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]


def masked_frame(payload: bytes, opcode: int = 0x2, rsv1: bool = False) -> bytes:
    key = b"\x01\x02\x03\x04"
    first = 0x80 | opcode | (0x40 if rsv1 else 0)
    n = len(payload)
    if n < 126:
        header = bytes((first, 0x80 | n))
    elif n < 65536:
        header = bytes((first, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((first, 0x80 | 127)) + n.to_bytes(8, "big")
    return header + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def test_deflate_bomb_is_stopped_without_inflating_it() -> None:
    hub = Hub(max_echo_message_size=1024 * 1024)
    echo = hub.join("/echo", deflate=True)
    bomb = deflate_bomb(256 * 1024 * 1024)  # ~256 KiB on the wire
    assert len(bomb) < 300_000
    extension = echo.conn.frames._deflate  # the permessage-deflate extension both receive paths share
    frame = masked_frame(bomb, rsv1=True)
    for i in range(0, len(frame), 65536):
        if echo.conn.closed:
            break
        echo.feed(frame[i : i + 65536])
    assert echo.closed_with == 1009
    assert extension.inflated <= 1024 * 1024 + 1


def test_compressed_messages_within_the_limit_are_inflated() -> None:
    hub = Hub()
    echo = hub.join("/echo", deflate=True)
    echo.send_text("compress me " * 1000)
    assert echo.inbox == ["compress me " * 1000]


def test_slow_consumer_is_closed_1013_and_others_keep_receiving() -> None:
    hub = Hub(max_buffer=10_000, rate_limit=0)
    sender = hub.join("/chat?user=sender")
    fast = hub.join("/chat?user=fast")
    slow = hub.join("/chat?user=slow")
    stalled = []
    hub.peers.pop(slow.conn)  # the slow client stops reading: nothing is taken from its buffer

    def pump() -> None:
        for conn in hub.server.pending():
            if conn is slow.conn:
                stalled.append(conn)
                continue
            data = conn.data_to_send()
            if data:
                hub.peers[conn].take(data)

    hub.pump = pump  # type: ignore[method-assign]
    for i in range(200):
        sender.send_json({"event": "message", "text": f"{i:04d}" + "x" * 100})
    assert slow.conn.closed and slow.conn.close_code == 1013
    assert [m["text"][:4] for m in fast.json()] == [f"{i:04d}" for i in range(200)]
    assert slow.conn.outbound_size < 10_000  # its backlog was dropped, not kept


def test_rate_limit_warns_then_closes_1008() -> None:
    hub = Hub(rate_limit=10)
    alice, bob = hub.join("/chat?user=alice"), hub.join("/chat?user=bob")
    for i in range(10):
        alice.send_json({"event": "message", "text": str(i)})
    assert len(bob.json()) == 10
    alice.send_json({"event": "message", "text": "one too many"})
    assert [e["code"] for e in alice.json()] == ["rate_limited"]
    assert bob.json() == []
    for _ in range(10):
        alice.send_json({"event": "message", "text": "flood"})
    assert alice.closed_with == 1008
    assert bob.json() == []


def test_rate_limit_refills_over_time() -> None:
    hub = Hub(rate_limit=10)
    alice, bob = hub.join("/chat?user=alice"), hub.join("/chat?user=bob")
    for _ in range(5):
        for i in range(10):
            alice.send_json({"event": "message", "text": str(i)})
        hub.advance(1.0)
    assert len(bob.json()) == 50 and alice.json() == []


def test_keepalive_pings_and_pongs_keep_the_connection() -> None:
    hub = Hub(ping_interval=20, ping_timeout=10)
    alice = hub.join("/chat?user=alice")
    for _ in range(5):
        hub.advance(10)
    assert alice.pings == 2
    assert alice.conn.state is State.OPEN


def test_keepalive_timeout_closes_1011() -> None:
    hub = Hub(ping_interval=20, ping_timeout=10)
    alice = hub.join("/chat?user=alice")
    alice.answer_pings = False
    hub.advance(20)
    assert alice.pings == 1
    hub.advance(9.9)
    assert alice.conn.state is State.OPEN
    hub.advance(0.2)
    assert alice.conn.closed and alice.conn.close_code == 1011


def test_keepalive_timeout_fires_when_the_peer_stopped_reading() -> None:
    hub = Hub(ping_interval=5, ping_timeout=5, max_buffer=1_000_000, rate_limit=0)
    sender = hub.join("/chat?user=sender")
    silent = hub.join("/chat?user=silent")

    def pump() -> None:  # the silent client's socket is full: the shell takes nothing from it
        for conn in hub.server.pending():
            if conn is not silent.conn:
                data = conn.data_to_send()
                if data:
                    hub.peers[conn].take(data)

    hub.pump = pump  # type: ignore[method-assign]
    for _ in range(50):
        sender.send_json({"event": "message", "text": "x" * 1000})
    assert silent.conn.outbound_size > 50_000
    hub.advance(5)
    hub.advance(5.1)
    assert silent.conn.closed and silent.conn.close_code == 1011
    assert not sender.conn.closed


def test_server_initiated_close_waits_for_the_peer_then_gives_up() -> None:
    hub = Hub(close_timeout=5, rate_limit=1)
    alice = hub.join("/chat?user=alice")
    hub.peers.pop(alice.conn)
    hub.pump = lambda: [c.data_to_send() for c in hub.server.pending()]  # type: ignore[method-assign]
    for _ in range(3):
        alice.send_json({"event": "message", "text": "x"})
    assert alice.conn.state is State.CLOSING and alice.conn.close_code == 1008
    hub.advance(5.1)
    assert alice.conn.closed


def test_ping_flood_without_reading_is_bounded_by_the_buffer() -> None:
    from wsproto.events import Ping

    hub = Hub(max_buffer=10_000)
    flooder = hub.join("/chat?user=flooder")
    hub.peers.pop(flooder.conn)
    hub.pump = lambda: None  # type: ignore[method-assign]  # nobody reads the pongs
    for _ in range(2000):
        if flooder.conn.closed:
            break
        flooder.feed(flooder.client.send(Ping(b"x" * 100)))
    assert flooder.conn.closed and flooder.conn.close_code == 1013
    assert flooder.conn.outbound_size < 10_000
