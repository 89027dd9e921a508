"""Hostile JSON into every event of every route (hypothesis), and failures injected into each of the
core's steps: whatever comes in, what goes out is strict JSON, the connection's state stays
consistent, and the server keeps serving everyone else.

Values are generated as JSON *text*, the way an attacker writes it: ``\\ud800`` escapes that decode
to lone surrogates, ``NaN``/``Infinity``, numbers that overflow (``1e999``) or have 5,000 digits,
nesting 10,000 deep, and every JSON type where a string was expected.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hubbub import core
from hubbub.server import ORJSON
from tests.hub import Hub

HOSTILE_SCALARS = [
    '"\\ud800"', '"a\\udc00b"', '"\\udbff\\u0041"', '"\\ud83d\\ude00"', "NaN", "-Infinity", "Infinity", "1e999",
    "-1e999", "1" * 5000, "123456789012345678901234567890", "-0", "0.0", "1e-400", "true", "null", '""',
    '"\\u0000"', '"\\n\\r\\u001b[31m"', '"' + "x" * 70_000 + '"', "[" * 10_000 + "]" * 10_000, "{}", "[]",
]


def json_text(value: Any) -> str:
    """Python's own JSON of a generated value (its strings may hold lone surrogates, written as escapes)."""
    return json.dumps(value)


scalars = st.one_of(
    st.sampled_from(HOSTILE_SCALARS),
    st.text(max_size=20).map(json_text),
    st.integers().map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(json_text),
    st.booleans().map(json_text),
    st.none().map(json_text),
)


def members(fields: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in fields) + "}"


values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda items: "[" + ",".join(items) + "]"),
        st.lists(st.tuples(st.sampled_from(["a", "\ud800", "text", ""]), inner), max_size=3).map(members),
    ),
    max_leaves=8,
)

hostile = st.one_of(st.sampled_from(HOSTILE_SCALARS), values)  # half of them from the list above

EVENTS = ["message", "history", "list", "join", "publish", "presence_update", "unknown", "", "\ud800"]
FIELDS = ["event", "text", "ref", "limit", "before", "after", "room", "data", "meta", "key", "since", "presence"]


TEMPLATES = [  # the events the routes handle, valid as they stand: the test replaces some fields
    {"event": '"message"', "text": '"hello"', "ref": "1"},
    {"event": '"history"', "limit": "5", "before": '"0"'},
    {"event": '"list"'},
    {"event": '"join"', "room": '"r"', "meta": '{"s":1}', "ref": "2"},  # /ws's
    {"event": '"publish"', "room": '"r"', "data": '{"x":[1,"y"]}', "key": '"k"', "ref": '"p"'},
    {"event": '"history"', "room": '"r"', "after": '"0"', "limit": "3"},
    {"event": '"presence"', "room": '"r"'},
    {"event": '"presence_update"', "room": '"r"', "meta": '{"typing":true}'},
    {"event": '"leave"', "room": '"r"'},
    {"event": '"refresh"', "token": '"t"'},
]


@st.composite
def events(draw: st.DrawFn) -> str:
    """One client message: a valid event with hostile values in some of its fields, or an object with a
    hostile event name and fields, or not an object at all."""
    shape = draw(st.sampled_from(["template", "template", "template", "object", "scalar", "broken"]))
    if shape == "template":
        fields = dict(draw(st.sampled_from(TEMPLATES)))
        for name in draw(st.lists(st.sampled_from([*fields, "text", "ref", "room", "meta"]), min_size=1, max_size=2)):
            fields[name] = draw(hostile)
        return members(list(fields.items()))
    if shape == "scalar":
        return draw(values)
    if shape == "broken":
        return draw(st.sampled_from(['{"event":', '{"event":"message","text":"x"', "\x00", "{'a':1}", ""]))
    fields = [("event", draw(st.one_of(st.sampled_from(EVENTS).map(json.dumps), values)))]
    for name in draw(st.lists(st.sampled_from(FIELDS[1:]), max_size=4, unique=True)):
        fields.append((name, draw(values)))
    return members(fields)


def strict(text: str) -> Any:
    """Parse as a browser would: NaN or Infinity are errors; ``text`` came off the wire as UTF-8."""

    def refuse(name: str) -> Any:
        raise AssertionError(f"non-JSON {name} in {text[:200]!r}")

    text.encode("utf-8")
    return json.loads(text, parse_constant=refuse)


@settings(max_examples=400, deadline=None)
@given(route=st.sampled_from(["/chat/r", "/chat/r", "/presence", "/echo", "/ws", "/ws"]),
       messages=st.lists(events(), min_size=1, max_size=8), codec=st.sampled_from([core.STDLIB_JSON, ORJSON]))
