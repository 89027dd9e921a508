"""Recovery and idempotency on ``/ws`` byte for byte, no sockets: ``join`` with ``since`` from the
room's ring and from the store, what arrives while the store is read, ``recovered`` false for every
case the server cannot promise, and publish ``key``s (on ``/ws`` and ``/api/publish``) acked with
the original id and never delivered or stored twice."""

from __future__ import annotations

from typing import Any

import pytest

from hubbub import core
from hubbub.handlers import api
from tests.hub import Hub, Peer
from tests.test_core_api import KEY, HttpPeer, request


def joined(hub: Hub, peer: Peer, room: str, **fields: Any) -> dict[str, Any]:
    peer.send_json({"event": "join", "room": room, **fields})
    hub.advance(0.06)  # the presence window: joined comes at its end
    [reply] = [e for e in peer.json() if e["event"] == "joined" and e["room"] == room]
    return reply


def publish(peer: Peer, room: str, data: Any, **fields: Any) -> None:
    peer.send_json({"event": "publish", "room": room, "data": data, **fields})


def messages(peer: Peer) -> list[dict[str, Any]]:
    return [e for e in peer.json() if e["event"] == "message"]


def seen_then_away(hub: Hub, room: str = "r") -> tuple[Peer, dict[str, Any]]:
    """alice and bob in ``room``; alice gets bob's "seen" and goes away: (bob, the message alice saw last)."""
    alice, bob = hub.join("/ws?user=alice"), hub.join("/ws?user=bob")
    joined(hub, alice, room), joined(hub, bob, room)
    publish(bob, room, "seen")
    [last] = messages(alice)
    alice.close()
    return bob, last


def stored(hub: Hub, room: str) -> list[Any]:
    return [m["data"] for m in hub.store.history(room, 10_000)]


def test_a_short_reconnect_recovers_from_the_ring_in_order_then_live_with_no_gap_or_duplicate() -> None:
    hub = Hub()
    alice, bob = hub.join("/ws?user=alice"), hub.join("/ws?user=bob")
    joined(hub, alice, "r"), joined(hub, bob, "r")
    for i in range(3):
        publish(bob, "r", i)
    seen = messages(alice)
    assert [m["data"] for m in seen] == [0, 1, 2]
    alice.close()
    for i in range(3, 8):
        publish(bob, "r", i)
    again = hub.join("/ws?user=alice")
    reply = joined(hub, again, "r", since=seen[-1]["id"], ref="re")
    assert reply["recovered"] is True and reply["ref"] == "re"
    assert [m["data"] for m in reply["messages"]] == [3, 4, 5, 6, 7]
    assert all(m["event"] == "message" and m["room"] == "r" and m["user"] == "bob" for m in reply["messages"])
    publish(bob, "r", 8)
    assert [m["data"] for m in messages(again)] == [8]
    # nothing missed: the last id seen recovers nothing
    third = hub.join("/ws?user=alice")
    reply = joined(hub, third, "r", since=reply["messages"][-1]["id"])
    assert reply["recovered"] is True and [m["data"] for m in reply["messages"]] == [8]


def test_a_room_without_members_here_recovers_from_the_store() -> None:
    hub = Hub()
    bob, last = seen_then_away(hub, "quiet")
    for i in range(4):
        publish(bob, "quiet", i)
    bob.close()
    hub.advance(0.1)
    assert "quiet" not in hub.server.rooms  # gone, and its ring with it
    again = hub.join("/ws?user=alice")
    reply = joined(hub, again, "quiet", since=last["id"])
    assert reply["recovered"] is True and [m["data"] for m in reply["messages"]] == [0, 1, 2, 3]
    assert not hub.server.joining(again.conn)


