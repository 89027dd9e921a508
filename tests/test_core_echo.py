"""/echo in the core: messages come back as they were, whatever their size up to the route's limit."""

from __future__ import annotations

from wsproto.events import Message

from tests.hub import Hub


def test_echo_returns_a_message_larger_than_max_buffer() -> None:
    hub = Hub(max_buffer=64 * 1024, max_echo_message_size=1024 * 1024)
    peer = hub.join("/echo")
    payload = bytes(range(256)) * 1024  # 256 KiB: four times max_buffer, well under the echo limit
    peer.send_bytes(payload)
    peer.send_text("é" * 100_000)
    assert peer.inbox == [payload, "é" * 100_000]
    assert peer.closed_with is None


def test_echo_client_that_does_not_read_is_still_a_slow_consumer() -> None:
    hub = Hub(max_buffer=64 * 1024, max_echo_message_size=128 * 1024)
    peer = hub.join("/echo")
    frame = peer.client.send(Message(data=b"x" * 100_000))
    for _ in range(3):  # the shell never takes the echoes: the backlog passes 64 KiB + 128 KiB
        hub.server.receive(peer.conn, frame, hub.now)
    hub.pump()
    assert peer.closed_with == 1013
    assert peer.inbox == []
