"""One bad item never stops the store worker or the broker, nor raises into the event loop.

The store worker: a message the store fails on (a bug, or text no database holds) is lost
alone, its batch's other messages are acked, later batches are written, and the loop runs
on; a history read failing so is answered with a failure; a callback that raises is skipped.
The broker: a malformed envelope or a sink that raises on one costs that envelope only, and
an envelope we cannot encode is dropped, never raised into ``publish``'s caller. The stores
run for real (SQLite files, the real PostgreSQL, the real Redis: see tests/services.py).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from hubbub.backends.broker import BrokerUnavailable, PubSubBroker, RedisBroker
from hubbub.backends.store import (
    FAILED_READ,
    REFUSED_WRITE,
    UNREACHABLE_WRITE,
    MemoryStore,
    Message,
    PostgresStore,
    SQLiteStore,
    Store,
    StoreError,
    StoreWorker,
)
from tests.services import DATABASE_URL, REDIS_URL, drop_schema, postgres_schema, require, unique


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


def message(i: int, room: str = "r") -> dict[str, Any]:
    return {"event": "message", "room": room, "user": "u", "text": f"m{i}", "id": f"{i:012x}000000aaaa",
            "ts": int(time.time() * 1000)}


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.005)


# -- the store worker -----------------------------------------------------------


class Poisoned:
    """A real store that fails, as a bug or bad data would, on chosen message ids and history rooms."""

    def __init__(self, store: Store, bad_ids: Sequence[str] = (), bad_rooms: Sequence[str] = ()) -> None:
        self.store = store
        self.blocking = store.blocking
        self.shared = store.shared
        self.bad_ids = set(bad_ids)
        self.bad_rooms = set(bad_rooms)
        self.batches: list[int] = []  # the size of each write asked of us

    def write(self, messages: Sequence[tuple[str, Message]]) -> None:
        self.batches.append(len(messages))
        for _, m in messages:
            if m["id"] in self.bad_ids:
                raise RuntimeError(f"poison {m['id']}")
        self.store.write(messages)

    def history(self, room: str, limit: int, before: str | None = None) -> list[Message]:
        if room in self.bad_rooms:
            raise UnicodeEncodeError("utf-8", room, 0, 1, "surrogates not allowed")
        return self.store.history(room, limit, before)

    def ping(self) -> None:
        self.store.ping()

    def close(self) -> None:
        self.store.close()


class Shell:
    """The worker's callbacks, recording what it reported; ``raising`` names callbacks to fail once."""

    def __init__(self, raising: Sequence[str] = ()) -> None:
        self.stored: list[Any] = []
        self.lost: list[tuple[list[Any], str]] = []
        self.history: dict[int, list[str]] = {}
        self.history_failed: dict[int, str] = {}
        self.status: list[bool] = []
        self.raising = set(raising)

    def _maybe_raise(self, name: str) -> None:
        if name in self.raising:
            self.raising.discard(name)
            raise RuntimeError(f"{name} is broken")

    def on_stored(self, acks: list[Any]) -> None:
        self.stored += acks
        self._maybe_raise("on_stored")

    def on_lost(self, acks: list[Any], detail: str) -> None:
        self.lost.append((acks, detail))
        self._maybe_raise("on_lost")

    def on_history(self, conn_id: int, room: str, messages: list[Message]) -> None:
        self.history[conn_id] = [m["text"] for m in messages]
        self._maybe_raise("on_history")

    def on_history_failed(self, conn_id: int, detail: str) -> None:
        self.history_failed[conn_id] = detail
        self._maybe_raise("on_history_failed")

    def on_status(self, up: bool) -> None:
        self.status.append(up)
        self._maybe_raise("on_status")

    def worker(self, store: Store, **kwargs: Any) -> StoreWorker:
        return StoreWorker(store, on_stored=self.on_stored, on_lost=self.on_lost, on_history=self.on_history,
                           on_history_failed=self.on_history_failed, on_status=self.on_status, **kwargs)


class Running:
    """A worker's ``run`` in a task group, and whether it has ended (it never should)."""

    def __init__(self, worker: StoreWorker) -> None:
        self.worker = worker
        self.ended = False

    async def __call__(self) -> None:
        try:
            await self.worker.run()
        finally:
            self.ended = True


@pytest.fixture(params=["sqlite", "postgresql"])
def sql_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        store: Store = SQLiteStore(str(tmp_path / "h.db"))
        yield store
        store.close()
    else:
        url, schema = postgres_schema(require(DATABASE_URL, 5432, "PostgreSQL"))
        store = PostgresStore(url)
        yield store
        store.close()
        drop_schema(DATABASE_URL, schema)


