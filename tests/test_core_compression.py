"""permessage-deflate in the core: what goes out inflates back to what was sent, at any level."""

from __future__ import annotations

import json
import zlib

import pytest

from hubbub import core
from tests.hub import Hub

TEXT = json.dumps([{"user": f"user{i}", "text": "hello " * (i % 7), "id": i} for i in range(2000)])


def inflate(frame: bytes) -> bytes:
    """The payload of one final, unmasked, compressed server frame."""
    assert frame[0] & 0x40, "RSV1 (compressed) is set"
    length = frame[1] & 0x7F
    start = 2 if length < 126 else 4 if length == 126 else 10
    return zlib.decompressobj(-15).decompress(frame[start:] + b"\x00\x00\xff\xff")


@pytest.mark.parametrize("level", [1, 6, 9])
def test_compression_level_round_trips(level: int) -> None:
    message = core.OutboundMessage(1, TEXT.encode(), 0, level)
    assert inflate(message.frame_for(15)) == TEXT.encode()


def test_a_lower_level_trades_bytes_for_speed() -> None:
    fast = core.OutboundMessage(1, TEXT.encode(), 0, 1).frame_for(15)
    small = core.OutboundMessage(1, TEXT.encode(), 0, 9).frame_for(15)
    assert len(small) < len(fast) < len(TEXT)


@pytest.mark.parametrize("level", [1, 9])
def test_echo_over_deflate_at_any_level(level: int) -> None:
    hub = Hub(compression_level=level, compression_min_size=0)
    peer = hub.join("/echo", deflate=True)
    assert peer.accepted and peer.conn.deflate_bits is not None
    peer.send_text(TEXT)
    peer.send_bytes(b"\x00\x01" * 10)
    assert peer.inbox == [TEXT, b"\x00\x01" * 10]
