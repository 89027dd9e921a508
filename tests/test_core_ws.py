"""``/ws`` (protocol v2) byte for byte, no sockets: many rooms on one socket, presence per room with
metadata, v1 and v2 members in one room, permissions, tokens, and every bad request answered."""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
import pytest

from hubbub import core
from hubbub.backends.auth import jwt_verifier
from tests.hub import Hub, Peer

SECRET = "ws-tests-secret-that-is-long-enough-for-hs256"


def events(peer: Peer, name: str | None = None) -> list[dict[str, Any]]:
    got = peer.json()
    return [e for e in got if name is None or e["event"] == name]


def joined(hub: Hub, peer: Peer, room: str, **fields: Any) -> dict[str, Any]:
    peer.send_json({"event": "join", "room": room, **fields})
    hub.advance(0.06)  # the presence window: joined comes at its end
    [reply] = [e for e in peer.json() if e["event"] == "joined" and e["room"] == room]
    return reply


def test_one_socket_three_rooms_messages_from_v1_and_v2_and_a_leave() -> None:
    hub = Hub()
    alice = hub.join("/ws?user=alice")
    others = {room: hub.join(f"/ws?user=w-{room}") for room in ("a", "b")}
    carol = hub.join("/chat/c?user=carol")  # a v1 member of room c
    for room, peer in others.items():
        joined(hub, peer, room)
    for i, room in enumerate(("a", "b", "c")):
        reply = joined(hub, alice, room, ref=i)
        assert reply["ref"] == i and "alice" in reply["presence"]
    assert joined(hub, others["a"], "a")["presence"]  # joining a joined room: joined again, no second membership
    for peer in (*others.values(), carol):
        peer.json()
    others["a"].send_json({"event": "publish", "room": "a", "data": {"n": 1}})
    others["b"].send_json({"event": "publish", "room": "b", "data": [2]})
    carol.send_json({"event": "message", "text": "v1 says hi"})
    got = events(alice, "message")
    assert [(m["room"], m.get("data"), m.get("text")) for m in got] == [
        ("a", {"n": 1}, None), ("b", [2], None), ("c", None, "v1 says hi")]
    alice.send_json({"event": "leave", "room": "b", "ref": "bye"})
    assert events(alice) == [{"event": "left", "room": "b", "ref": "bye"}]
    others["b"].send_json({"event": "publish", "room": "b", "data": "after"})
    others["a"].send_json({"event": "publish", "room": "a", "data": "still"})
    assert [m["data"] for m in events(alice, "message")] == ["still"]
    alice.send_json({"event": "publish", "room": "c", "data": {"to": "v1"}, "ref": 5})
    [message] = events(carol, "message")
    assert message["data"] == {"to": "v1"} and message["user"] == "alice"  # v1 members see data as data
    [ack] = events(alice, "ack")
    assert ack == {"event": "ack", "ref": 5, "id": message["id"], "ts": message["ts"]}


def test_presence_per_room_with_one_meta_per_connection_and_updates_as_diffs() -> None:
    hub = Hub()
    watcher = hub.join("/ws?user=watcher")
    joined(hub, watcher, "lobby")
    phone = hub.join("/ws?user=dana")
    laptop = hub.join("/ws?user=dana")
    joined(hub, phone, "lobby", meta={"device": "phone"})
    assert events(watcher, "presence_diff") == [
        {"event": "presence_diff", "room": "lobby", "joins": {"dana": [{"device": "phone"}]}, "leaves": {}}]
    state = joined(hub, laptop, "lobby", meta={"device": "laptop"})["presence"]
    assert sorted(state["dana"], key=str) == [{"device": "laptop"}, {"device": "phone"}]
    assert state["watcher"] == [{}]
    watcher.json()
    laptop.send_json({"event": "presence_update", "room": "lobby", "meta": {"device": "laptop", "status": "typing"}})
    hub.advance(0.06)
    assert events(watcher, "presence_diff") == [{
        "event": "presence_diff", "room": "lobby",
        "joins": {"dana": [{"device": "laptop", "status": "typing"}]}, "leaves": {"dana": [{"device": "laptop"}]},
    }]
    phone.close()
    hub.advance(0.06)
    assert events(watcher, "presence_diff")[-1]["leaves"] == {"dana": [{"device": "phone"}]}
    watcher.send_json({"event": "presence", "room": "lobby", "ref": "p"})
    [reply] = events(watcher)
    assert reply["event"] == "presence_state" and reply["ref"] == "p" and reply["room"] == "lobby"
    assert reply["users"] == {"watcher": [{}], "dana": [{"device": "laptop", "status": "typing"}]}


def test_a_v1_chat_member_is_present_with_empty_meta_and_presence_false_hears_nothing() -> None:
    hub = Hub()
    quiet = hub.join("/ws?user=quiet")
    quiet.send_json({"event": "join", "room": "r", "presence": False, "ref": 1})
    assert events(quiet) == [{"event": "joined", "room": "r", "ref": 1}]  # at once, and no presence field
    hub.join("/chat/r?user=old")
    loud = hub.join("/ws?user=loud")
    assert joined(hub, loud, "r")["presence"] == {"quiet": [{}], "old": [{}], "loud": [{}]}
    hub.advance(0.1)
    assert events(quiet) == []


