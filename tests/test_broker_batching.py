"""The broker path batched: what one instance publishes while its sender is busy leaves as one
envelope, is decoded once on the other side, and keeps every v1 guarantee (exactly once, in order per
publisher, replay after gaps, repeats dropped, strict JSON out, one bad item costing only itself).

The envelope logic runs against a broker whose ``_send`` is recorded; the wire against the real Redis
and NATS (tests/services.py), and the whole path through two real ``server.py`` processes.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import anyio
import orjson
import pytest
from websockets.sync.client import connect

from hubbub.backends.broker import BrokerUnavailable, NatsBroker, PubSubBroker, RedisBroker
from tests.conftest import start_in_process
from tests.services import NATS_URL, REDIS_URL, private_redis, recv_json, require, unique


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


class Sink:
    """Records what a broker delivers."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, str, Any]] = []  # (node, room, message id)
        self.sequenced: list[tuple[str, Any, str]] = []  # (node, message id there, position in the order)
        self.status: list[bool] = []
        self.sequencing: list[bool] = []

    def on_message(self, room: str, message: Mapping[str, Any], node: str) -> None:
        self.messages.append((node, room, message.get("id")))

    def on_sequenced(self, room: str, message: Mapping[str, Any], node: str, position: str) -> None:
        self.sequenced.append((node, message.get("id"), position))

    def on_sequencing(self, on: bool) -> None:
        self.sequencing.append(on)

    def on_presence(self, node: str, rooms: Mapping[str, Sequence[str]] | None) -> None:
        pass

    def on_sync(self) -> None:
        pass

    def on_broker_status(self, up: bool) -> None:
        self.status.append(up)


class Recorded(PubSubBroker):
    """A broker whose wire is a list: ``_send`` records each round's envelopes; ``_listen`` yields ``feed``."""

    def __init__(self, node: str = "A", feed: Sequence[bytes] = (), **kwargs: Any) -> None:
        super().__init__("test://", node, **kwargs)
        self.rounds: list[list[bytes]] = []
        self.feed = feed

    async def _open(self) -> None:
        pass

    async def _send(self, batch: list[bytes], presence: bool = False) -> None:
        self.rounds.append(batch)

    async def _listen(self) -> AsyncIterator[bytes]:
        for data in self.feed:
            yield data
        await anyio.sleep_forever()

    async def _close(self) -> None:
        pass

    def sent(self) -> list[dict[str, Any]]:
        """Every message envelope sent so far, decoded (hellos and heartbeats left out)."""
        return [e for batch in self.rounds for e in map(orjson.loads, batch) if "b" in e]


def message(i: int, node: str = "A") -> dict[str, Any]:
    return {"event": "message", "room": "r", "user": "u", "text": f"m{i}", "id": f"{i:012x}000000{node}", "ts": 1}


def batch(first: int, ids: Sequence[int], node: str = "B", room: str = "r") -> bytes:
    return orjson.dumps({"n": node, "q": first, "b": [{"r": room, "m": message(i, node)} for i in ids]})


def delivered(sink: Sink) -> list[int]:
    return [int(mid[:12], 16) for _, _, mid in sink.messages]


@pytest.mark.anyio
async def test_what_is_published_in_one_pass_leaves_as_one_envelope() -> None:
    broker = Recorded()
    async with anyio.create_task_group() as tg:
        await tg.start(broker.run, Sink())
        broker.rounds.clear()  # the hello
        for i in range(300):  # one loop pass: nothing awaits between these
            broker.publish("r", message(i))
        broker.publish_presence({"lobby": ["alice"]})
        with anyio.fail_after(5):
            while not broker.sent():
                await anyio.sleep(0.001)
        tg.cancel_scope.cancel()
    assert len(broker.rounds) == 1  # one round trip: one batch envelope and one heartbeat
    envelope, heartbeat = map(orjson.loads, broker.rounds[0])
    assert envelope["n"] == "A" and envelope["q"] == 1
    assert [item["m"]["text"] for item in envelope["b"]] == [f"m{i}" for i in range(300)]
    assert all(item["r"] == "r" for item in envelope["b"])
    assert heartbeat == {"n": "A", "p": {"lobby": ["alice"]}}
    assert (broker.batches_out, broker.messages_out) == (1, 300)


