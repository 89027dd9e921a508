"""The core's side of scale-out, stores and auth, byte for byte through the in-memory Hub."""

from __future__ import annotations

import time

import jwt
import pytest
from wsproto.events import CloseConnection

from hubbub import core
from hubbub.backends.auth import jwt_verifier
from tests.hub import Hub

SECRET = "test-secret-that-is-long-enough-for-hs256"


def token(**claims: object) -> str:
    return jwt.encode({"sub": "alice", **claims}, SECRET, algorithm="HS256")


# -- acks mean stored ----------------------------------------------------------


def test_ack_waits_for_the_store_and_others_get_the_message_at_once() -> None:
    hub = Hub(carry_out=False)
    alice, bob = hub.join("/chat/r?user=alice"), hub.join("/chat/r?user=bob")
    alice.send_json({"event": "message", "text": "hi", "ref": 7})
    assert [e["text"] for e in bob.json()] == ["hi"]
    assert alice.json() == []  # not stored yet: no ack
    [stored] = [e for e in hub.server.effects() if isinstance(e, core.Stored)]
    assert stored.ack == core.Ack(alice.conn.id, 7, stored.message["id"])
    hub.server.ack([stored.ack])
    hub.pump()
    assert alice.json() == [{"event": "ack", "ref": 7, "id": stored.message["id"]}]


def test_a_message_the_store_lost_is_reported_unavailable() -> None:
    hub = Hub(carry_out=False)
    alice = hub.join("/chat/r?user=alice")
    alice.send_json({"event": "message", "text": "hi", "ref": "a"})
    [stored] = [e for e in hub.server.effects() if isinstance(e, core.Stored)]
    hub.server.unavailable([stored.ack], "store down")
    hub.pump()
    [error] = alice.json()
    assert error == {"event": "error", "code": "unavailable", "detail": "store down", "ref": "a",
                     "id": stored.message["id"]}


def test_while_the_store_is_down_messages_are_refused_and_healthz_says_503() -> None:
    hub = Hub()
    alice, bob = hub.join("/chat/r?user=alice"), hub.join("/chat/r?user=bob")
    hub.server.set_available("store", False)
    alice.send_json({"event": "message", "text": "hi", "ref": 1})
    assert alice.json()[0]["code"] == "unavailable"
    assert bob.json() == []
    assert core.healthz(hub.server, {})[0] == 503
    hub.server.set_available("store", True)
    alice.send_json({"event": "message", "text": "hi", "ref": 2})
    assert alice.events() == ["ack"]
    assert core.healthz(hub.server, {})[0] == 200


def test_history_pages_with_before() -> None:
    hub = Hub()
    alice = hub.join("/chat/r?user=alice")
    for i in range(5):
        alice.send_json({"event": "message", "text": str(i)})
        hub.now += 0.001
    alice.send_json({"event": "history", "limit": 2})
    [page] = alice.json()
    assert [m["text"] for m in page["messages"]] == ["3", "4"]
    alice.send_json({"event": "history", "limit": 2, "before": page["messages"][0]["id"]})
    assert [m["text"] for m in alice.json()[0]["messages"]] == ["1", "2"]


# -- the broker: publish, deliver once, in order --------------------------------


def test_a_message_is_published_and_deliver_ignores_our_own_and_repeats() -> None:
    hub = Hub(node="aaaa")
    bob = hub.join("/chat/r?user=bob")
    carol = hub.join("/chat/r?user=carol")
    carol.send_json({"event": "message", "text": "local"})
    bob.json()
    [publish] = [e for e in hub.effects if isinstance(e, core.Publish)]
    assert publish.room == "r" and publish.message["text"] == "local"
    server = hub.server
    assert server.deliver("r", publish.message, "aaaa") is None  # our own, back from the broker
    remote = [{"event": "message", "room": "r", "user": "x", "text": str(i), "id": f"{i:018x}bbbb"} for i in range(3)]
    assert server.deliver("r", remote[0], "bbbb") == 2
    assert server.deliver("r", remote[1], "bbbb") == 2
    assert server.deliver("r", remote[0], "bbbb") is None  # a replay after an outage
    assert server.deliver("r", remote[2], "bbbb") == 2
    hub.pump()
    assert [e["text"] for e in bob.json()] == ["0", "1", "2"]
    assert server.metrics.duplicates == 1


# -- presence across instances ----------------------------------------------------