def test_a_reconnect_storm_costs_one_state_and_one_diff_per_window(monkeypatch: pytest.MonkeyPatch) -> None:
    hub = Hub()
    old = [hub.join(f"/ws?user=old{i}") for i in range(30)]
    for peer in old:
        peer.send_json({"event": "join", "room": "storm"})
    hub.advance(0.06)
    for peer in old:
        peer.json()
    storm = [hub.join(f"/ws?user=new{i}") for i in range(1500)]
    built: list[int] = []
    real = core._metas_json
    monkeypatch.setattr(core, "_metas_json", lambda users, dumps: built.append(len(users)) or real(users, dumps))
    for peer in storm:
        peer.send_json({"event": "join", "room": "storm", "meta": {"v": 1}})
    hub.advance(0.06)
    assert len(built) == 3  # one state for every newcomer, and the diff's joins and leaves, for the watchers
    first, last = events(storm[0], "joined"), events(storm[-1], "joined")
    assert first[0]["presence"] == last[0]["presence"] and len(first[0]["presence"]) == 1530
    [diff] = events(old[0], "presence_diff")
    assert len(diff["joins"]) == 1500 and diff["leaves"] == {}


def test_history_pages_back_and_forward_with_its_ref() -> None:
    hub = Hub()
    alice = hub.join("/ws?user=alice")
    joined(hub, alice, "h")
    for i in range(6):
        alice.send_json({"event": "publish", "room": "h", "data": i, "ref": i})
    ids = [a["id"] for a in events(alice, "ack")]
    alice.send_json({"event": "history", "room": "h", "limit": 2, "ref": "newest"})
    alice.send_json({"event": "history", "room": "h", "limit": 2, "after": ids[0], "ref": "forward"})
    alice.send_json({"event": "history", "room": "h", "limit": 9, "after": ids[1], "before": ids[4], "ref": "between"})
    pages = {e["ref"]: [m["data"] for m in e["messages"]] for e in events(alice, "history")}
    assert pages == {"newest": [4, 5], "forward": [1, 2], "between": [2, 3]}


SIGNED = {"sub": "alice", "rooms": ["lobby", "news-*", "feed-*"], "publish": ["news-*"]}


def token(**claims: Any) -> str:
    return jwt.encode({"exp": int(time.time()) + 600, **claims}, SECRET, algorithm="HS256")


def test_permissions_from_the_token_and_read_only_rooms() -> None:
    hub = Hub(verifier=jwt_verifier(secret=SECRET), read_only_rooms=("feed-*",))
    alice = hub.join(f"/ws?token={token(**SIGNED)}")
    joined(hub, alice, "lobby")
    alice.send_json({"event": "publish", "room": "lobby", "data": "x", "ref": 1})
    assert events(alice) == [{"event": "error", "code": "forbidden", "detail": "publishing to this room is not allowed",
                              "ref": 1, "room": "lobby"}]
    alice.send_json({"event": "join", "room": "secret", "ref": 2})
    assert [(e["code"], e["ref"]) for e in events(alice)] == [("forbidden", 2)]
    joined(hub, alice, "news-today")
    alice.send_json({"event": "publish", "room": "news-today", "data": "ok", "ref": 3})
    assert [e["event"] for e in events(alice)] == ["ack"]
    bob = hub.join(f"/ws?token={token(sub='bob')}")  # no claims: anywhere, but read-only rooms stay read-only
    joined(hub, bob, "feed-prices")
    bob.send_json({"event": "publish", "room": "feed-prices", "data": 1, "ref": 4})
    assert [(e["code"], e["room"]) for e in events(bob)] == [("forbidden", "feed-prices")]
    assert hub.store.history("feed-prices", 10) == [] and hub.store.history("lobby", 10) == []


def test_refresh_renews_the_token_and_leaves_rooms_it_no_longer_allows() -> None:
    hub = Hub(verifier=jwt_verifier(secret=SECRET))
    hub.now = time.time()
    alice = hub.join(f"/ws?token={token(sub='alice')}")
    joined(hub, alice, "a")
    joined(hub, alice, "b")
    exp = int(time.time()) + 900
    alice.send_json({"event": "refresh", "token": jwt.encode({"sub": "alice", "exp": exp, "rooms": ["a"]}, SECRET),
                     "ref": "r"})
    got = events(alice)
    assert {"event": "left", "room": "b", "reason": "forbidden"} in got
    assert {"event": "refreshed", "exp": exp, "ref": "r"} in got
    alice.send_json({"event": "refresh", "token": token(sub="mallory"), "ref": "m"})
    assert [(e["code"], e["ref"]) for e in events(alice)] == [("forbidden", "m")]
    alice.send_json({"event": "refresh", "token": "garbage", "ref": "g"})
    assert [(e["code"], e["ref"]) for e in events(alice)] == [("forbidden", "g")]