def test_envelopes_split_by_count_by_bytes_and_at_holes() -> None:
    broker = Recorded(batch_messages=4, batch_bytes=600)
    items = [(seq, orjson.dumps({"r": "r", "m": message(seq)})) for seq in (1, 2, 3, 4, 5, 6, 9, 10)]
    envelopes = [orjson.loads(e) for e in broker._envelopes(items)]
    assert [(e["q"], len(e["b"])) for e in envelopes] == [(1, 4), (5, 2), (9, 2)]  # count, then the hole at 7
    big = [(seq, orjson.dumps({"r": "r", "m": {**message(seq), "text": "x" * 200}})) for seq in range(1, 6)]
    broker.batch_bytes = 2 * len(big[0][1]) + 2  # two items and their comma fit, three do not
    sizes = [len(orjson.loads(e)["b"]) for e in broker._envelopes(big)]
    assert sizes == [2, 2, 1] and all(len(e) <= broker.batch_bytes + 64 for e in broker._envelopes(big))
    alone = [(1, orjson.dumps({"r": "r", "m": {**message(1), "text": "y" * 2000}}))]
    assert len(broker._envelopes(alone)) == 1  # one message larger than a batch still goes, alone


def test_outgoing_items_stay_strict_json_and_a_bad_one_takes_no_sequence_number() -> None:
    broker = Recorded()
    broker.publish("r", {"id": "1", "score": math.inf})  # orjson would write null: the strict encoder refuses
    broker.publish("r", {"id": "2", "nested": {"deep": [math.nan]}})
    broker.publish("r", {"id": "3", "text": "\udc80"})
    broker.publish("r", {"id": "4", "none": None})  # a real null is fine
    broker.publish("r", {"id": "5", 7: "an int key, which the standard library writes as a string"})
    assert broker.failures == 3
    assert [seq for seq, _ in broker._queue] == [1, 2]
    items = [json.loads(item) for _, item in broker._queue]
    assert items == [{"r": "r", "m": {"id": "4", "none": None}},
                     {"r": "r", "m": {"id": "5", "7": "an int key, which the standard library writes as a string"}}]
    broker.max_item = 100
    broker.publish("r", {"id": "6", "text": "z" * 200})  # more than the broker takes: dropped, counted
    assert broker.failures == 4 and broker.queued == 2


@pytest.mark.anyio
async def test_a_batch_is_delivered_once_in_order_and_repeats_are_dropped() -> None:
    feed = [batch(1, range(1, 6)), batch(3, range(3, 9)), batch(1, range(1, 9)), batch(9, [9])]
    broker = Recorded(feed=feed)
    sink = Sink()
    async with anyio.create_task_group() as tg:
        await tg.start(broker.run, sink)
        with anyio.fail_after(5):
            while len(sink.messages) < 9:
                await anyio.sleep(0.001)
        await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    assert delivered(sink) == list(range(1, 10))  # the overlapping batch's new part only; the repeat not at all
    assert (broker.batches_in, broker.messages_in, broker.lost) == (4, 20, 0)


