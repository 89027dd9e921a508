"""Several real ``server.py`` processes sharing Redis or NATS, real stores, real tokens.

Each test uses its own broker channel, rooms and database schema, so parallel runs never meet.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import jwt
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.servers import RunningServer, spawn_server
from tests.services import (
    DATABASE_URL,
    NATS_URL,
    REDIS_URL,
    drop_schema,
    postgres_schema,
    private_redis,
    recv_json,
    recv_until,
    require,
    unique,
)

FAST_PRESENCE = ("--presence-heartbeat", "0.3", "--presence-ttl", "1.5", "--rate-limit", "0")


@pytest.fixture(params=["redis", "nats"])
def broker_url(request: pytest.FixtureRequest) -> str:
    if request.param == "redis":
        return require(REDIS_URL, 6379, "Redis")
    return require(NATS_URL, 4222, "NATS")


@contextmanager
def instances(broker: str, n: int = 2, *extra: str) -> Iterator[list[RunningServer]]:
    channel = unique("test")
    with ExitStack() as stack:
        yield [
            stack.enter_context(spawn_server("--broker", broker, "--broker-channel", channel, *FAST_PRESENCE, *extra))
            for _ in range(n)
        ]


def wait_presence(ws: object, users: set[str]) -> None:
    """Ask for the presence list until it is exactly ``users`` (heartbeats take a moment)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ws.send('{"event":"list"}')  # type: ignore[attr-defined]
        state = recv_until(ws, lambda e: e["event"] == "presence_state")
        if set(state["users"]) == users:
            return
        time.sleep(0.1)
    raise AssertionError(f"presence never became {users}")


def test_two_instances_deliver_every_message_once_in_order(broker_url: str) -> None:
    room = unique("room")
    n = 300
    with instances(broker_url) as (a, b):
        with connect(f"{a.url}/chat/{room}?user=alice") as alice, connect(f"{b.url}/chat/{room}?user=bob") as bob, \
                connect(f"{b.url}/presence?user=bob") as watch:
            wait_presence(watch, {"bob"})  # both instances are subscribed once B has answered
            with connect(f"{a.url}/presence?user=alice"):
                wait_presence(watch, {"alice", "bob"})
            for i in range(n):
                alice.send(json.dumps({"event": "message", "text": f"a{i}", "ref": i}))
                bob.send(json.dumps({"event": "message", "text": f"b{i}"}))
            got_bob = [recv_json(bob)["text"] for _ in range(n)]
            got_alice = [e["text"] for e in (recv_json(alice) for _ in range(2 * n)) if e["event"] == "message"]
            assert got_bob == [f"a{i}" for i in range(n)]
            assert got_alice == [f"b{i}" for i in range(n)]
            for ws in (alice, bob):  # and nothing more: no copy came back through the broker
                ws.send('{"event":"history","limit":1}')
                assert recv_json(ws)["event"] == "history"


def test_presence_spans_instances_and_a_killed_instance_drops_out(broker_url: str) -> None:
    with instances(broker_url) as (a, b):
        with connect(f"{b.url}/presence?user=bob") as watch:
            carol = connect(f"{a.url}/presence?user=carol")
            wait_presence(watch, {"bob", "carol"})
            with connect(f"{a.url}/presence?user=dave") as dave:
                wait_presence(dave, {"bob", "carol", "dave"})
            a.process.send_signal(signal.SIGKILL)
            a.process.wait()
            # The bound is --presence-ttl (1.5 s) plus the presence window; the timeout only stops a hung test.
            leave = recv_until(watch, lambda e: e["event"] == "presence_diff" and "carol" in e["leaves"])
            assert leave["joins"] == []
            wait_presence(watch, {"bob"})
            carol.close_socket()


def test_a_graceful_stop_removes_its_users_at_once(broker_url: str) -> None:
    with instances(broker_url, 2, "--presence-ttl", "60") as (a, b):
        with connect(f"{b.url}/presence?user=bob") as watch, connect(f"{a.url}/presence?user=erin"):
            wait_presence(watch, {"bob", "erin"})
            # `list` sees erin at once; let the presence window (0.05 s) that announces her close first,
            # or a quick goodbye lands in the same window and the join and leave cancel out.
            time.sleep(0.3)
            assert a.stop() == 0  # SIGTERM: close 1001, goodbye through the broker
            recv_until(watch, lambda e: e["event"] == "presence_diff" and e["leaves"] == ["erin"])


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_history_survives_a_restart_and_pages_with_before(store: str, tmp_path: Path) -> None:
    schema = None
    if store == "sqlite":
        url = f"sqlite:///{tmp_path / 'history.db'}"
    else:
        url, schema = postgres_schema(require(DATABASE_URL, 5432, "PostgreSQL"))
    room = unique("room")
    try:
        with spawn_server("--store", url, "--rate-limit", "0") as server:
            with connect(f"{server.url}/chat/{room}?user=alice") as alice:
                for i in range(7):
                    alice.send(json.dumps({"event": "message", "text": f"m{i}", "ref": i}))
                acks = [recv_json(alice) for _ in range(7)]
                assert [a["ref"] for a in acks] == list(range(7))
        with spawn_server("--store", url) as server:
            with connect(f"{server.url}/chat/{room}?user=bob") as bob:
                bob.send('{"event":"history","limit":3}')
                page = recv_json(bob)["messages"]
                assert [m["text"] for m in page] == ["m4", "m5", "m6"]
                assert [m["id"] for m in page] == [a["id"] for a in acks[4:]]
                bob.send(json.dumps({"event": "history", "limit": 3, "before": page[0]["id"]}))
                assert [m["text"] for m in recv_json(bob)["messages"]] == ["m1", "m2", "m3"]
                bob.send(json.dumps({"event": "history", "limit": 3, "before": acks[1]["id"]}))
                assert [m["text"] for m in recv_json(bob)["messages"]] == ["m0"]
    finally:
        if schema is not None:
            drop_schema(DATABASE_URL, schema)