@pytest.mark.anyio
async def test_a_poison_message_is_lost_alone_and_the_worker_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = Poisoned(SQLiteStore(str(tmp_path / "h.db")), bad_ids=[message(5)["id"]], bad_rooms=["cursed"])
    shell = Shell()
    worker = shell.worker(store)
    running = Running(worker)
    async with anyio.create_task_group() as tg:
        tg.start_soon(running)
        for i in range(10):  # queued before the loop runs: one batch
            worker.write("r", message(i), f"ack{i}")
        await worker.drain()
        assert store.batches[0] == 10
        assert shell.stored == [f"ack{i}" for i in range(10) if i != 5]  # the others of its batch, in order
        assert shell.lost == [(["ack5"], REFUSED_WRITE)]
        assert worker.failures == 1 and worker.up and shell.status == []  # a poison item is no outage
        assert len([r for r in caplog.records if "could not keep" in r.message and r.exc_info]) == 1

        for i in range(10, 15):  # a later batch is written as usual
            worker.write("r", message(i), f"ack{i}")
        await worker.drain()
        assert shell.stored[-5:] == [f"ack{i}" for i in range(10, 15)]

        worker.read(1, "cursed", 10, None)  # UnicodeEncodeError, as sqlite3 raises for a lone surrogate
        worker.read(2, "r", 100, None)
        await until(lambda: 1 in shell.history_failed and 2 in shell.history)
        assert shell.history_failed == {1: FAILED_READ}
        assert shell.history[2] == [f"m{i}" for i in range(15) if i != 5]
        assert worker.failures == 2 and worker.up

        await anyio.sleep(0.05)
        assert not running.ended
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_big_batch_isolates_its_poison_in_few_writes(tmp_path: Path) -> None:
    bad = [message(i)["id"] for i in (3, 50, 99)]
    store = Poisoned(SQLiteStore(str(tmp_path / "h.db")), bad_ids=bad)
    shell = Shell()
    worker = shell.worker(store)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        for i in range(100):
            worker.write("r", message(i), i)
        await worker.drain()
        tg.cancel_scope.cancel()
    assert shell.stored == [i for i in range(100) if i not in (3, 50, 99)]
    assert sorted(ack for acks, _ in shell.lost for ack in acks) == [3, 50, 99]
    assert worker.failures == 3
    assert len(store.batches) < 40  # halving: ~2 log2(100) writes per bad message, not 100 one-message commits


@pytest.mark.anyio
async def test_text_no_database_holds_is_the_items_failure_not_an_outage(sql_store: Store) -> None:
    """No wrapper: the real driver's UnicodeEncodeError (a lone surrogate) and PostgreSQL's refusal of NUL."""
    shell = Shell()
    worker = shell.worker(sql_store)
    running = Running(worker)
    async with anyio.create_task_group() as tg:
        tg.start_soon(running)
        worker.write("\ud800", message(1, "\ud800"), "bad room")
        worker.write("r", message(2), "good")
        worker.write("r\x00", message(3, "r\x00"), "nul room")
        worker.write("r", {**message(4), "text": "\udfff"}, "bad text")
        worker.write("r", {**message(5), "score": math.nan}, "nan")
        worker.write("r", message(6), "good too")
        await worker.drain()
        assert shell.stored == ["good", "good too"]
        assert sorted(ack for acks, _ in shell.lost for ack in acks) == ["bad room", "bad text", "nan", "nul room"]
        assert worker.up and shell.status == [] and worker.failures == 4

        worker.read(1, "r", 10, "\ud800")  # a lone surrogate for `before`: the request that stopped the server
        worker.read(2, "r\x00", 10, None)
        worker.read(3, "r", 10, None)
        await until(lambda: len(shell.history_failed) + len(shell.history) == 3)
        assert shell.history_failed == {1: FAILED_READ, 2: FAILED_READ}
        assert shell.history == {3: ["m2", "m6"]}
        assert worker.up and not running.ended
        tg.cancel_scope.cancel()
    sql_store.write([("r", message(7))])  # and the store itself was left clean (no transaction open)
    assert [m["text"] for m in sql_store.history("r", 10)] == ["m2", "m6", "m7"]