@pytest.mark.anyio
async def test_a_gap_waits_for_the_replay_and_the_publisher_replays_in_batches() -> None:
    # B sends 1-3, then 7-9 (4-6 went missing): the receiver holds 7-9 and asks B for what follows 3
    feed = [batch(1, [1, 2, 3]), batch(7, [7, 8, 9])]
    receiver = Recorded(node="A", feed=feed)
    sink = Sink()
    async with anyio.create_task_group() as tg:
        await tg.start(receiver.run, sink)
        with anyio.fail_after(5):
            while not any(b'"s"' in e for r in receiver.rounds[1:] for e in r):
                await anyio.sleep(0.001)
        assert delivered(sink) == [1, 2, 3]
        request = next(orjson.loads(e) for r in receiver.rounds[1:] for e in r if b'"s"' in e)
        assert request == {"n": "A", "s": {"B": 3}}
        # the publisher's side: B had sent 1-9 and answers the request from its ring, batched
        publisher = Recorded(node="B")
        for i in range(1, 10):
            publisher.publish("r", message(i, "B"))
        publisher._sent.extend(publisher._queue)
        publisher._queue.clear()
        publisher._on_sync(request["s"])
        assert [(e["q"], len(e["b"])) for e in map(orjson.loads, publisher._replay)] == [(4, 6)]
        for data in publisher._replay:  # what B's replay brings, through the receiver's own path
            receiver._dispatch(sink, orjson.loads(data))
        tg.cancel_scope.cancel()
    assert delivered(sink) == list(range(1, 10)) and receiver.lost == 0
    assert not receiver._peers["B"].pending and receiver._peers["B"].gap_since is None


@pytest.mark.anyio
async def test_a_gap_no_replay_fills_is_given_up_and_counted() -> None:
    broker = Recorded(feed=[batch(1, [1, 2]), batch(6, [6, 7])], gap_timeout=0.2)
    sink = Sink()
    async with anyio.create_task_group() as tg:
        await tg.start(broker.run, sink)
        with anyio.fail_after(5):
            while len(sink.messages) < 4:
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert delivered(sink) == [1, 2, 6, 7] and broker.lost == 3


@pytest.mark.anyio
async def test_one_bad_item_costs_only_itself_and_opens_no_gap() -> None:
    items = [{"r": "r", "m": message(1, "B")}, {"r": 5, "m": {}}, "text", {"r": "r", "m": message(4, "B")}]
    broker = Recorded(feed=[orjson.dumps({"n": "B", "q": 1, "b": items}), batch(5, [5])])
    sink = Sink()
    async with anyio.create_task_group() as tg:
        await tg.start(broker.run, sink)
        with anyio.fail_after(5):
            while len(sink.messages) < 3:
                await anyio.sleep(0.001)
        tg.cancel_scope.cancel()
    assert delivered(sink) == [1, 4, 5]
    assert broker.malformed == 2 and broker.lost == 0 and broker._control == []


def test_malformed_batch_envelopes_are_refused_whole() -> None:
    broker = Recorded()
    for bad in (b'{"n":"B","q":"1","b":[]}', b'{"n":"B","q":1,"b":[]}', b'{"n":"B","q":1,"b":{}}',
                b'{"n":"B","q":1,"b":[{"r":"r","m":{"x":NaN}}]}'):
        with pytest.raises(ValueError):
            from hubbub.backends.broker import _decode

            _decode(bad)
    assert broker.malformed == 0


@pytest.mark.anyio
async def test_the_queue_during_an_outage_goes_out_in_batches_on_reconnect() -> None:
    class Flaky(Recorded):
        down = True

        async def _send(self, batch: list[bytes], presence: bool = False) -> None:
            if self.down and any(b'"b"' in e for e in batch):
                raise BrokerUnavailable("down")
            await super()._send(batch, presence)

    broker = Flaky(batch_messages=100)
    async with anyio.create_task_group() as tg:
        await tg.start(broker.run, Sink())
        for i in range(250):
            broker.publish("r", message(i))
        await anyio.sleep(0.3)  # it failed, and keeps the messages in order
        assert broker.queued == 250
        broker.down = False
        with anyio.fail_after(10):
            while broker.queued:
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    sent = broker.sent()
    assert [len(e["b"]) for e in sent] == [100, 100, 50]
    assert [item["m"]["text"] for e in sent for item in e["b"]] == [f"m{i}" for i in range(250)]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # redis-py and nats-py are asyncio-only