def test_an_unreachable_store_answers_unavailable_and_healthz_503() -> None:
    with spawn_server("--store", "postgresql://postgres@127.0.0.1:1/test") as server:
        deadline = time.monotonic() + 20
        while (status := _get_status(f"{server.http}/healthz"))[0] != 503:  # the first probe at startup
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert json.loads(status[1])["backends"]["store"] == "down"
        with connect(f"{server.url}/chat/{unique('room')}?user=alice") as alice, \
                connect(f"{server.url}/chat/{unique('room')}?user=bob"):
            alice.send('{"event":"message","text":"hi","ref":1}')
            refused = recv_json(alice)
            assert (refused["event"], refused["code"], refused["ref"]) == ("error", "unavailable", 1)
            alice.send('{"event":"history","limit":3}')
            assert recv_json(alice)["code"] == "unavailable"


def test_metrics_in_prometheus_text_format() -> None:
    with spawn_server("--store", "memory") as server:
        with connect(f"{server.url}/chat/{unique('room')}?user=alice") as alice:
            alice.send('{"event":"message","text":"hi","ref":1}')
            recv_json(alice)
            body = urllib.request.urlopen(f"{server.http}/metrics", timeout=10).read().decode()
    assert 'hubbub_connections{route="chat"} 1.0' in body
    assert 'hubbub_messages_received_total{route="chat"} 1.0' in body
    assert 'hubbub_backend_up{backend="store"} 1.0' in body
    assert 'hubbub_backend_seconds_count{backend="store",op="write"} 1.0' in body


SECRET = "integration-secret-that-is-long-enough"


def test_jwt_over_real_sockets() -> None:
    good = jwt.encode({"sub": "alice", "iss": "me", "rooms": ["ok-*"], "exp": int(time.time()) + 600},
                      SECRET, algorithm="HS256")
    expired = jwt.encode({"sub": "alice", "iss": "me", "exp": int(time.time()) - 10}, SECRET, algorithm="HS256")
    with spawn_server("--store", "memory", "--jwt-secret", SECRET, "--jwt-issuer", "me") as server:
        with connect(f"{server.url}/chat/ok-1?user=mallory&token={good}") as ws:
            ws.send('{"event":"message","text":"hi","ref":1}')
            assert recv_json(ws)["event"] == "ack"
        with connect(f"{server.url}/chat/ok-2", additional_headers={"Authorization": f"Bearer {good}"}):
            pass
        for target, status in [(f"/chat/ok-1?token={expired}", 401), ("/chat/ok-1", 401),
                               (f"/chat/secret?token={good}", 403)]:
            with pytest.raises(InvalidStatus) as refused:
                connect(server.url + target)
            assert refused.value.response.status_code == status


def test_jwt_public_key_rs256(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "key.pem").write_bytes(pem)
    token = jwt.encode({"sub": "alice", "aud": "hub"}, key, algorithm="RS256")
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode({"sub": "alice", "aud": "hub"}, other, algorithm="RS256")
    with spawn_server("--store", "memory", "--jwt-public-key", str(tmp_path / "key.pem"), "--jwt-audience", "hub") \
            as server:
        with connect(f"{server.url}/presence?token={token}") as ws:
            assert recv_json(ws)["users"] == ["alice"]
        with pytest.raises(InvalidStatus):
            connect(f"{server.url}/presence?token={forged}")


