"""One order per room across instances (PROTOCOL.md §3): with Redis, every member of a room on every
instance receives the room's messages in the same order, and the ids follow it.

Real ``server.py`` processes on the real Redis (or a private redis-server the test may cut), real
clients on ``/ws``; senders on both instances publish at once, so without sequencing by the broker
the two instances would see their messages interleaved differently.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import ClientConnection, connect

from tests.servers import RunningServer, spawn_server
from tests.services import REDIS_URL, private_redis, recv_json, require, unique

FAST = ("--presence-heartbeat", "0.3", "--presence-ttl", "1.5", "--rate-limit", "0")


@contextmanager
def two_instances(broker: str, *extra: str) -> Iterator[tuple[RunningServer, RunningServer]]:
    channel = unique("order")
    with ExitStack() as stack:
        a, b = (stack.enter_context(spawn_server("--broker", broker, "--broker-channel", channel, *FAST, *extra))
                for _ in range(2))
        yield a, b


def member(stack: ExitStack, server: RunningServer, room: str, user: str, **join: Any) -> ClientConnection:
    """A ``/ws`` client of ``server`` joining ``room`` (closed with ``stack``). Its queue is unbounded: one
    that stops reading the socket while it sends cannot close quickly."""
    ws = stack.enter_context(connect(f"{server.url}/ws?user={user}", max_queue=None))
    ws.send(json.dumps({"event": "join", "room": room, "presence": False, **join}))
    return ws


def joined(ws: ClientConnection) -> dict[str, Any]:
    while (event := recv_json(ws))["event"] != "joined":
        pass
    return event


def messages(ws: ClientConnection, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
    """The next ``count`` message events ``ws`` receives (other events skipped)."""
    got: list[dict[str, Any]] = []
    while len(got) < count:
        event = recv_json(ws, timeout)
        if event["event"] == "message":
            got.append(event)
    return got


def publish_all(ws: ClientConnection, room: str, name: str, count: int, acks: dict[str, str],
                pause: float = 0.0) -> None:
    """``count`` publishes from ``ws`` as fast as it can send them, then every ack: ``acks`` maps the
    published data to the id its ack carried."""
    for i in range(count):
        ws.send(json.dumps({"event": "publish", "room": room, "data": f"{name}-{i}", "ref": i}))
        if pause:
            time.sleep(pause)
    got = 0
    while got < count:
        event = recv_json(ws, 30)
        if event["event"] == "ack":
            acks[f"{name}-{event['ref']}"] = event["id"]
            got += 1


def wait_until_both_hear(a_ws: ClientConnection, b_ws: ClientConnection, via: ClientConnection, room: str,
                         *others: ClientConnection) -> None:
    """Publish probes from ``via`` until a member on each instance got one: both are subscribed (what the
    probes left behind is read, from ``others`` too)."""
    deadline = time.monotonic() + 10
    for i in range(1000):
        via.send(json.dumps({"event": "publish", "room": room, "data": f"probe-{i}"}))
        try:
            for ws in (a_ws, b_ws):
                while recv_json(ws, 0.3)["event"] != "message":
                    pass
            break
        except TimeoutError:
            assert time.monotonic() < deadline, "the instances never heard each other"
    time.sleep(0.3)
    for ws in (a_ws, b_ws, via, *others):
        try:
            while True:
                recv_json(ws, 0.2)
        except TimeoutError:
            pass


def concurrently(*calls: Any) -> None:
    threads = [threading.Thread(target=fn, args=args) for fn, *args in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)


def run_senders(servers: list[RunningServer], room: str, per_sender: int, pause: float = 0.0,
                each: int = 3) -> dict[str, str]:
    """``each`` senders on each server, publishing at once; returns data -> acked id."""
    acks: dict[str, str] = {}
    with ExitStack() as stack:
        senders = [member(stack, server, room, f"s{n}{i}") for n, server in enumerate(servers) for i in range(each)]
        for ws in senders:
            joined(ws)
        concurrently(*[(publish_all, ws, room, f"s{n}", per_sender, acks, pause) for n, ws in enumerate(senders)])
    return acks


def read_while(watchers: list[ClientConnection], count: int, action: Any, *args: Any) -> tuple[Any, list[Any]]:
    """Run ``action(*args)`` while every watcher reads its next ``count`` messages (a client that stops
    reading stops answering pings): (what ``action`` returned, what each watcher read)."""
    seen: list[list[dict[str, Any]]] = [[] for _ in watchers]

    def read(n: int) -> None:
        seen[n] = messages(watchers[n], count)

    readers = [threading.Thread(target=read, args=(n,)) for n in range(len(watchers))]
    for reader in readers:
        reader.start()
    result = action(*args)
    for reader in readers:
        reader.join(60)
    assert not any(reader.is_alive() for reader in readers)
    return result, seen


def assert_one_order(seen: list[list[dict[str, Any]]], acks: dict[str, str]) -> None:
    """Every member saw the same messages in the same order, ids strictly increasing, each acked id."""
    first = [(m["id"], m["data"]) for m in seen[0]]
    for other in seen[1:]:
        assert [(m["id"], m["data"]) for m in other] == first
    ids = [message_id for message_id, _ in first]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert {data: message_id for message_id, data in first} == acks


def test_every_member_on_every_instance_gets_a_room_in_one_order() -> None:
    redis = require(REDIS_URL, 6379, "Redis")
    room = unique("room")
    with two_instances(redis) as (a, b), ExitStack() as stack:
        watchers = [member(stack, a, room, "wa"), member(stack, a, room, "wa2"), member(stack, b, room, "wb"),
                    member(stack, b, room, "wb2")]
        for ws in watchers:
            joined(ws)
        probe = member(stack, b, room, "probe")
        joined(probe)
        wait_until_both_hear(watchers[0], watchers[2], probe, room, *watchers)
        acks, seen = read_while(watchers, 600, run_senders, [a, b], room, 100)
        assert_one_order(seen, acks)


def test_a_member_cut_off_on_one_instance_recovers_exactly_on_the_other() -> None:
    """The issue's "done when": cut off on A while 500 messages are published on A and B, it rejoins on B
    with ``since`` and gets exactly those 500, in the order the members that stayed saw them, then live
    ones, no duplicate, ``recovered: true``."""
    redis = require(REDIS_URL, 6379, "Redis")
    room = unique("room")
    with two_instances(redis) as (a, b), ExitStack() as stack:
        stay_a, stay_b = member(stack, a, room, "stay_a"), member(stack, b, room, "stay_b")
        away = member(stack, a, room, "away")
        for ws in (stay_a, stay_b, away):
            joined(ws)
        wait_until_both_hear(stay_a, stay_b, away, room)
        stay_b.send(json.dumps({"event": "publish", "room": room, "data": "before"}))
        [last] = messages(away, 1)
        messages(stay_a, 1)
        away.close_socket()  # no closing handshake: as a network that went away
        acks, stayed = read_while([stay_a, stay_b], 500, run_senders, [a, b], room, 125, 0.0, 2)  # 4 x 125
        assert_one_order(stayed, acks)
        back = member(stack, b, room, "away", since=last["id"])
        reply = joined(back)
        assert reply["recovered"] is True
        assert [(m["id"], m["data"]) for m in reply["messages"]] == [(m["id"], m["data"]) for m in stayed[0]]
        assert len(reply["messages"]) == 500
        stay_a.send(json.dumps({"event": "publish", "room": room, "data": "after", "ref": "x"}))
        [live] = messages(back, 1)
        assert live["data"] == "after" and live["id"] > stayed[0][-1]["id"]
        back.send(json.dumps({"event": "history", "room": room, "limit": 1}))  # nothing else came in between
        assert recv_json(back)["event"] == "history"


def test_subscribers_cut_mid_stream_still_see_one_order_and_lose_nothing(tmp_path: Path) -> None:
    import redis as redis_client

    room = unique("room")
    with private_redis(tmp_path) as redis, two_instances(redis.url) as (a, b), ExitStack() as stack:
        watchers = [member(stack, a, room, "wa"), member(stack, b, room, "wb")]
        for ws in watchers:
            joined(ws)
        probe = member(stack, a, room, "probe")
        joined(probe)
        wait_until_both_hear(watchers[0], watchers[1], probe, room)
        cuts = threading.Thread(target=lambda: [
            (time.sleep(0.25), redis_client.Redis.from_url(redis.url).client_kill_filter(_type="pubsub"))
            for _ in range(3)
        ])
        cuts.start()
        # about 1.2 s of publishing: the cuts fall inside
        acks, seen = read_while(watchers, 360, run_senders, [a, b], room, 60, 0.01)
        cuts.join()
        assert_one_order(seen, acks)


@pytest.mark.parametrize("since", ["unknown", "old"])
def test_recovery_across_instances_says_false_when_it_cannot_promise(since: str) -> None:
    redis = require(REDIS_URL, 6379, "Redis")
    room = unique("room")
    with two_instances(redis, "--history-retention", "5") as (a, b), ExitStack() as stack:
        sender = member(stack, a, room, "sender")
        joined(sender)
        ids = []
        for i in range(10):
            sender.send(json.dumps({"event": "publish", "room": room, "data": i, "ref": i}))
            while (event := recv_json(sender))["event"] != "ack":
                pass
            ids.append(event["id"])
        sender.close()
        back = member(stack, b, room, "back", since=ids[0] if since == "old" else "0" * 18 + "~")
        assert joined(back)["recovered"] is False