def test_token_expiring_comes_before_exp_and_a_refresh_moves_it() -> None:
    hub = Hub(verifier=jwt_verifier(secret=SECRET), ping_interval=0)
    hub.now = start = float(int(time.time()))  # the verifier checks exp against the real clock
    alice = hub.join(f"/ws?token={jwt.encode({'sub': 'alice', 'exp': int(start) + 100}, SECRET)}")
    hub.advance(69.0)
    assert events(alice) == []
    hub.advance(2.0)  # 30 s before exp
    assert events(alice) == [{"event": "token_expiring", "in": 29}]
    alice.send_json({"event": "refresh", "token": jwt.encode({"sub": "alice", "exp": int(start) + 1000}, SECRET)})
    assert events(alice, "refreshed")
    hub.advance(40.0)  # past the first token's exp: it no longer closes the connection
    assert alice.closed_with is None
    hub.advance(900.0)
    assert alice.closed_with == 1008


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        ({"event": "join", "room": "x" * 201}, "bad_room"),
        ({"event": "join", "room": "a\nb"}, "bad_room"),
        ({"event": "join", "room": ""}, "bad_room"),
        ({"event": "join", "room": 7}, "bad_room"),
        ({"event": "join", "room": "r", "meta": [1]}, "bad_field"),
        ({"event": "join", "room": "r", "meta": {"x": "y" * 1100}}, "bad_field"),
        ({"event": "join", "room": "r", "presence": "no"}, "bad_field"),
        ({"event": "join", "room": "r", "since": 5}, "bad_field"),
        ({"event": "publish", "room": "nowhere", "data": 1}, "not_joined"),
        ({"event": "publish", "room": "r", "data": 1, "key": "k" * 65}, "bad_field"),
        ({"event": "publish", "room": "r"}, "bad_field"),
        ({"event": "leave", "room": "nowhere"}, "not_joined"),
        ({"event": "presence_update", "room": "nowhere", "meta": {}}, "not_joined"),
        ({"event": "history", "room": "r", "limit": 0}, "bad_field"),
        ({"event": "history", "room": "r", "after": 3}, "bad_field"),
        ({"event": "refresh", "token": "t"}, "forbidden"),  # tokens are not in use on this server
        ({"event": "teleport"}, "unknown_event"),
    ],
)
def test_bad_requests_are_errors_with_ref_and_nothing_happens(request_: dict[str, Any], code: str) -> None:
    hub = Hub()
    alice = hub.join("/ws?user=alice")
    bob = hub.join("/ws?user=bob")
    for peer in (alice, bob):
        joined(hub, peer, "r")
    hub.advance(0.1)
    alice.json()
    bob.json()
    alice.send_json({**request_, "ref": "x"})
    hub.advance(0.1)
    [error] = events(alice)
    assert error["event"] == "error" and error["code"] == code and error["ref"] == "x", error
    assert alice.closed_with is None
    assert events(bob) == [] and hub.store.history("r", 10) == []


def test_a_message_too_big_as_encoded_is_refused_but_the_frame_was_fine() -> None:
    hub = Hub(max_message_size=1000)
    alice = hub.join("/ws?user=alice")
    joined(hub, alice, "r")
    alice.send_json({"event": "publish", "room": "r", "data": "x" * 920, "ref": 1})  # a frame of ~970 bytes
    [error] = events(alice)
    assert (error["code"], error["ref"], error["room"]) == ("bad_field", 1, "r")
    assert alice.closed_with is None and hub.store.history("r", 10) == []


def test_joins_past_the_room_limit_are_refused() -> None:
    hub = Hub(max_rooms_per_connection=3)
    alice = hub.join("/ws?user=alice")
    for i in range(3):
        alice.send_json({"event": "join", "room": f"r{i}", "presence": False})
    alice.json()
    alice.send_json({"event": "join", "room": "r3", "ref": 4})
    assert [(e["code"], e["ref"]) for e in events(alice)] == [("too_many_rooms", 4)]
    alice.send_json({"event": "join", "room": "r0", "presence": False, "ref": 5})  # one it is in: fine
    assert events(alice) == [{"event": "joined", "room": "r0", "ref": 5}]


def test_presence_spans_instances_with_metas() -> None:
    hub = Hub(node="aaaa")
    watcher = hub.join("/ws?user=watcher")
    joined(hub, watcher, "lobby")
    hub.server.remote_presence("bbbb", {"lobby": {"eve": [{"device": "tv"}]}}, hub.now)
    hub.advance(0.06)
    assert events(watcher, "presence_diff") == [
        {"event": "presence_diff", "room": "lobby", "joins": {"eve": [{"device": "tv"}]}, "leaves": {}}]
    newcomer = hub.join("/ws?user=new")
    assert joined(hub, newcomer, "lobby")["presence"]["eve"] == [{"device": "tv"}]
    heartbeat = hub.server.local_presence()
    assert heartbeat == {"lobby": ["new", "watcher"]}  # nobody here has metadata: the short form
    hub.server.remote_presence("bbbb", None, hub.now)  # goodbye
    hub.advance(0.06)
    assert events(watcher, "presence_diff")[-1]["leaves"] == {"eve": [{"device": "tv"}]}
    json.dumps(heartbeat)