def test_redis_outage_the_server_survives_and_no_acked_message_is_lost(tmp_path: Path) -> None:
    room = unique("room")
    channel = unique("test")
    with private_redis(tmp_path) as redis, ExitStack() as stack:
        a, b = (
            stack.enter_context(spawn_server(
                "--broker", redis.url, "--broker-channel", channel, "--store", f"sqlite:///{tmp_path / name}.db",
                *FAST_PRESENCE,
            ))
            for name in ("a", "b")
        )
        with connect(f"{a.url}/chat/{room}?user=alice") as alice, connect(f"{b.url}/chat/{room}?user=bob") as bob, \
                connect(f"{b.url}/presence?user=bob") as watch:
            with connect(f"{a.url}/presence?user=alice"):
                wait_presence(watch, {"alice", "bob"})  # A and B both hear each other through Redis
            acked: list[str] = []

            def send(start: int, count: int) -> None:
                for i in range(start, start + count):
                    alice.send(json.dumps({"event": "message", "text": f"m{i}", "ref": i}))
                for _ in range(count):
                    event = recv_json(alice)
                    assert event["event"] == "ack", event
                    acked.append(event["id"])

            send(0, 20)
            redis.stop()
            send(20, 20)  # Redis is down: messages are still stored and acked, and wait for the broker
            status, body = _get_status(f"{a.http}/healthz")
            assert status == 503 and json.loads(body)["backends"] == {"broker": "down", "store": "up"}
            redis.start()
            _wait_healthy(a.http)
            _wait_healthy(b.http)
            send(40, 20)
            alice.send('{"event":"history","limit":100}')
            assert [m["id"] for m in recv_json(alice)["messages"]] == acked  # every acked message, in order
            # B got every message exactly once and in order, those sent during the outage included
            # (A's queue and replay ring); nothing follows but the answer to our history request.
            got = [recv_json(bob)["id"] for _ in range(60)]
            assert got == acked
            bob.send('{"event":"history","limit":100}')
            assert [m["id"] for m in recv_json(bob)["messages"]] == acked  # B's own store has them too
        assert a.process.poll() is None and b.process.poll() is None


def _get_status(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _wait_healthy(http: str) -> None:
    deadline = time.monotonic() + 20
    while _get_status(f"{http}/healthz")[0] != 200:
        assert time.monotonic() < deadline, "never reconnected"
        time.sleep(0.1)


def test_a_subscriber_that_drops_out_gets_what_it_missed_replayed(tmp_path: Path) -> None:
    """Redis forgets pub/sub messages nobody is subscribed to; the publisher's replay ring fills the gap."""
    import redis as redis_client

    room = unique("room")
    channel = unique("test")
    with private_redis(tmp_path) as redis, ExitStack() as stack:
        a, b = (
            stack.enter_context(spawn_server(
                "--broker", redis.url, "--broker-channel", channel, "--store", "memory", *FAST_PRESENCE,
            ))
            for _ in range(2)
        )
        with connect(f"{a.url}/chat/{room}?user=alice") as alice, connect(f"{b.url}/chat/{room}?user=bob") as bob, \
                connect(f"{b.url}/presence?user=bob") as watch:
            with connect(f"{a.url}/presence?user=alice"):
                wait_presence(watch, {"alice", "bob"})
            ids = []
            for i in range(60):
                if i in (10, 25, 40):  # every subscriber connection goes; the publishing connections stay
                    redis_client.Redis.from_url(redis.url).client_kill_filter(_type="pubsub")
                alice.send(json.dumps({"event": "message", "text": f"m{i}", "ref": i}))
                ids.append(recv_json(alice)["id"])
            got = [recv_json(bob)["id"] for _ in range(60)]
            assert got == ids


def test_the_database_going_away_and_coming_back_loses_no_acked_message() -> None:
    from tests.services import CuttableProxy

    base = require(DATABASE_URL, 5432, "PostgreSQL")
    parts = urlsplit(base)
    proxy = CuttableProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    proxy.start()
    url, schema = postgres_schema(base)
    url = url.replace(parts.netloc, f"{parts.username + '@' if parts.username else ''}127.0.0.1:{proxy.port}")
    room = unique("room")
    try:
        with spawn_server("--store", url, "--rate-limit", "0") as server, \
                connect(f"{server.url}/chat/{room}?user=alice") as alice:
            outcome: dict[str, list[str]] = {"ack": [], "error": []}

            def send(start: int, count: int) -> None:
                for i in range(start, start + count):
                    alice.send(json.dumps({"event": "message", "text": f"m{i}", "ref": i}))
                for _ in range(count):
                    event = recv_json(alice, 30)
                    outcome[event["event"]].append(event.get("id", ""))

            send(0, 10)
            proxy.cut()
            send(10, 10)  # the first batch fails, is retried, then given up; then messages are refused
            assert _get_status(f"{server.http}/healthz")[0] == 503
            proxy.start()
            _wait_healthy(server.http)
            send(20, 10)
            assert (len(outcome["ack"]), len(outcome["error"])) == (20, 10)  # the ten sent while it was down
            alice.send('{"event":"history","limit":100}')
            stored = [m["id"] for m in recv_json(alice)["messages"]]
            assert set(outcome["ack"]) <= set(stored)  # every acked message is in the database
        assert server.process.returncode == 0
    finally:
        proxy.cut()
        drop_schema(base, schema)