def test_presence_spans_instances_and_a_silent_instance_expires() -> None:
    hub = Hub(node="aaaa", presence_ttl=3.0)
    alice = hub.join("/presence?user=alice")
    hub.advance(0.1)
    assert alice.json() == [{"event": "presence_state", "users": ["alice"]}]
    assert any(isinstance(e, core.PresenceChanged) for e in hub.effects)
    assert hub.server.local_presence() == {"presence": ["alice"]}
    hub.server.remote_presence("bbbb", {"presence": ["bob", "alice"]}, hub.now)
    hub.advance(0.1)
    assert alice.json() == [{"event": "presence_diff", "joins": ["bob"], "leaves": []}]
    carol = hub.join("/presence?user=carol")
    hub.advance(0.1)
    assert carol.json()[0]["users"] == ["alice", "bob", "carol"]
    hub.advance(2.0)
    hub.server.remote_presence("bbbb", {"presence": ["bob", "alice"]}, hub.now)  # heartbeat
    hub.advance(2.5)
    assert "bob" in hub.server.presence("presence")
    hub.advance(1.0)  # 3 s since the last heartbeat
    assert hub.server.presence("presence") == ["alice", "carol"]
    hub.advance(0.1)  # the presence window
    diffs = [e for e in alice.json() if e["event"] == "presence_diff"]
    assert diffs[-1] == {"event": "presence_diff", "joins": [], "leaves": ["bob"]}


def test_a_user_on_two_instances_stays_present_until_both_leave() -> None:
    hub = Hub(node="aaaa")
    watcher = hub.join("/presence?user=watcher")
    alice = hub.join("/presence?user=alice")
    hub.server.remote_presence("bbbb", {"presence": ["alice"]}, hub.now)
    hub.advance(0.1)
    watcher.json()
    alice.feed(alice.client.send(CloseConnection(1000)))
    hub.advance(0.1)
    assert watcher.json() == []  # still on bbbb
    hub.server.remote_presence("bbbb", None, hub.now)  # bbbb says goodbye
    hub.advance(0.1)
    assert watcher.json() == [{"event": "presence_diff", "joins": [], "leaves": ["alice"]}]


# -- JWT at the handshake -----------------------------------------------------------


@pytest.fixture
def auth_hub() -> Hub:
    return Hub(verifier=jwt_verifier(secret=SECRET, audience="hubbub"))


def test_a_valid_token_makes_sub_the_user(auth_hub: Hub) -> None:
    t = token(aud="hubbub", exp=int(time.time()) + 600)
    alice = auth_hub.join(f"/chat/r?user=mallory&token={t}")
    assert alice.accepted and alice.conn.user == "alice"
    bearer = auth_hub.join("/chat/r", headers=[(b"authorization", f"Bearer {t}".encode())])
    assert bearer.accepted and bearer.conn.user == "alice"


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "not-a-jwt",
        jwt.encode({"sub": "alice", "aud": "hubbub", "exp": 1}, SECRET, algorithm="HS256"),  # expired
        jwt.encode({"sub": "alice", "aud": "hubbub"}, "another-secret-of-enough-length-1234", algorithm="HS256"),
        jwt.encode({"sub": "alice", "aud": "other"}, SECRET, algorithm="HS256"),
        jwt.encode({"sub": "alice", "aud": "hubbub"}, None, algorithm="none"),
        jwt.encode({"aud": "hubbub"}, SECRET, algorithm="HS256"),  # no sub
    ],
    ids=["missing", "garbage", "expired", "wrong-signature", "wrong-audience", "alg-none", "no-sub"],
)
def test_a_bad_token_is_refused_with_401(auth_hub: Hub, bad: str) -> None:
    peer = auth_hub.join(f"/chat/r?token={bad}" if bad else "/chat/r")
    assert peer.rejected == 401
    assert auth_hub.server.metrics.rejections == {401: 1}


def test_the_rooms_claim_limits_rooms_with_403(auth_hub: Hub) -> None:
    t = token(aud="hubbub", rooms=["team-*", "lobby"])
    assert auth_hub.join(f"/chat/team-red?token={t}").accepted
    assert auth_hub.join(f"/chat?token={t}").accepted
    assert auth_hub.join(f"/chat/secret?token={t}").rejected == 403


def test_a_token_that_expires_while_connected_closes_1008(auth_hub: Hub) -> None:
    auth_hub.now = time.time()
    t = token(aud="hubbub", exp=int(auth_hub.now) + 30)
    alice = auth_hub.join(f"/chat/r?token={t}")
    assert alice.accepted
    auth_hub.advance(29)
    assert alice.closed_with is None
    auth_hub.advance(2)
    assert alice.closed_with == 1008