def test_what_arrives_while_the_store_is_read_follows_the_page_once() -> None:
    hub = Hub()
    bob, last = seen_then_away(hub)
    for i in range(3):
        publish(bob, "r", i)
    bob.close()
    hub.advance(0.1)
    hub.carry_out = False  # hold the store's answer
    again = hub.join("/ws?user=alice")
    again.send_json({"event": "join", "room": "r", "since": last["id"]})
    carol = hub.join("/ws?user=carol")
    carol.send_json({"event": "join", "room": "r", "presence": False})
    publish(carol, "r", "during-1")
    publish(carol, "r", "during-2")
    assert [e["event"] for e in again.json()] == []  # nothing before its joined
    hub.carry_out = True  # now the read (asked first), then the writes after it
    hub.pump()
    hub.advance(0.06)  # the presence window the join opened once the store answered
    [reply] = [e for e in again.json() if e["event"] == "joined"]
    assert reply["recovered"] is True
    assert [m["data"] for m in reply["messages"]] == [0, 1, 2, "during-1", "during-2"]
    publish(carol, "r", "live")
    assert [m["data"] for m in messages(again)] == ["live"]


@pytest.mark.parametrize("since", ["", "0" * 22, "f" * 22, "not-an-id"])
def test_a_since_the_server_does_not_know_is_recovered_false_with_the_newest(since: str) -> None:
    hub = Hub()
    alice, bob = hub.join("/ws?user=alice"), hub.join("/ws?user=bob")
    joined(hub, alice, "r"), joined(hub, bob, "r")
    publish(bob, "r", "kept")
    reply = joined(hub, alice, "elsewhere", since=since)
    assert reply["recovered"] is False and reply["messages"] == []
    again = hub.join("/ws?user=alice")
    reply = joined(hub, again, "r", since=since)
    assert reply["recovered"] is False and [m["data"] for m in reply["messages"]] == ["kept"]


def test_an_id_of_another_room_is_not_known_here() -> None:
    hub = Hub()
    alice, bob = hub.join("/ws?user=alice"), hub.join("/ws?user=bob")
    joined(hub, alice, "a"), joined(hub, bob, "a"), joined(hub, bob, "b")
    publish(bob, "a", "in a")
    [other] = messages(alice)
    reply = joined(hub, alice, "b", since=other["id"])
    assert reply["recovered"] is False


def test_a_gap_over_recover_max_or_past_the_ring_is_recovered_false() -> None:
    hub = Hub(recover_max=3, recover_ring=4)
    bob, last = seen_then_away(hub)
    for i in range(4):
        publish(bob, "r", i)
    again = hub.join("/ws?user=alice")
    reply = joined(hub, again, "r", since=last["id"])  # 4 missed, recover_max 3: from the ring, too many
    assert reply["recovered"] is False and [m["data"] for m in reply["messages"]] == [1, 2, 3]
    for i in range(4, 10):
        publish(bob, "r", i)  # "seen" left the ring long ago: the store has it, with 9 after it
    third = hub.join("/ws?user=alice")
    reply = joined(hub, third, "r", since=last["id"])
    assert reply["recovered"] is False and [m["data"] for m in reply["messages"]] == [7, 8, 9]


def test_the_ring_losing_part_of_the_gap_during_the_store_read_is_recovered_false() -> None:
    hub = Hub(recover_ring=2)
    bob, last = seen_then_away(hub)
    for i in range(3):
        publish(bob, "r", i)
    hub.carry_out = False
    again = hub.join("/ws?user=alice")
    again.send_json({"event": "join", "room": "r", "since": last["id"]})
    for i in range(3, 6):
        publish(bob, "r", i)  # the store is read before these are written, and the ring keeps only 2
    hub.carry_out = True
    hub.pump()
    hub.advance(0.06)
    [reply] = [e for e in again.json() if e["event"] == "joined"]
    newest = [m["data"] for m in reply["messages"]]
    assert reply["recovered"] is False and newest and newest == list(range(6))[-len(newest):]  # the ring's newest


def test_a_recovery_over_the_buffer_budget_is_recovered_false() -> None:
    hub = Hub(max_buffer=64 * 1024)
    bob, last = seen_then_away(hub)
    for _ in range(10):
        publish(bob, "r", "x" * 8000)
    again = hub.join("/ws?user=alice")
    reply = joined(hub, again, "r", since=last["id"])
    assert reply["recovered"] is False and 0 < len(reply["messages"]) < 10
    assert again.closed_with is None