@pytest.mark.parametrize("kind", ["redis", "nats"])
async def test_five_thousand_messages_cross_a_real_broker_in_few_envelopes(anyio_backend: str, kind: str) -> None:
    if kind == "redis":
        url, cls = require(REDIS_URL, 6379, "Redis"), RedisBroker
    else:
        url, cls = require(NATS_URL, 4222, "NATS"), NatsBroker
    channel = unique("batch")
    a, b = cls(url, "A", channel=channel), cls(url, "B", channel=channel)
    sink_a, sink_b = Sink(), Sink()
    async with anyio.create_task_group() as tg:
        await tg.start(a.run, sink_a)
        await tg.start(b.run, sink_b)
        with anyio.fail_after(10):
            while not (a.up and b.up):
                await anyio.sleep(0.01)
        for i in range(5000):
            a.publish("r", message(i))
            if i % 1000 == 999:
                await anyio.sleep(0)  # five loop passes
        big = {**message(5000), "text": "x" * (600 * 1024)}  # larger than a batch: an envelope of its own
        a.publish("r", big)
        with anyio.fail_after(20):
            while len(sink_b.messages) < 5001:
                await anyio.sleep(0.01)
        await a.close()
        await b.close()
        tg.cancel_scope.cancel()
    assert delivered(sink_b) == list(range(5001))
    assert b.lost == 0 and b.malformed == 0 and sink_a.messages == []
    assert a.messages_out == 5001 and a.batches_out <= 30, a.batches_out  # 1000 a batch (256 KiB at most)
    assert b.batches_in == a.batches_out


FAST = ("--presence-heartbeat", "0.3", "--presence-ttl", "1.5", "--rate-limit", "0")


@pytest.mark.parametrize("kind", ["redis", "nats"])
def test_two_servers_a_burst_crosses_in_order_in_few_envelopes(kind: str) -> None:
    """Two real shells (in this process, so their brokers' counters can be read): a client's burst of
    2,000 messages reaches the other instance's client once and in order, in far fewer envelopes."""
    url = require(REDIS_URL, 6379, "Redis") if kind == "redis" else require(NATS_URL, 4222, "NATS")
    flags = ("--broker", url, "--broker-channel", unique("batch"), *FAST)
    room = unique("room")
    a_gen, b_gen = start_in_process("asyncio", *flags), start_in_process("asyncio", *flags)
    a, b = next(a_gen), next(b_gen)
    try:
        with connect(f"{a.url}/chat/{room}?user=alice") as alice, connect(f"{b.url}/chat/{room}?user=bob") as bob:
            deadline = time.monotonic() + 10
            while True:  # B hears A once a probe crosses
                alice.send('{"event":"message","text":"probe"}')
                try:
                    if recv_json(bob, 0.2)["text"] == "probe":
                        break
                except TimeoutError:
                    assert time.monotonic() < deadline, "the instances never heard each other"
            time.sleep(0.3)
            while True:
                try:
                    recv_json(bob, 0.1)
                except TimeoutError:
                    break
            out = a.shell.backends.broker
            before = (out.messages_out, out.batches_out)
            n = 2000
            for i in range(n):
                alice.send(json.dumps({"event": "message", "text": f"m{i}"}))
            assert [recv_json(bob)["text"] for _ in range(n)] == [f"m{i}" for i in range(n)]
            messages, batches = out.messages_out - before[0], out.batches_out - before[1]
            assert messages == n and batches <= n / 8, (messages, batches)
            assert b.shell.backends.broker.lost == 0
    finally:
        for gen in (a_gen, b_gen):
            gen.close()


def ordered(g: int, node: str, first: int, ids: Sequence[int], epoch: int = 7) -> bytes:
    """An envelope as the order script publishes it: item k at position ``g`` ms, counter k."""
    items = [{"r": "r", "m": message(i, node)} for i in ids]
    return orjson.dumps({"g": g, "e": epoch, "i": f"{g:012x}000000", "n": node, "q": first, "b": items})