@pytest.mark.anyio
async def test_the_inline_path_contains_the_same() -> None:
    """A store that never blocks (memory) is written and read in the caller, the event loop: nothing
    may raise there. No loop runs here: anything not answered inline would wait forever."""
    store = Poisoned(MemoryStore(), bad_ids=[message(2)["id"]], bad_rooms=["cursed"])
    shell = Shell(raising=["on_stored", "on_history"])
    worker = shell.worker(store)
    worker.write("r", message(1), "first")  # on_stored raises: contained
    worker.write("r", message(2), "poison")
    worker.write("r", message(3), "third")
    assert shell.stored == ["first", "third"]
    assert shell.lost == [(["poison"], REFUSED_WRITE)]
    worker.read(1, "r", 10, None)  # on_history raises: contained
    worker.read(2, "cursed", 10, None)
    worker.read(3, "r", 10, None)
    assert shell.history == {1: ["m1", "m3"], 3: ["m1", "m3"]} and shell.history_failed == {2: FAILED_READ}
    assert worker.failures == 4 and worker.up


@pytest.mark.anyio
async def test_raising_callbacks_do_not_stop_the_loop(tmp_path: Path) -> None:
    store = Poisoned(SQLiteStore(str(tmp_path / "h.db")), bad_ids=[message(1)["id"]])
    shell = Shell(raising=["on_stored", "on_lost", "on_history", "on_history_failed"])
    worker = shell.worker(store)
    running = Running(worker)
    async with anyio.create_task_group() as tg:
        tg.start_soon(running)
        worker.write("r", message(0), "a")  # on_stored raises
        worker.write("r", message(1), "b")  # on_lost raises
        await worker.drain()
        worker.read(1, "r", 10, None)  # on_history raises
        await until(lambda: 1 in shell.history)
        worker.write("r", message(2), "c")
        await worker.drain()
        worker.read(2, "r", 10, None)
        await until(lambda: 2 in shell.history)
        assert shell.stored == ["a", "c"] and shell.lost == [(["b"], REFUSED_WRITE)]
        assert shell.history[2] == ["m0", "m2"]
        assert worker.failures == 1 + 2 + 1  # the poison message, on_stored, on_lost, on_history
        assert not running.ended
        tg.cancel_scope.cancel()


class Down:
    """A store that is unreachable: every call raises StoreError."""

    blocking = True
    shared = False

    def write(self, messages: Sequence[tuple[str, Message]]) -> None:
        raise StoreError("no route to host")

    def history(self, room: str, limit: int, before: str | None = None) -> list[Message]:
        raise StoreError("no route to host")

    def ping(self) -> None:
        raise StoreError("no route to host")

    def close(self) -> None:
        pass


@pytest.mark.anyio
async def test_store_error_is_still_an_outage() -> None:
    """StoreError keeps its meaning: retried with backoff, then the senders hear "unreachable" and the
    store is reported down; it is not taken for a poison item."""
    shell = Shell(raising=["on_status"])
    worker = shell.worker(Down(), retry_for=0.3)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        worker.write("r", message(1), "a")
        worker.write("r", message(2), "b")
        await worker.drain()
        tg.cancel_scope.cancel()
    assert shell.lost == [(["a", "b"], UNREACHABLE_WRITE)]
    assert shell.status == [False] and not worker.up
    assert worker.failures == 1  # only on_status raising


# -- the broker -----------------------------------------------------------------