def test_hostile_json_into_every_event_of_every_route(route: str, messages: list[str], codec: core.Codec) -> None:
    hub = Hub(rate_limit=0, max_message_size=65536, codec=codec)
    victim = hub.join(f"{route}?user=mallory")
    witness = hub.join(f"{route}?user=witness")
    if route == "/ws":
        for peer in (victim, witness):
            peer.send_json({"event": "join", "room": "r", "meta": {"who": "me"}})
        hub.advance(0.1)
    for text in messages:
        if victim.closed_with is not None:
            break  # closed (1009 for an oversized one): the client sends nothing more
        victim.send_text(text)
    hub.advance(1.0)  # presence windows close, timers run
    for peer in (victim, witness):
        for message in peer.inbox:
            if route == "/echo":
                continue  # echo sends back what it got, as it got it: a text frame is valid UTF-8 by then
            assert isinstance(message, str), "a JSON route sent a binary frame"
            event = strict(message)
            assert isinstance(event, dict) and isinstance(event.get("event"), str), event
    # the connection's state is consistent: open unless closed for a reason the README lists
    conn = victim.conn
    if conn.state is core.State.OPEN:
        assert victim.closed_with is None
    else:
        assert victim.closed_with in (1009,), (victim.closed_with, conn.close_reason)
    assert not hub.server.metrics.failures, hub.server.metrics.failures
    for room in conn.rooms:  # membership is kept on both sides, and they agree
        assert conn in room.present
    for room in hub.server.rooms.values():
        assert all(room in member.rooms for member in room.present)
    # and the server serves a fresh pair in a fresh room
    a, b = hub.join("/chat/after?user=a"), hub.join("/chat/after?user=b")
    a.send_json({"event": "message", "text": "still here", "ref": 1})
    assert [m["text"] for m in b.json()] == ["still here"]
    assert [e["event"] for e in a.json()] == ["ack"]


# -- failures injected into each step: contained to the one connection or item ---------------------


def test_a_failing_timer_costs_only_its_own_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    hub = Hub(ping_interval=1.0)
    victim, other = hub.join("/chat?user=v"), hub.join("/chat?user=o")

    class BrokenKeepalive(core.Keepalive):
        def ping(self) -> bytes:
            raise RuntimeError("injected: the ping could not be built")

    monkeypatch.setattr(victim.conn, "_keepalive", BrokenKeepalive())
    hub.advance(1.1)
    assert victim.closed_with == 1011
    assert other.pings == 1 and other.closed_with is None  # its ping, due in the same tick, went out
    assert hub.server.metrics.failures == {"timer": 1}
    failure = next(e for e in hub.effects if isinstance(e, core.Failure))
    assert failure.where == "timer" and failure.conn_id == victim.conn.id


def test_a_failing_ack_costs_only_its_own_connection() -> None:
    hub = Hub(carry_out=False)
    one, two = hub.join("/chat?user=one"), hub.join("/chat?user=two")
    unencodable = object()  # what a bug upstream might hand back as a ref
    hub.server.ack([core.Ack(one.conn.id, unencodable, "id-1"), core.Ack(two.conn.id, "r2", "id-2")])
    hub.pump()
    assert one.closed_with == 1011
    assert two.json() == [{"event": "ack", "ref": "r2", "id": "id-2"}]
    assert hub.server.metrics.failures == {"ack": 1}


def test_a_broker_message_that_cannot_be_encoded_is_dropped_and_the_next_delivered() -> None:
    hub = Hub()
    member = hub.join("/chat/r?user=m")
    assert hub.server.deliver("r", {"event": "message", "text": float("nan"), "id": "a"}, node="n1") is None
    assert hub.server.deliver("r", {"event": "message", "text": "fine", "id": "b"}, node="n1") == 1
    hub.pump()
    assert [m["text"] for m in member.json()] == ["fine"]
    assert hub.server.metrics.failures == {"deliver": 1}


def test_a_malformed_remote_heartbeat_is_contained() -> None:
    hub = Hub()
    watcher = hub.join("/presence?user=w")
    hub.server.remote_presence("n1", {"presence": 5}, hub.now)  # type: ignore[dict-item]
    hub.server.remote_presence("n2", {"presence": ["bob"]}, hub.now)
    hub.advance(0.1)
    assert hub.server.presence("presence") == ["bob", "w"]
    assert hub.server.metrics.failures == {"presence": 1}
    assert watcher.closed_with is None


def test_a_failing_handler_leaves_the_rest_of_the_pass_done() -> None:
    hub = Hub()

    def explode(conn: core.Connection, event: dict) -> None:
        raise RuntimeError("injected")

    hub.server.router.add("/boom", core.Endpoint(events={"go": explode}, name="boom"))
    bomb = hub.join("/boom")
    alice, bob = hub.join("/chat?user=alice"), hub.join("/chat?user=bob")
    bomb.send_json({"event": "go"})
    alice.send_json({"event": "message", "text": "after the bomb", "ref": 1})
    assert bomb.closed_with == 1011
    assert [m["text"] for m in bob.json()] == ["after the bomb"]
    assert [e["event"] for e in alice.json()] == ["ack"]


def test_a_failing_effect_in_the_shell_leaves_the_others_done(backend: str) -> None:
    """Over a real socket: carrying out one effect raises (the store worker's history read, injected);
    the message sent in the same write is still stored and acked, and the server goes on."""
    from websockets.sync.client import connect

    from tests.conftest import start_in_process

    with contextmanager(start_in_process)(backend) as running:
        writer = running.shell.backends.writer
        real = writer.read
        calls = []

        def read_once_broken(*args: Any) -> None:
            calls.append(args)
            if len(calls) == 1:
                raise RuntimeError("injected: the history read failed")
            real(*args)

        writer.read = read_once_broken  # type: ignore[method-assign]
        with connect(f"{running.url}/chat/fx?user=a") as alice, connect(f"{running.url}/chat/fx?user=b") as bob:
            alice.send(json.dumps({"event": "history", "limit": 5}))  # its effect fails
            alice.send(json.dumps({"event": "message", "text": "m1", "ref": 1}))
            delivered = json.loads(bob.recv(timeout=5))
            assert json.loads(alice.recv(timeout=5)) == {"event": "ack", "ref": 1, "id": delivered["id"]}
            alice.send(json.dumps({"event": "history", "limit": 5}))  # the next read works
            assert [m["text"] for m in json.loads(alice.recv(timeout=5))["messages"]] == ["m1"]
        assert running.shell.backends.failures == 1 and len(calls) == 2
