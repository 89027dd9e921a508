"""``/ws`` over real sockets, as a new user tries it: real ``server.py`` processes (two of them on a real
Redis), the ``websockets`` client, JWT permissions, ``--read-only-rooms``."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import jwt
from websockets.sync.client import ClientConnection, connect

from tests.servers import RunningServer, spawn_server
from tests.services import REDIS_URL, recv_until, require, unique
from tests.wire import Figure

FAST_PRESENCE = ("--presence-heartbeat", "0.3", "--presence-ttl", "1.5", "--rate-limit", "0")
SECRET = "ws-over-the-wire-secret-long-enough-for-hs256"


@contextmanager
def two_instances(*extra: str) -> Iterator[tuple[RunningServer, RunningServer]]:
    broker = require(REDIS_URL, 6379, "Redis")
    channel = unique("ws")
    with ExitStack() as stack:
        a, b = (stack.enter_context(spawn_server("--broker", broker, "--broker-channel", channel, *FAST_PRESENCE,
                                                 *extra)) for _ in range(2))
        yield a, b


def send(ws: ClientConnection, **event: Any) -> None:
    ws.send(json.dumps(event))


def reply(ws: ClientConnection, ref: Any) -> dict[str, Any]:
    return recv_until(ws, lambda e: e.get("ref") == ref)


def presence_until(ws: ClientConnection, room: str, check: Any, timeout: float = 10.0) -> dict[str, Any]:
    """Ask for ``room``'s presence until ``check(users)`` holds (other instances' heartbeats take a moment)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ref = f"p{time.monotonic()}"
        send(ws, event="presence", room=room, ref=ref)
        users = reply(ws, ref)["users"]
        if check(users):
            return users
        time.sleep(0.1)
    raise AssertionError(f"the presence of {room} never matched")


def test_one_socket_many_rooms_across_two_instances(figure: Figure) -> None:
    rooms = [unique("r") for _ in range(3)]
    with two_instances() as (a, b):
        with connect(f"{a.url}/ws?user=alice") as alice, connect(f"{b.url}/ws?user=bob") as bob, \
                connect(f"{b.url}/chat/{rooms[2]}?user=carol") as carol:
            for i, room in enumerate(rooms[:2]):
                send(bob, event="join", room=room, meta={"role": "peer"}, ref=f"b{i}")
                assert reply(bob, f"b{i}")["event"] == "joined"
            for i, room in enumerate(rooms):
                send(alice, event="join", room=room, meta={"device": "laptop"}, ref=i)
                joined = reply(alice, i)
                assert joined["event"] == "joined" and joined["room"] == room
                assert joined["presence"]["alice"] == [{"device": "laptop"}]
            # the other instance's members show up in alice's rooms (heartbeats), with their metas
            presence_until(alice, rooms[0], lambda users: users.get("bob") == [{"role": "peer"}])
            presence_until(alice, rooms[2], lambda users: users.get("carol") == [{}])  # a v1 member: meta {}
            send(bob, event="publish", room=rooms[0], data={"n": 0}, ref="p0")
            send(bob, event="publish", room=rooms[1], data={"n": 1}, ref="p1")
            carol.send(json.dumps({"event": "message", "text": "from v1"}))
            got = [recv_until(alice, lambda e: e["event"] == "message") for _ in range(3)]
            assert sorted((m["room"], json.dumps(m.get("data", m.get("text")))) for m in got) == sorted(
                [(rooms[0], '{"n": 0}'), (rooms[1], '{"n": 1}'), (rooms[2], '"from v1"')])
            # a second connection of alice, on the other instance, with its own meta
            with connect(f"{b.url}/ws?user=alice") as phone:
                send(phone, event="join", room=rooms[0], meta={"device": "phone"}, ref="ph")
                assert reply(phone, "ph")["event"] == "joined"
                users = presence_until(bob, rooms[0], lambda u: len(u.get("alice", [])) == 2)
                assert sorted(users["alice"], key=json.dumps) == [{"device": "laptop"}, {"device": "phone"}]
                send(phone, event="presence_update", room=rooms[0], meta={"device": "phone", "status": "typing"})
                diff = recv_until(alice, lambda e: e["event"] == "presence_diff" and "alice" in e["joins"]
                                  and e["joins"]["alice"][0].get("status") == "typing")
                assert diff["room"] == rooms[0] and diff["leaves"] == {"alice": [{"device": "phone"}]}
            send(alice, event="leave", room=rooms[1], ref="bye")
            assert reply(alice, "bye") == {"event": "left", "room": rooms[1], "ref": "bye"}
            send(bob, event="publish", room=rooms[1], data="gone", ref="x1")
            send(bob, event="publish", room=rooms[0], data="here", ref="x0")
            later = recv_until(alice, lambda e: e["event"] == "message")
            assert later["data"] == "here"  # nothing more from the room it left
    figure("3 rooms on one socket across 2 instances on Redis: joined with presence, messages from /ws and /chat, "
           "a second device's meta, a status diff, nothing after leave")


def token(**claims: Any) -> str:
    return jwt.encode({"exp": int(time.time()) + 600, **claims}, SECRET, algorithm="HS256")


def test_publish_claims_and_read_only_rooms_refuse_with_forbidden() -> None:
    with spawn_server("--jwt-secret", SECRET, "--read-only-rooms", "feed-*") as running:
        url = f"{running.url}/ws?token={token(sub='alice', publish=['news-*'])}"
        with connect(url) as alice:
            send(alice, event="join", room="lobby", ref=1)
            assert reply(alice, 1)["event"] == "joined"
            send(alice, event="publish", room="lobby", data="no", ref=2)
            assert reply(alice, 2)["code"] == "forbidden"
            send(alice, event="join", room="news-1", ref=3)
            reply(alice, 3)
            send(alice, event="publish", room="news-1", data="yes", ref=4)
            assert reply(alice, 4)["event"] == "ack"
            send(alice, event="join", room="feed-prices", ref=5)
            reply(alice, 5)
        with connect(f"{running.url}/ws?token={token(sub='bob')}") as bob:
            send(bob, event="join", room="feed-prices", ref=1)
            reply(bob, 1)
            send(bob, event="publish", room="feed-prices", data=1, ref=2)
            error = reply(bob, 2)
            assert (error["event"], error["code"], error["room"]) == ("error", "forbidden", "feed-prices")
            send(bob, event="history", room="feed-prices", ref=3)
            assert reply(bob, 3)["messages"] == []
