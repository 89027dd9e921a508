"""The per-message size limit counts message payload only: control frames are not part of it."""

from __future__ import annotations

import pytest
from wsproto.events import CloseConnection, Message, Ping

from tests.hub import Hub

LIMIT = 1000


@pytest.fixture
def hub() -> Hub:
    return Hub(max_echo_message_size=LIMIT)


def test_close_after_a_message_of_exactly_the_limit_is_answered_with_1000(hub: Hub) -> None:
    peer = hub.join("/echo")
    peer.send_bytes(b"x" * LIMIT)
    peer.feed(peer.client.send(CloseConnection(1000)))
    assert peer.inbox == [b"x" * LIMIT]
    assert peer.closed_with == 1000
    assert peer.conn.close_code == 1000


def test_ping_between_fragments_does_not_count_towards_the_message(hub: Hub) -> None:
    peer = hub.join("/echo")
    peer.feed(peer.client.send(Message(data=b"a" * 600, message_finished=False)))
    peer.feed(peer.client.send(Ping(b"p" * 100)))
    peer.feed(peer.client.send(Message(data=b"b" * 400, message_finished=True)))
    assert peer.inbox == [b"a" * 600 + b"b" * 400]
    assert peer.closed_with is None


def test_one_byte_over_the_limit_is_still_1009(hub: Hub) -> None:
    peer = hub.join("/echo")
    peer.feed(peer.client.send(Message(data=b"a" * 600, message_finished=False)))
    peer.feed(peer.client.send(Message(data=b"b" * 401, message_finished=True)))
    assert peer.inbox == []
    assert peer.closed_with == 1009
