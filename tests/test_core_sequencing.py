"""The core with a sequencing broker, no sockets: a publish waits for the broker's order
(``PublishOrdered``) and is delivered, stored and acked when it comes back (``deliver_sequenced``)
with the broker's id; past an outage (``order_through_broker(False)``) what waited is delivered here
with its own ids; recovery trusts the broker's order and stays honest about the rest."""

from __future__ import annotations

import json
from typing import Any

from hubbub import core
from tests.hub import Hub
from tests.test_core_recovery import joined, messages, publish


def ordering_hub() -> Hub:
    hub = Hub(node="aaaa")
    hub.server.order_through_broker(True)
    return hub


def come_back(hub: Hub, start_ms: int) -> list[str]:
    """Play the broker: every ``PublishOrdered`` not yet returned comes back, in order, at positions from
    ``start_ms`` on (as the broker's subscription brings it: a decoded copy); returns their ids."""
    ids = []
    for n, effect in enumerate(e for e in hub.effects if isinstance(e, core.PublishOrdered)):
        if n < getattr(hub, "returned", 0):
            continue
        position = f"{start_ms + n:012x}000000"
        hub.server.deliver_sequenced(effect.room, json.loads(json.dumps(effect.message)), "aaaa", position)
        ids.append(position + core.SEQUENCED_TAG)
        hub.returned = n + 1  # type: ignore[attr-defined]
    hub.pump()
    return ids


def others(hub: Hub, room: str, data: Any, position: str, node: str = "bbbb") -> None:
    """Another instance's message, ordered by the broker."""
    message = {"event": "message", "room": room, "user": "carol", "data": data, "id": "x", "ts": 1}
    hub.server.deliver_sequenced(room, message, node, position)
    hub.pump()


def test_a_publish_waits_for_the_order_then_is_delivered_stored_and_acked_with_the_brokers_id() -> None:
    hub = ordering_hub()
    alice, bob = hub.join("/ws?user=alice"), hub.join("/ws?user=bob")
    joined(hub, alice, "r"), joined(hub, bob, "r")
    publish(alice, "r", "hi", ref=1)
    hub.pump()
    assert messages(bob) == [] and hub.store.history("r", 10) == []
    assert [e for e in alice.json() if e["event"] == "ack"] == []
    assert not any(isinstance(e, (core.Stored, core.Publish)) for e in hub.effects)
    others(hub, "r", "first", "000000000001000000")  # another instance's, ordered before ours
    [message_id] = come_back(hub, 2)
    assert [(m["data"], m["id"]) for m in messages(bob)] == [("first", "000000000001000000~"), ("hi", message_id)]
    assert [(e["event"], e["id"]) for e in alice.json() if e["event"] != "message"] == [("ack", message_id)]
    assert [m["id"] for m in hub.store.history("r", 10)] == [message_id]  # another instance's is its to store
    come_back(hub, 9)  # nothing more waits
    assert messages(bob) == []


def test_a_keyed_repeat_is_acked_with_the_ordered_id_and_ordered_once() -> None:
    hub = ordering_hub()
    alice, bob = hub.join("/ws?user=alice"), hub.join("/ws?user=bob")
    joined(hub, alice, "r"), joined(hub, bob, "r")
    publish(alice, "r", "once", ref=1, key="k")
    publish(alice, "r", "once", ref=2, key="k")  # the ack was lost: sent again while the first waits
    [message_id] = come_back(hub, 5)
    acks = [(e["ref"], e["id"]) for e in alice.json() if e["event"] == "ack"]
    assert acks == [(1, message_id), (2, message_id)]
    publish(alice, "r", "once", ref=3, key="k")  # and after
    assert [(e["ref"], e["id"]) for e in alice.json() if e["event"] == "ack"] == [(3, message_id)]
    assert [m["data"] for m in messages(bob)] == ["once"]
    assert len([e for e in hub.effects if isinstance(e, core.PublishOrdered)]) == 1


def test_past_an_outage_what_waited_is_delivered_here_with_its_own_ids() -> None:
    hub = ordering_hub()
    alice, bob = hub.join("/ws?user=alice"), hub.join("/ws?user=bob")
    joined(hub, alice, "r"), joined(hub, bob, "r")
    publish(alice, "r", 1, ref=1)
    publish(alice, "r", 2, ref=2)
    hub.server.order_through_broker(False)
    hub.pump()
    got = messages(bob)
    assert [m["data"] for m in got] == [1, 2] and all(m["id"].endswith("aaaa") for m in got)
    assert [(e["ref"], e["id"]) for e in alice.json() if e["event"] == "ack"] == [(1, got[0]["id"]), (2, got[1]["id"])]
    publish(alice, "r", 3, ref=3)  # and until it orders again, as without a sequencing broker
    hub.pump()
    assert [m["data"] for m in messages(bob)] == [3]
    assert sum(isinstance(e, core.Publish) for e in hub.effects) == 1
    come_back(hub, 0)  # the broker had ordered them after all: already delivered here, dropped
    assert messages(bob) == []


def test_recovery_trusts_the_brokers_order_and_not_an_outages() -> None:
    hub = ordering_hub()
    alice, bob = hub.join("/ws?user=alice"), hub.join("/ws?user=bob")
    joined(hub, alice, "r"), joined(hub, bob, "r")
    ms = int(hub.now * 1000)
    others(hub, "r", "seen", f"{ms:012x}000000")
    [seen] = messages(alice)
    alice.close()
    others(hub, "r", "near", f"{ms:012x}000001", node="cccc")  # another instance's, a moment later
    publish(bob, "r", "mine")
    come_back(hub, ms + 1)
    again = hub.join("/ws?user=alice")
    reply = joined(hub, again, "r", since=seen["id"])
    assert reply["recovered"] is True and [m["data"] for m in reply["messages"]] == ["near", "mine"]
    # an outage: another instance's message with its own id (unordered) near since: not promised
    hub.server.deliver("r", {"event": "message", "room": "r", "user": "dave", "data": "unordered",
                             "id": f"{ms:012x}000005dddd", "ts": 1}, "dddd")
    hub.pump()
    last = messages(again)[-1]
    again.close()
    later = hub.join("/ws?user=alice")
    assert joined(hub, later, "r", since=last["id"])["recovered"] is False


def test_a_key_sent_again_to_another_instance_is_kept_once_in_the_order_everywhere() -> None:
    """A publish re-sent with its key to this instance before the original (from another instance) came
    through the broker: whichever the broker ordered first is kept, on every instance alike; the other
    is neither delivered nor stored, and its sender is acked with the first one's id."""
    hub = ordering_hub()
    alice, bob = hub.join("/ws?user=alice"), hub.join("/ws?user=bob")
    joined(hub, alice, "r"), joined(hub, bob, "r")
    publish(alice, "r", "again", ref=1, key="k")  # alice's first try went to the other instance
    original = {"event": "message", "room": "r", "user": "alice", "data": "again", "id": "x", "ts": 5, "key": "k"}
    hub.server.deliver_sequenced("r", original, "bbbb", "000000000001000000")  # ordered first
    hub.pump()
    come_back(hub, 2)  # ours, second: a repeat
    assert [(m["data"], m["id"]) for m in messages(bob)] == [("again", "000000000001000000~")]
    assert [(e["ref"], e["id"]) for e in alice.json() if e["event"] == "ack"] == [(1, "000000000001000000~")]
    assert hub.store.history("r", 10) == []  # the other instance stores its own
    repeat = {**original, "id": "y"}  # and the other instance's copy of ours, ordered second, is dropped too
    assert hub.server.deliver_sequenced("r", repeat, "bbbb", "000000000003000000") is None