def test_leaving_or_closing_while_the_store_is_read_costs_nothing() -> None:
    hub = Hub()
    hub.carry_out = False
    alice = hub.join("/ws?user=alice")
    alice.send_json({"event": "join", "room": "r", "since": "0" * 22, "ref": 1})
    alice.send_json({"event": "join", "room": "r", "since": "0" * 22, "ref": 2})
    assert hub.server.joining(alice.conn) == 1
    alice.send_json({"event": "leave", "room": "r", "ref": 3})
    bob = hub.join("/ws?user=bob")
    bob.send_json({"event": "join", "room": "s", "since": "0" * 22})
    bob.close()
    hub.carry_out = True
    hub.advance(0.1)
    assert [e["event"] for e in alice.json()] == ["left"]
    assert "r" not in hub.server.rooms and "s" not in hub.server.rooms  # the holds were released
    assert not hub.server.joining(alice.conn)


def test_joins_waiting_for_the_store_count_against_the_room_limit() -> None:
    hub = Hub(max_rooms_per_connection=2)
    hub.carry_out = False
    alice = hub.join("/ws?user=alice")
    for room in ("a", "b", "c"):
        alice.send_json({"event": "join", "room": room, "since": "0" * 22})
    [error] = [e for e in alice.json() if e["event"] == "error"]
    assert error["code"] == "too_many_rooms" and error["room"] == "c"


def test_a_store_that_fails_the_read_still_answers_the_join_recovered_false() -> None:
    hub = Hub(carry_out=False)
    alice = hub.join("/ws?user=alice")
    alice.send_json({"event": "join", "room": "r", "since": "0" * 22, "presence": False})
    [read] = [e for e in hub.server.effects() if isinstance(e, core.History)]
    hub.server.history_failed(read.conn_id, "down", read.ref, read.room)
    hub.pump()
    [reply] = alice.json()
    assert reply["event"] == "joined" and reply["recovered"] is False


@pytest.mark.parametrize("since", [5, ["x"], {"a": 1}, True])
def test_a_since_that_is_not_a_string_is_bad_field(since: Any) -> None:
    hub = Hub()
    alice = hub.join("/ws?user=alice")
    alice.send_json({"event": "join", "room": "r", "since": since})
    [error] = alice.json()
    assert error["event"] == "error" and error["code"] == "bad_field"


# -- idempotency ---------------------------------------------------------------------------


def test_a_publish_resent_with_its_key_is_acked_with_the_original_id_and_delivered_once() -> None:
    hub = Hub()
    alice, bob = hub.join("/ws?user=alice"), hub.join("/ws?user=bob")
    joined(hub, alice, "r"), joined(hub, bob, "r")
    publish(alice, "r", "once", key="k1", ref=1)
    [ack] = [e for e in alice.json() if e["event"] == "ack"]
    alice.close()  # the ack was "lost": a new connection sends it again
    again = hub.join("/ws?user=alice")
    joined(hub, again, "r", since=ack["id"])
    publish(again, "r", "once", key="k1", ref=2)
    [repeat] = [e for e in again.json() if e["event"] == "ack"]
    assert (repeat["id"], repeat["ts"], repeat["ref"]) == (ack["id"], ack["ts"], 2)
    assert [m["data"] for m in messages(bob)] == ["once"]
    assert stored(hub, "r") == ["once"]
    # another user's same key, or another room's, is another message
    publish(bob, "r", "bob's", key="k1")
    joined(hub, again, "s")
    publish(again, "s", "other room", key="k1")
    assert stored(hub, "r") == ["once", "bob's"] and stored(hub, "s") == ["other room"]


def test_a_repeat_while_the_original_is_being_stored_waits_for_its_ack() -> None:
    hub = Hub()
    alice = hub.join("/ws?user=alice")
    joined(hub, alice, "r")
    hub.carry_out = False
    publish(alice, "r", 1, key="k", ref="first")
    publish(alice, "r", 1, key="k", ref="second")
    assert alice.json() == []
    [write] = [e for e in hub.server.effects() if isinstance(e, core.Stored)]  # one message, not two
    hub.server.ack([write.ack])
    hub.pump()
    acks = alice.json()
    assert [(a["ref"], a["id"]) for a in acks] == [("first", write.message["id"]), ("second", write.message["id"])]


