"""Chat rooms through the core: fan-out to others, acks, history requests, error events."""

from __future__ import annotations

import pytest

from hubbub.core import History, Stored
from tests.hub import Hub


def test_message_reaches_others_not_sender() -> None:
    hub = Hub()
    alice, bob = hub.join("/chat?user=alice"), hub.join("/chat?user=bob")
    alice.send_json({"event": "message", "text": "hi", "ref": 1})
    [message] = bob.json()
    assert message["event"] == "message"
    assert (message["room"], message["user"], message["text"]) == ("lobby", "alice", "hi")
    assert message["ts"] == int(hub.now * 1000)
    assert alice.json() == [{"event": "ack", "ref": 1, "id": message["id"]}]


def test_no_ack_without_ref() -> None:
    hub = Hub()
    alice, bob = hub.join("/chat?user=alice"), hub.join("/chat?user=bob")
    alice.send_json({"event": "message", "text": "hi"})
    assert alice.json() == []
    assert len(bob.json()) == 1


def test_rooms_are_separate() -> None:
    hub = Hub()
    a1, a2 = hub.join("/chat/a?user=1"), hub.join("/chat/a?user=2")
    b1 = hub.join("/chat/b?user=3")
    lobby = hub.join("/chat?user=4")
    a1.send_json({"event": "message", "text": "for a"})
    assert [m["text"] for m in a2.json()] == ["for a"]
    assert b1.json() == [] and lobby.json() == []


def test_room_names_are_url_decoded() -> None:
    hub = Hub()
    one, two = hub.join("/chat/caf%C3%A9?user=1"), hub.join("/chat/caf%C3%A9?user=2")
    one.send_json({"event": "message", "text": "x"})
    assert two.json()[0]["room"] == "café"


def test_ids_are_unique_and_time_ordered() -> None:
    hub = Hub()
    alice, bob = hub.join("/chat?user=alice"), hub.join("/chat?user=bob")
    for i in range(5):
        alice.send_json({"event": "message", "text": str(i)})
        hub.now += 0.0004
    ids = [m["id"] for m in bob.json()]
    assert len(set(ids)) == 5 and ids == sorted(ids)


def test_every_message_is_handed_to_the_store() -> None:
    hub = Hub(carry_out=False)
    alice = hub.join("/chat/r?user=alice")
    alice.send_json({"event": "message", "text": "keep me"})
    [effect] = [e for e in hub.server.effects() if isinstance(e, Stored)]
    assert isinstance(effect, Stored) and effect.room == "r" and effect.message["text"] == "keep me"


def test_history_request_becomes_an_effect_and_the_reply_reaches_the_client() -> None:
    hub = Hub(history_max=20, carry_out=False)
    alice = hub.join("/chat/r?user=alice")
    alice.send_json({"event": "history", "limit": 500, "before": "abc"})
    [effect] = hub.server.effects()
    assert effect == History(alice.conn.id, "r", 20, "abc")
    hub.server.history_reply(effect.conn_id, "r", [{"id": "1"}])
    hub.pump()
    assert alice.json() == [{"event": "history", "room": "r", "messages": [{"id": "1"}]}]


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("{not json", "bad_json"),
        ("[" * 100_000 + "]" * 100_000, "bad_json"),
        ("[1, 2]", "not_object"),
        ('"message"', "not_object"),
        ("{}", "missing_event"),
        ('{"event": 7}', "missing_event"),
        ('{"event": "dance"}', "unknown_event"),
        ('{"event": "message"}', "bad_field"),
        ('{"event": "message", "text": 5}', "bad_field"),
        ('{"event": "message", "text": "x", "ref": {"a": 1}}', "bad_field"),
        ('{"event": "history", "limit": "ten"}', "bad_field"),
        ('{"event": "history", "limit": 0}', "bad_field"),
        ('{"event": "history", "before": 5}', "bad_field"),
    ],
)
def test_bad_events_get_an_error_and_the_connection_stays_open(text: str, code: str) -> None:
    hub = Hub(max_message_size=1024 * 1024)
    alice, bob = hub.join("/chat?user=alice"), hub.join("/chat?user=bob")
    alice.send_text(text)
    [error] = alice.json()
    assert error["event"] == "error" and error["code"] == code and error["detail"]
    alice.send_json({"event": "message", "text": "still here"})
    assert [m["text"] for m in bob.json()] == ["still here"]


def test_binary_on_a_json_route_closes_1003() -> None:
    hub = Hub()
    alice = hub.join("/chat?user=alice")
    alice.send_bytes(b"\x00\x01")
    assert alice.closed_with == 1003


def test_a_failing_handler_closes_1011_and_is_reported() -> None:
    from hubbub import core

    def explode(conn: core.Connection, event: dict) -> None:
        raise RuntimeError("bug")

    hub = Hub(carry_out=False)
    hub.server.router.add("/boom", core.Endpoint(events={"go": explode}, name="boom"))
    peer = hub.join("/boom")
    peer.send_json({"event": "go"})
    assert peer.closed_with == 1011
    [effect] = hub.server.effects()
    assert isinstance(effect, core.Failure) and str(effect.error) == "bug"


def test_echo_returns_text_and_binary_as_sent() -> None:
    hub = Hub()
    echo = hub.join("/echo")
    echo.send_text("héllo")
    echo.send_bytes(b"\xff\x00")
    assert echo.inbox == ["héllo", b"\xff\x00"]


def test_two_servers_in_one_process_never_meet() -> None:
    one, two = Hub(), Hub()
    a = one.join("/chat?user=a")
    one.join("/chat?user=b")
    c = two.join("/chat?user=c")
    a.send_json({"event": "message", "text": "only on one"})
    assert c.json() == []
    assert one.server.open_count == 2 and two.server.open_count == 1