class Sink:
    """Records what a broker delivers; fails (as a core's bug would) on the text "boom" and on node C's presence."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, str, str]] = []  # (node, room, text)
        self.presence: list[tuple[str, Any]] = []
        self.syncs = 0
        self.status: list[bool] = []

    def on_message(self, room: str, message: Mapping[str, Any], node: str) -> None:
        if message.get("text") == "boom":
            raise RuntimeError("the core failed on this message")
        self.messages.append((node, room, message["text"]))

    def on_presence(self, node: str, rooms: Mapping[str, Sequence[str]] | None) -> None:
        if node == "C":
            raise RuntimeError("the core failed on this heartbeat")
        self.presence.append((node, rooms))

    def on_sync(self) -> None:
        self.syncs += 1

    def on_broker_status(self, up: bool) -> None:
        self.status.append(up)


class Fed(PubSubBroker):
    """A broker whose subscription yields prepared envelopes, then ends."""

    def __init__(self, envelopes: Sequence[bytes]) -> None:
        super().__init__("test://", node="A")
        self.envelopes = envelopes

    async def _listen(self) -> AsyncIterator[bytes]:
        for data in self.envelopes:
            yield data


def env(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def msg(q: int, text: str, node: str = "B") -> bytes:
    return env(n=node, q=q, r="room", m={"id": f"{q:012x}000000{node}", "text": text})


MALFORMED = [
    b"not json", b"[1, 2]", b"\xff\xfe\x00", b"[" * 100_000, b'{"n": "B", "q": 9, "r": "room", "m": {"v": NaN}}',
    env(q=1, r="room", m={}), env(n=5, p=None), b'{"n": "\\ud800", "p": null}',
    env(n="B", q=True, r="room", m={}), env(n="B", q="2", r="room", m={}), env(n="B", q=2.0, r="room", m={}),
    env(n="B", q=2, r=7, m={}), env(n="B", q=2, r="room", m="text"), env(n="B", q=2, m={}),
    env(n="B", p={"room": ["u", 3]}), env(n="B", p={"room": "u"}), env(n="B", p=["room"]),
    env(n="B", s={"A": "1"}), env(n="B", s={"A": False}), env(n="B", s=[1]), env(n="B", x=1),
]


@pytest.mark.anyio
async def test_each_envelope_is_on_its_own(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "hubbub.broker")
    envelopes = [
        msg(1, "one"), *MALFORMED[:10], msg(2, "boom"), env(n="C", p={"room": ["carol"]}), msg(3, "three"),
        *MALFORMED[10:], env(n="B", p={"room": ["bob"]}), env(n="B", s={"A": 0}), msg(4, "four"),
        env(n="A", q=1, r="room", m={"text": "our own"}),
    ]
    broker = Fed(envelopes)
    sink = Sink()
    with pytest.raises(BrokerUnavailable, match="subscription ended"):
        await broker._listen_into(sink)
    assert sink.messages == [("B", "room", "one"), ("B", "room", "three"), ("B", "room", "four")]
    assert sink.presence == [("B", {"room": ["bob"]})] and sink.syncs == 1
    assert broker.malformed == len(MALFORMED)
    assert broker.failures == 2  # "boom" and C's heartbeat
    # the message the sink failed on still counts: no gap, no replay asked, nothing lost
    assert broker._peers["B"].next == 5 and not broker._peers["B"].pending
    assert broker._control == [] and broker.lost == 0
    # one line a second for each kind of trouble, however many there were
    malformed_lines = [r for r in caplog.records if "malformed" in r.message]
    failure_lines = [r for r in caplog.records if "sink failed" in r.message]
    assert len(malformed_lines) == 1 and len(failure_lines) == 1 and failure_lines[0].exc_info

    broker._malformed_log._next = -math.inf  # a second later
    broker.envelopes = [b"nope", msg(5, "five")]
    with pytest.raises(BrokerUnavailable):
        await broker._listen_into(sink)
    assert f"and {len(MALFORMED) - 1} more since the last such line" in caplog.records[-1].message
    assert sink.messages[-1] == ("B", "room", "five")


def test_an_envelope_that_cannot_be_encoded_is_dropped_not_raised() -> None:
    broker = Fed([])
    broker.publish("room", {"id": "1", "score": math.nan})  # not strict JSON
    broker.publish("room", {"id": "2", "text": "\ud800"})  # no UTF-8 for a lone surrogate
    broker.publish("\udfff", {"id": "3"})
    broker.publish("room", {"id": "4", "raw": b"bytes"})  # not JSON at all
    assert broker.failures == 4 and broker.queued == 0
    broker.publish("room", {"id": "5", "text": "fine"})
    assert [seq for seq, _ in broker._queue] == [1]  # the dropped ones took no sequence number: no gap
    broker.publish_presence({"room": ["alice"]})
    broker.publish_presence({"room": ["\ud800"]})
    assert broker.failures == 5
    assert json.loads(broker._presence or b"") == {"n": "A", "p": {"room": ["alice"]}}  # the last good one stands


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # redis-py's client is asyncio-only
async def test_a_malformed_envelope_on_real_redis_costs_nothing_else(anyio_backend: str) -> None:
    import redis.asyncio as redis

    url = require(REDIS_URL, 6379, "Redis")
    channel = unique("contain")
    a, b = RedisBroker(url, "A", channel=channel), RedisBroker(url, "B", channel=channel)
    sink_a, sink_b = Sink(), Sink()
    raw = redis.Redis.from_url(url)
    async with anyio.create_task_group() as tg:
        await tg.start(a.run, sink_a)
        await until(lambda: a.up)
        for data in (b"garbage", env(n="X", q="one", r="room", m={}), msg(1, "boom", node="X"), b"[" * 100_000):
            await raw.publish(channel, data)
        await until(lambda: a.malformed == 3 and a.failures == 1)
        await tg.start(b.run, sink_b)
        await until(lambda: b.up)
        b.publish("room", {"id": "000000000001000000B", "text": "hello from B"})
        await until(lambda: ("B", "room", "hello from B") in sink_a.messages)
        assert sink_a.status == [True]  # A's subscription never dropped
        await a.close()
        await b.close()
        tg.cancel_scope.cancel()
    await raw.aclose()