def test_a_repeat_of_a_lost_publish_hears_unavailable_and_the_key_is_free_again() -> None:
    hub = Hub()
    alice = hub.join("/ws?user=alice")
    joined(hub, alice, "r")
    hub.carry_out = False
    publish(alice, "r", 1, key="k", ref="first")
    publish(alice, "r", 1, key="k", ref="second")
    [write] = [e for e in hub.server.effects() if isinstance(e, core.Stored)]
    hub.server.unavailable([write.ack], "store down")
    hub.pump()
    errors = alice.json()
    assert [(e["event"], e["code"], e["ref"]) for e in errors] == [
        ("error", "unavailable", "first"), ("error", "unavailable", "second")]
    hub.carry_out = True
    publish(alice, "r", 1, key="k", ref="third")
    [ack] = [e for e in alice.json() if e["event"] == "ack"]
    assert ack["id"] != write.message["id"] and stored(hub, "r") == [1]


def test_a_key_from_another_instance_is_known_and_never_shown_to_members() -> None:
    hub = Hub()
    alice, bob = hub.join("/ws?user=alice"), hub.join("/chat/r?user=bob")
    joined(hub, alice, "r")
    bob.json()
    remote = {"event": "message", "room": "r", "user": "alice", "data": "from B", "id": "0" * 12 + "000001beef",
              "ts": 1, "key": "k"}
    hub.server.deliver("r", remote, node="beef")
    hub.pump()
    [got] = messages(bob)
    assert "key" not in got and remote["key"] == "k"  # no member sees it; the store gets it (its unique index)
    publish(alice, "r", "from B", key="k", ref=1)
    [ack] = [e for e in alice.json() if e["event"] == "ack"]
    assert ack["id"] == remote["id"] and messages(bob) == []


def test_a_keyed_publish_tells_the_other_instances_and_the_store_its_key_but_no_member() -> None:
    hub = Hub(carry_out=False)
    alice, bob = hub.join("/ws?user=alice"), hub.join("/ws?user=bob")
    for peer in (alice, bob):
        peer.send_json({"event": "join", "room": "r", "presence": False})
    publish(alice, "r", 1, key="k")
    effects = hub.server.effects()
    [out] = [e for e in effects if isinstance(e, core.Publish)]
    [write] = [e for e in effects if isinstance(e, core.Stored)]
    assert out.message["key"] == "k" and write.message["key"] == "k"
    assert [e for e in bob.json() if e["event"] == "message"] == [
        {"event": "message", "room": "r", "user": "alice", "data": 1, "id": out.message["id"],
         "ts": out.message["ts"]}]


def test_keys_the_store_kept_are_known_after_a_restart() -> None:
    hub = Hub()
    hub.server.remember_keys([("r", "alice", "k", "0" * 12 + "000000beef", 5)])
    alice = hub.join("/ws?user=alice")
    joined(hub, alice, "r")
    publish(alice, "r", 1, key="k", ref=1)
    [ack] = [e for e in alice.json() if e["event"] == "ack"]
    assert (ack["id"], ack["ts"]) == ("0" * 12 + "000000beef", 5) and stored(hub, "r") == []


@pytest.mark.parametrize("key", [5, "x" * 65, ["k"]])
def test_a_bad_key_is_bad_field(key: Any) -> None:
    hub = Hub()
    alice = hub.join("/ws?user=alice")
    joined(hub, alice, "r")
    publish(alice, "r", 1, key=key)
    [error] = alice.json()
    assert error["code"] == "bad_field" and stored(hub, "r") == []


