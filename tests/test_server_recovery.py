"""Recovery and idempotency over real sockets, as a new user tries it: a real ``server.py`` with the
default SQLite store in a temporary file, the ``websockets`` client, a reconnect after a gap, a
server restart, and a publish re-sent with its key after its ack was lost."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

from tests.servers import spawn_server
from tests.services import REDIS_URL, recv_until, require, unique
from tests.wire import RssWatch, healthz, wait_for

ARGS = ("--rate-limit", "0")


def send(ws: ClientConnection, **event: Any) -> None:
    ws.send(json.dumps(event))


def reply(ws: ClientConnection, ref: Any) -> dict[str, Any]:
    return recv_until(ws, lambda e: e.get("ref") == ref)


def publish_all(ws: ClientConnection, room: str, items: list[Any]) -> None:
    for item in items:
        send(ws, event="publish", room=room, data=item, key=f"k-{item}", ref=f"p{item}")
    for item in items:
        assert reply(ws, f"p{item}")["event"] == "ack"


def test_a_reconnect_and_a_server_restart_recover_every_message_once_in_order(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'hubbub.db'}"
    with spawn_server("--store", store, *ARGS) as server:
        with connect(f"{server.url}/ws?user=bob") as bob:
            send(bob, event="join", room="r", ref="j")
            reply(bob, "j")
            with connect(f"{server.url}/ws?user=alice") as alice:
                send(alice, event="join", room="r", ref="j")
                reply(alice, "j")
                publish_all(bob, "r", list(range(5)))
                seen = [recv_until(alice, lambda e: e["event"] == "message") for _ in range(5)]
            assert [m["data"] for m in seen] == list(range(5))
            publish_all(bob, "r", list(range(5, 25)))  # alice is away: from the ring
            with connect(f"{server.url}/ws?user=alice") as alice:
                send(alice, event="join", room="r", since=seen[-1]["id"], ref="re")
                joined = reply(alice, "re")
                assert joined["recovered"] is True
                assert [m["data"] for m in joined["messages"]] == list(range(5, 25))
                last = joined["messages"][-1]["id"]
            publish_all(bob, "r", list(range(25, 35)))  # away again, and then the server restarts
    with spawn_server("--store", store, *ARGS) as server:
        with connect(f"{server.url}/ws?user=bob") as bob:
            send(bob, event="join", room="r", ref="j")
            reply(bob, "j")
            publish_all(bob, "r", list(range(35, 40)))
            with connect(f"{server.url}/ws?user=alice") as alice:
                send(alice, event="join", room="r", since=last, ref="re")
                joined = reply(alice, "re")  # from the store, then the ring of the new server
                assert joined["recovered"] is True
                assert [m["data"] for m in joined["messages"]] == list(range(25, 40))
                publish_all(bob, "r", [40])
                live = recv_until(alice, lambda e: e["event"] == "message")
                assert live["data"] == 40
                send(alice, event="history", room="r", limit=100, ref="h")
                history = reply(alice, "h")["messages"]
                assert [m["data"] for m in history] == list(range(41))  # each stored once


def test_a_publish_resent_with_its_key_after_a_lost_ack_is_stored_and_delivered_once(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'hubbub.db'}"
    with spawn_server("--store", store, *ARGS) as server, connect(f"{server.url}/ws?user=alice") as alice:
        send(alice, event="join", room="orders", ref="j")
        reply(alice, "j")
        with connect(f"{server.url}/ws?user=bob") as bob:
            send(bob, event="join", room="orders", presence=False, ref="j")
            reply(bob, "j")
            send(bob, event="publish", room="orders", data={"order": 7}, key="order-7", ref="first")
            first = reply(bob, "first")
        # bob's connection went before it read anything else: it sends again, with the same key
        with connect(f"{server.url}/ws?user=bob") as bob:
            send(bob, event="join", room="orders", presence=False, ref="j")
            reply(bob, "j")
            send(bob, event="publish", room="orders", data={"order": 7}, key="order-7", ref="again")
            again = reply(bob, "again")
            send(bob, event="publish", room="orders", data={"order": 8}, key="order-8", ref="next")
            reply(bob, "next")
        assert (again["event"], again["id"], again["ts"]) == ("ack", first["id"], first["ts"])
        got = [recv_until(alice, lambda e: e["event"] == "message")["data"] for _ in range(2)]
        assert got == [{"order": 7}, {"order": 8}]  # 7 once, then 8
        send(alice, event="history", room="orders", ref="h")
        assert [m["data"] for m in reply(alice, "h")["messages"]] == [{"order": 7}, {"order": 8}]


def test_a_spam_of_20000_rooms_leaves_no_room_no_ring_and_a_bounded_store(tmp_path: Path, figure: Any) -> None:
    """One message in each of 20,000 rooms, each left at once: no room (nor its ring) stays in memory,
    the second round costs no more memory than the first, and the store keeps what the retention
    says (an age of 1 s: everything is gone from history after it)."""
    db = tmp_path / "hubbub.db"
    with spawn_server("--store", f"sqlite:///{db}", "--history-retention", "1000,1s", *ARGS) as server, \
            connect(f"{server.url}/ws?user=spammer", max_size=None) as ws:
        watches = []
        for spam in range(2):
            watch = RssWatch(server.process.pid)
            for start in range(0, 20_000, 1000):
                for i in range(start, start + 1000):
                    room = f"spam-{spam}-{i}"
                    send(ws, event="join", room=room, presence=False)
                    send(ws, event="publish", room=room, data=i, ref=f"{spam}-{i}")
                    send(ws, event="leave", room=room)
                reply(ws, f"{spam}-{start + 999}")  # acked once stored: the batch is in
            assert wait_for(lambda: healthz(server)["rooms"] == 0)
            watches.append(watch.stop())
        figure(f"20,000 rooms x 2: rooms left 0; round 1 {watches[0]}, round 2 {watches[1]}; "
               f"SQLite {db.stat().st_size // 1024} KiB")
        assert watches[1].growth < max(watches[0].peak_growth, 4096)  # the second round reuses the first's memory
        time.sleep(1.2)
        send(ws, event="join", room="spam-1-5", since="0" * 22, presence=False, ref="late")
        late = reply(ws, "late")
        assert late["recovered"] is False and late["messages"] == []  # past the age: nothing kept to recover
        send(ws, event="history", room="spam-1-5", ref="h")
        assert reply(ws, "h")["messages"] == []


def test_a_key_re_sent_to_another_instance_is_acked_with_the_original_id() -> None:
    """Two instances on Redis: the other instance learns the key with the message, so a client that
    reconnects there and re-sends its unacked publish is acked with the first id, and nobody gets it twice."""
    broker = require(REDIS_URL, 6379, "Redis")
    channel = unique("keys")
    room = unique("room")
    common = ("--broker", broker, "--broker-channel", channel, "--store", "memory", *ARGS)
    with spawn_server(*common) as a, spawn_server(*common) as b, \
            connect(f"{b.url}/ws?user=watcher") as watcher:
        send(watcher, event="join", room=room, presence=False, ref="j")
        reply(watcher, "j")
        with connect(f"{a.url}/ws?user=bob") as bob:
            send(bob, event="join", room=room, presence=False, ref="j")
            reply(bob, "j")
            send(bob, event="publish", room=room, data="once", key="k-1", ref="first")
            first = reply(bob, "first")
        seen = recv_until(watcher, lambda e: e["event"] == "message")
        assert seen["id"] == first["id"] and "key" not in seen
        with connect(f"{b.url}/ws?user=bob") as bob:
            send(bob, event="join", room=room, presence=False, since=first["id"], ref="j")
            assert reply(bob, "j")["recovered"] is True
            send(bob, event="publish", room=room, data="once", key="k-1", ref="again")
            again = reply(bob, "again")
            send(bob, event="publish", room=room, data="next", key="k-2", ref="next")
            reply(bob, "next")
        assert (again["id"], again["ts"]) == (first["id"], first["ts"])
        assert recv_until(watcher, lambda e: e["event"] == "message")["data"] == "next"  # not "once" again