@pytest.mark.anyio
async def test_ordered_envelopes_are_delivered_in_the_order_and_a_gap_waits_for_the_replay() -> None:
    """g 1 and 3 arrive (2 went missing while the subscription was away): 3 waits, the receiver asks every
    instance for the order from g 2 on; the replay of 2 releases 2 then 3. Ours come back too."""
    feed = [ordered(1, "B", 1, [1, 2]), ordered(3, "A", 1, [5])]
    receiver = Recorded(node="A", feed=feed)
    sink = Sink()
    async with anyio.create_task_group() as tg:
        await tg.start(receiver.run, sink)
        with anyio.fail_after(5):
            while not any(b'"g"' in e for r in receiver.rounds for e in r):
                await anyio.sleep(0.001)
        assert [position for _, _, position in sink.sequenced] == ["000000000001000000", "000000000001000001"]
        request = next(orjson.loads(e) for r in receiver.rounds for e in r if b'"g"' in e)
        assert request == {"n": "A", "s": {"B": 2}, "g": [7, 2]}
        receiver._dispatch(sink, orjson.loads(ordered(2, "C", 1, [3, 4])))  # C's replay
        receiver._dispatch(sink, orjson.loads(ordered(1, "B", 1, [1, 2])))  # a repeat: dropped by B's numbering
        tg.cancel_scope.cancel()
    assert [(node, position) for node, _, position in sink.sequenced] == [
        ("B", "000000000001000000"), ("B", "000000000001000001"),
        ("C", "000000000002000000"), ("C", "000000000002000001"), ("A", "000000000003000000"),
    ]
    assert receiver._held == {} and receiver._held_since is None and sink.messages == []


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # redis-py is asyncio-only
async def test_an_ordering_broker_makes_one_script_call_per_batch(anyio_backend: str, tmp_path: Any) -> None:
    """Two instances ordering through a private Redis: each batch is one EVALSHA (Redis's own count), and
    both get every message, their own included, at the same positions, strictly increasing."""
    import redis

    with private_redis(tmp_path) as server:
        channel = unique("order")
        a, b = (RedisBroker(server.url, node, channel=channel, sequence=True) for node in "AB")
        sink_a, sink_b = Sink(), Sink()
        async with anyio.create_task_group() as tg:
            await tg.start(a.run, sink_a)
            await tg.start(b.run, sink_b)
            with anyio.fail_after(10):
                while not (a.sequencing and b.sequencing):
                    await anyio.sleep(0.01)
            for i in range(3000):
                (a if i % 2 else b).sequence("r", message(i, "AB"[i % 2]))
                if i % 500 == 499:
                    await anyio.sleep(0)  # six loop passes
            with anyio.fail_after(20):
                while len(sink_a.sequenced) < 3000 or len(sink_b.sequenced) < 3000:
                    await anyio.sleep(0.01)
            # a batch sent again after a failure whose fate was unknown: the first answer, published once
            rest = b'"n":"Z","q":7,"b":[%s]}' % orjson.dumps({"r": "r", "m": message(7, "Z")})
            answers = [await a._order_and_publish(7, 1, rest, [], False) for _ in range(2)]
            assert answers[0] == answers[1]
            with anyio.fail_after(10):
                while len(sink_b.sequenced) < 3001:
                    await anyio.sleep(0.01)
            await a.close()
            await b.close()
            tg.cancel_scope.cancel()
        calls = redis.Redis.from_url(server.url).info("commandstats")["cmdstat_evalsha"]["calls"]
    assert sink_a.sequenced == sink_b.sequenced and sink_a.messages == sink_b.messages == []
    assert [node for node, _, _ in sink_b.sequenced[3000:]] == ["Z"]  # once
    positions = [position for _, _, position in sink_a.sequenced]
    assert positions == sorted(positions) and len(set(positions)) == 3001
    assert calls == a.batches_out + b.batches_out + 2 <= 42, (calls, a.batches_out, b.batches_out)
    assert a.messages_out + b.messages_out == 3000 and a.lost == b.lost == 0