def test_the_api_publish_with_a_key_answers_the_original_id() -> None:
    hub = Hub(http_routes=api.build([KEY]))
    ws = hub.join("/ws?user=w")
    joined(hub, ws, "news")
    answers = []
    for _ in range(2):
        client = HttpPeer(hub)
        client.feed(request("POST", "/api/publish", {"room": "news", "data": "x", "key": "order-7"}))
        [(status, _, body)] = client.responses()
        answers.append((status, body))
    assert answers[0] == answers[1] and answers[0][0] == 200
    assert [m["data"] for m in messages(ws)] == ["x"] and stored(hub, "news") == ["x"]


def test_keys_are_bounded() -> None:
    hub = Hub(idempotency_keys=2)
    alice = hub.join("/ws?user=alice")
    joined(hub, alice, "r")
    for key in ("a", "b", "c", "a"):
        publish(alice, "r", key, key=key)
    assert stored(hub, "r") == ["a", "b", "c", "a"]  # "a" was forgotten: a third key pushed it out


def test_a_publish_while_the_join_waits_for_the_store_is_sent_and_not_recovered_to_its_sender() -> None:
    hub = Hub()
    bob, last = seen_then_away(hub)
    publish(bob, "r", "missed")
    bob.close()
    hub.advance(0.1)
    carol = hub.join("/ws?user=carol")
    joined(hub, carol, "r")
    hub.carry_out = False
    again = hub.join("/ws?user=alice")
    again.send_json({"event": "join", "room": "r", "since": last["id"]})
    publish(again, "r", "resent while joining", ref="p")  # a client re-sends its unacked publishes at once
    hub.carry_out = True
    hub.pump()
    hub.advance(0.06)
    got = again.json()
    [reply] = [e for e in got if e["event"] == "joined"]
    assert reply["recovered"] is True and [m["data"] for m in reply["messages"]] == ["missed"]
    assert [e["event"] for e in got if e["event"] == "ack"] == ["ack"]
    assert [m["data"] for m in messages(carol)] == ["resent while joining"]


def test_the_api_disconnect_cancels_a_join_waiting_for_the_store() -> None:
    hub = Hub(carry_out=False)
    alice = hub.join("/ws?user=alice")
    alice.send_json({"event": "join", "room": "r", "since": "0" * 22})
    assert hub.server.disconnect("alice", "r", everywhere=False) == 1
    hub.carry_out = True
    hub.advance(0.1)
    assert [e.get("reason") for e in alice.json()] == ["removed"]
    assert not alice.conn.in_room("r") and "r" not in hub.server.rooms


def remote(hub: Hub, room: str, data: Any, node: str = "beef", ms_offset: int = 0) -> dict[str, Any]:
    """A message another instance published ``ms_offset`` ms from the hub's clock, through the broker."""
    ms = int(hub.now * 1000) + ms_offset
    message = {"event": "message", "room": room, "user": "remote", "data": data,
               "id": f"{ms:012x}{0:06x}{node}", "ts": ms}
    hub.server.deliver(room, message, node=node)
    hub.pump()
    return message


def test_another_instance_publishing_around_since_makes_the_order_uncertain() -> None:
    hub = Hub()
    bob, last = seen_then_away(hub)
    remote(hub, "r", "from B at the same moment")  # on the client's old instance it may have come first
    publish(bob, "r", "after")
    again = hub.join("/ws?user=alice")
    reply = joined(hub, again, "r", since=last["id"])
    assert reply["recovered"] is False  # the client pages history and drops what it had
    assert [m["data"] for m in reply["messages"]] == ["seen", "from B at the same moment", "after"]


def test_another_instance_publishing_long_before_or_after_since_is_no_uncertainty() -> None:
    hub = Hub()
    alice, bob = hub.join("/ws?user=alice"), hub.join("/ws?user=bob")
    joined(hub, alice, "r"), joined(hub, bob, "r")
    remote(hub, "r", "long before", ms_offset=-10_000)
    hub.advance(5)
    publish(bob, "r", "seen")
    last = messages(alice)[-1]
    alice.close()
    hub.advance(5)
    remote(hub, "r", "long after")
    again = hub.join("/ws?user=alice")
    reply = joined(hub, again, "r", since=last["id"])
    assert reply["recovered"] is True and [m["data"] for m in reply["messages"]] == ["long after"]


def test_a_tag_that_never_ran_beside_this_instance_is_no_uncertainty() -> None:
    """A restarted single instance: the messages before the restart carry the old tag, which no
    message of this process's lifetime came from."""
    hub = Hub()
    ms = int(hub.now * 1000)
    old = [{"event": "message", "room": "r", "user": "bob", "data": i, "id": f"{ms - 100 + i:012x}{0:06x}dead",
            "ts": ms - 100 + i} for i in range(3)]
    for message in old:
        hub.store.add("r", message)
    bob = hub.join("/ws?user=bob")
    joined(hub, bob, "r")
    publish(bob, "r", "after the restart")
    alice = hub.join("/ws?user=alice")
    reply = joined(hub, alice, "r", since=old[0]["id"])
    assert reply["recovered"] is True and [m["data"] for m in reply["messages"]] == [1, 2, "after the restart"]


def test_every_ring_together_stays_within_recover_memory_and_is_freed_with_its_room() -> None:
    """Many busy rooms (an attacker's, say, 100 per connection) cannot take the memory: past
    --recover-memory the ring that gets a message halves first; a room that empties frees its ring."""
    limit = 64 * 1024
    hub = Hub(recover_memory=limit, rate_limit=0)
    senders = [hub.join(f"/ws?user=s{i}") for i in range(4)]
    for i, peer in enumerate(senders):
        for r in range(25):
            peer.send_json({"event": "join", "room": f"r{i}-{r}", "presence": False})
    body = "x" * 900
    for _ in range(8):
        for i, peer in enumerate(senders):
            for r in range(25):
                publish(peer, f"r{i}-{r}", body)
        assert hub.server.stats()["recovery_ring_bytes"] <= limit + 2 * 1024  # within one message of it
    watcher = hub.join("/ws?user=w")
    reply = joined(hub, watcher, "r0-0", since="0" * 22)
    assert reply["recovered"] is False  # the halved rings cannot promise that much
    for peer in (*senders, watcher):
        peer.close()
    hub.advance(0.1)
    assert hub.server.stats()["recovery_ring_bytes"] == 0 and not hub.server.rooms


def test_what_rings_and_memberships_keep_is_compact_with_orjson() -> None:
    """orjson leaves each output in a buffer of about 4 KiB: the ring keeps the frames that went out and a
    membership a compact copy of its meta, or 200 recent messages would cost 800 KiB a room."""
    import tracemalloc

    from hubbub.server import ORJSON

    hub = Hub(codec=ORJSON, rate_limit=0, max_connections_per_address=0)
    sender, reader = hub.join("/ws?user=s"), hub.join("/ws?user=r")
    joined(hub, sender, "r"), joined(hub, reader, "r")
    members = [hub.join(f"/ws?user=m{i}") for i in range(200)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i, peer in enumerate(members):
            peer.send_json({"event": "join", "room": "r", "presence": False, "meta": {"n": i}})
            peer.json()
        for i in range(200):
            publish(sender, "r", {"n": i})
        for peer in (reader, *members):
            peer.json()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(hub.server.rooms["r"].recent) == 200
    assert grown < 400 * 1024, f"{grown // 1024} KiB for 200 memberships and 200 messages kept"


def test_a_connection_has_at_most_two_store_reads_waiting_the_rest_are_recovered_false_at_once() -> None:
    hub = Hub(carry_out=False, max_rooms_per_connection=10)
    alice = hub.join("/ws?user=alice")
    for i in range(5):
        alice.send_json({"event": "join", "room": f"r{i}", "since": "0" * 22, "presence": False, "ref": i})
    reads = [e for e in hub.server.effects() if isinstance(e, core.History)]
    assert len(reads) == core.RECOVERIES_IN_FLIGHT == 2
    answered = {e["ref"]: e["recovered"] for e in alice.json() if e["event"] == "joined"}
    assert answered == {2: False, 3: False, 4: False}
    for read in reads:
        hub.server.history_reply(read.conn_id, read.room, [], read.ref)
    hub.pump()
    assert {e["ref"] for e in alice.json() if e["event"] == "joined"} == {0, 1}
