"""``hubbub.client`` against real ``server.py`` processes: rooms on one socket, publish and receive,
presence with metadata, errors, history, JWT refresh and refusals, closes that mean "do not come
back", two instances on Redis with the server API, and reconnection that stays exact (a dropped
socket, a server restart on the same port with a SQLite store): every message once, in order.

Each test runs its own event loop (``asyncio.run``); timeouts are there to fail instead of hang,
never to measure."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import jwt
import pytest

from hubbub.api import Client
from hubbub.client import Backoff, HubbubClosed, HubbubError, Message, Room, connect
from tests.servers import RunningServer, spawn_server
from tests.services import REDIS_URL, free_port, require, unique

KEY = "client-test-key-" + "z" * 20
SECRET = "client-test-secret-long-enough-for-hs256"
FAST = ("--presence-heartbeat", "0.3", "--presence-ttl", "1.5", "--rate-limit", "0")
T = TypeVar("T")


def run(coro: Awaitable[T], timeout: float = 60.0) -> T:
    """Run one test scenario on a fresh event loop; fail (not hang) after ``timeout`` seconds."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


async def take(room: Room, n: int, timeout: float = 15.0) -> list[Message]:
    """The room's next ``n`` messages."""

    async def collect() -> list[Message]:
        return [await anext(room) for _ in range(n)]

    return await asyncio.wait_for(collect(), timeout)


async def until(check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.02)


class Gate(Backoff):
    """A reconnection policy the test opens: the client stays away until ``open()``."""

    def __init__(self) -> None:
        super().__init__(initial=0.05, maximum=0.5)
        self.gate = asyncio.Event()
        self.waits = 0

    def open(self) -> None:
        self.gate.set()

    async def wait(self, attempt: int) -> None:
        self.waits += 1
        await self.gate.wait()
        await super().wait(attempt)


async def in_thread(manager: AbstractContextManager[T]) -> T:
    """Enter a blocking context manager (starting a server) without blocking the event loop."""
    return await asyncio.to_thread(manager.__enter__)


async def leave_thread(manager: AbstractContextManager[Any]) -> None:
    await asyncio.to_thread(manager.__exit__, None, None, None)


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    fixed = Backoff(initial=0.5, factor=2, maximum=15, jitter=0)
    assert [fixed.delay(n) for n in range(7)] == [0.5, 1, 2, 4, 8, 15, 15]
    assert fixed.delay(10_000) == 15  # no overflow however long it has been down
    jittered = Backoff(initial=1, factor=2, maximum=8, jitter=0.5, rng=random.Random(7))
    delays = [jittered.delay(n) for n in range(200)]
    for n, delay in enumerate(delays):
        base = min(8, 2**n)
        assert base * 0.5 <= delay <= base
    assert len({round(d, 6) for d in delays[4:]}) > 100  # spread: clients do not come back in step
    again = Backoff(initial=1, factor=2, maximum=8, jitter=0.5, rng=random.Random(7))
    assert [again.delay(n) for n in range(200)] == delays  # reproducible with a seeded rng


def test_two_rooms_publish_receive_presence_and_history() -> None:
    rooms = [unique("a"), unique("b")]

    async def scenario(server: RunningServer) -> None:
        seen: list[int] = []
        async with connect(server.url, user="alice") as alice, connect(server.url, user="bob") as bob:
            a0 = await alice.join(rooms[0], meta={"device": "laptop"},
                                  on_presence=lambda r: seen.append(len(r.presence)))
            a1 = await alice.join(rooms[1])
            assert a0.presence == {"alice": [{"device": "laptop"}]} and a1.presence == {"alice": [{}]}
            assert await alice.join(rooms[0]) is a0  # joining a joined room: the same room
            b0 = await bob.join(rooms[0], meta={"device": "phone"})
            b1 = await bob.join(rooms[1], presence=False)
            assert b1.presence == {}  # no presence events asked for
            assert await asyncio.wait_for(a0.wait_presence(lambda p: "bob" in p), 10) == \
                {"alice": [{"device": "laptop"}], "bob": [{"device": "phone"}]}
            assert 2 in seen  # the callback saw bob arrive
            assert b0.presence["alice"] == [{"device": "laptop"}]
            # publish to both rooms: acks with id and ts, each message in its own room's iterator
            acks = [await b0.publish({"n": 0}), await b1.publish("one"), await b0.publish([1, 2], key="my-key")]
            assert all(isinstance(a.id, str) and isinstance(a.ts, int) for a in acks)
            got0 = await take(a0, 2)
            got1 = await take(a1, 1)
            assert [(m.room, m.id, m.user, m.data) for m in got0] == [
                (rooms[0], acks[0].id, "bob", {"n": 0}), (rooms[0], acks[2].id, "bob", [1, 2])]
            assert (got1[0].room, got1[0].data, got1[0].ts) == (rooms[1], "one", acks[1].ts)
            # a publisher does not get its own messages back
            await a0.publish("from alice")
            assert (await take(b0, 1))[0].data == "from alice"
            # history: pages in every direction
            page = await a0.history()
            assert [m.data for m in page] == [{"n": 0}, [1, 2], "from alice"]
            assert [m.id for m in await a0.history(limit=1, after=page[0].id)] == [page[1].id]
            assert [m.id for m in await a0.history(limit=1, before=page[2].id)] == [page[1].id]
            # presence metadata changes reach the others
            await b0.update_presence({"device": "phone", "status": "away"})
            await asyncio.wait_for(a0.wait_presence(
                lambda p: p.get("bob") == [{"device": "phone", "status": "away"}]), 10)
            # leave: the iterator ends, the others see the user go
            await b0.leave()
            with pytest.raises(StopAsyncIteration):
                await anext(b0)
            await asyncio.wait_for(a0.wait_presence(lambda p: "bob" not in p), 10)
            assert set(bob.rooms) == {rooms[1]}
        # the hub closed: its iterators end, and waiting for presence does not hang
        with pytest.raises(StopAsyncIteration):
            await anext(a1)
        assert await asyncio.wait_for(a1.wait_presence(), 5) == {"alice": [{}], "bob": [{}]}
        assert await asyncio.wait_for(a1.wait_presence(lambda p: "nobody" in p), 5) is a1.presence

    with spawn_server(*FAST) as server:
        run(scenario(server))


def test_errors_not_joined_forbidden_bad_room() -> None:
    async def scenario(server: RunningServer) -> None:
        async with connect(server.url, user="carol") as carol:
            feed = await carol.join("feed-prices")
            with pytest.raises(HubbubError) as error:
                await feed.publish(1)
            assert (error.value.code, error.value.room) == ("forbidden", "feed-prices")
            with pytest.raises(HubbubError) as error:
                await carol.join("")
            assert error.value.code == "bad_room"
            lobby = await carol.join("lobby")
            await lobby.leave()
            with pytest.raises(HubbubError) as error:
                await lobby.publish("after leaving")
            assert error.value.code == "not_joined"
            with pytest.raises(HubbubError) as error:
                await carol.request("publish", room="never-joined", data=1)
            assert error.value.code == "not_joined"
            # still connected and working after every error
            again = await carol.join("lobby")
            assert isinstance((await again.publish("fine")).id, str)

    with spawn_server("--read-only-rooms", "feed-*", "--rate-limit", "0") as server:
        run(scenario(server))


def test_a_publish_over_the_servers_message_size_is_refused_here_and_the_connection_stays() -> None:
    """The server would close the socket (1009) for a frame over its --max-message-size, and the client
    would have to end (sending it again would be refused again): the client refuses it before sending."""
    async def scenario(server: RunningServer) -> None:
        async with connect(server.url, user="dave", max_message_size=4096) as dave:
            room = await dave.join("big")
            with pytest.raises(HubbubError) as error:
                await room.publish("x" * 5000)
            assert (error.value.code, error.value.room) == ("bad_field", "big")
            with pytest.raises(HubbubError):
                await room.update_presence({"bio": "y" * 5000})
            ack = await room.publish("x" * 3000)  # under the limit: sent, stored, acked on the same socket
            assert isinstance(ack.id, str) and dave.connected and dave.reconnects == 0
            history = await room.history()
            assert [m.data for m in history] == ["x" * 3000]

    with spawn_server("--max-message-size", "4096", "--rate-limit", "0") as server:
        run(scenario(server))


def test_disconnected_through_the_api_ends_the_iterator_and_does_not_come_back() -> None:
    async def scenario(server: RunningServer) -> None:
        api = Client(server.http, KEY)
        async with connect(server.url, user="mallory", backoff=Backoff(initial=0.01)) as hub:
            room = await hub.join("r")
            other = await hub.join("s")
            await asyncio.to_thread(api.publish, "r", "before")
            assert (await take(room, 1))[0].data == "before"
            assert await asyncio.to_thread(api.disconnect, "mallory", "s") == 1
            with pytest.raises(HubbubError) as removed:  # taken out of one room: that room's iterator ends
                await asyncio.wait_for(anext(other), 10)
            assert removed.value.code == "removed"
            assert await asyncio.to_thread(api.disconnect, "mallory") == 1
            with pytest.raises(HubbubClosed) as closed:
                await asyncio.wait_for(anext(room), 10)
            assert closed.value.code == 4001
            with pytest.raises(HubbubClosed):
                await room.publish("too late")
            assert hub.reconnects == 0 and not hub.connected
            assert (await asyncio.to_thread(api.presence, "r")) == {}
        api.close()

    with spawn_server("--api-key", KEY, *FAST) as server:
        run(scenario(server))


def test_token_callable_refreshes_before_expiry_and_a_refused_token_is_final() -> None:
    calls: list[float] = []

    def fresh_token() -> str:
        calls.append(time.monotonic())
        return jwt.encode({"sub": "tess", "exp": int(time.time()) + 3}, SECRET, algorithm="HS256")

    async def async_token() -> str:
        return fresh_token()

    async def scenario(server: RunningServer) -> None:
        async with connect(server.url, token=async_token) as hub:
            room = await hub.join("t")
            assert len(calls) == 1
            await until(lambda: len(calls) >= 2)  # token_expiring -> called again -> refresh
            await until(lambda: not hub._requests)
            deadline = time.time() + 4  # past the first token's exp: still connected
            while time.time() < deadline:
                await asyncio.sleep(0.1)
            assert hub.connected and hub.reconnects == 0
            assert isinstance((await room.publish("still here")).id, str)
        # a string token is not refreshed: closed with 1008 at exp, and not reconnected
        async with connect(server.url, token=fresh_token(), backoff=Backoff(initial=0.01)) as hub:
            room = await hub.join("t")
            with pytest.raises(HubbubClosed) as closed:
                await asyncio.wait_for(anext(room), 15)
            assert closed.value.code == 1008 and hub.reconnects == 0
        with pytest.raises(HubbubClosed) as refused:
            async with connect(server.url, token="not-a-jwt"):
                pass
        assert refused.value.status == 401

    with spawn_server("--jwt-secret", SECRET, "--rate-limit", "0") as server:
        run(scenario(server))


@contextmanager
def two_instances(*extra: str) -> Iterator[tuple[RunningServer, RunningServer]]:
    broker = require(REDIS_URL, 6379, "Redis")
    channel = unique("client")
    with ExitStack() as stack:
        a, b = (stack.enter_context(spawn_server("--broker", broker, "--broker-channel", channel, "--api-key", KEY,
                                                 *FAST, *extra)) for _ in range(2))
        yield a, b


def test_two_instances_on_redis_api_publish_and_presence() -> None:
    room = unique("news")

    async def scenario(a: RunningServer, b: RunningServer) -> None:
        api = Client(a.http, KEY)
        gate = Gate()
        async with connect(b.url, user="bea", backoff=gate) as bea, connect(a.url, user="ari") as ari:
            on_b = await bea.join(room, meta={"device": "phone"})
            on_a = await ari.join(room, meta={"device": "desk"})
            # both users, with their metas, in the cluster-wide presence, from either side
            await asyncio.wait_for(on_b.wait_presence(lambda p: "ari" in p), 10)
            await asyncio.wait_for(on_a.wait_presence(lambda p: "bea" in p), 10)
            users = await asyncio.to_thread(api.presence, room)
            assert users == {"bea": [{"device": "phone"}], "ari": [{"device": "desk"}]}
            acks = [await asyncio.to_thread(api.publish, room, {"i": i}) for i in range(10)]
            for member in (on_b, on_a):
                got = await take(member, 10)
                assert [m.data for m in got] == [{"i": i} for i in range(10)]
                assert [m.id for m in got] == [ack["id"] for ack in acks]
                assert all(m.user == "server" for m in got)
            # and a client on B publishing reaches the client on A
            ack = await on_b.publish("from b")
            assert [(m.id, m.data, m.user) for m in await take(on_a, 1)] == [(ack.id, "from b", "bea")]
            # the client on B drops; what A publishes meanwhile reaches it once it is back, once each
            assert bea._socket is not None
            bea._socket.transport.abort()
            await until(lambda: not bea.connected and gate.waits > 0)
            away = [await asyncio.to_thread(api.publish, room, {"away": i}) for i in range(10)]
            gate.open()
            await asyncio.to_thread(api.publish, room, "back")
            got = await take(on_b, 11)
            assert [m.id for m in got[:10]] == [x["id"] for x in away] and got[10].data == "back"
            assert [m.data for m in await take(on_a, 11)] == [*({"away": i} for i in range(10)), "back"]
        api.close()

    with two_instances() as (a, b):
        run(scenario(a, b))


def test_a_dropped_socket_catches_up_exactly_across_history_pages() -> None:
    """Away while 250 messages go by (several history pages, some of them truncated by
    --max-buffer), back while more keep coming: every message once, in order."""
    room = unique("busy")
    blob = "x" * 400

    async def scenario(server: RunningServer) -> None:
        api = Client(server.http, KEY)
        gate = Gate()
        async with connect(server.url, user="reader", backoff=gate) as reader:
            member = await reader.join(room)
            pages: list[dict[str, Any]] = []
            ask = member._history_page

            async def recorded(*args: Any, **kwargs: Any) -> dict[str, Any]:
                page = await ask(*args, **kwargs)
                pages.append(page)
                return page

            member._history_page = recorded  # type: ignore[method-assign]
            first = [await asyncio.to_thread(api.publish, room, {"n": i, "pad": blob}) for i in range(5)]
            assert [m.id for m in await take(member, 5)] == [a["id"] for a in first]
            assert reader._socket is not None
            reader._socket.transport.abort()  # the network drops: no close frame
            await until(lambda: not reader.connected and gate.waits > 0)
            for i in range(5, 255):
                await asyncio.to_thread(api.publish, room, {"n": i, "pad": blob})

            async def keep_publishing() -> None:
                for i in range(255, 305):
                    await asyncio.to_thread(api.publish, room, {"n": i, "pad": blob})

            gate.open()
            publisher = asyncio.ensure_future(keep_publishing())
            got = await take(member, 300, timeout=60)
            await publisher
            await asyncio.to_thread(api.publish, room, {"n": "end"})
            tail = await take(member, 1)
            assert [m.data["n"] for m in got] == list(range(5, 305))
            assert tail[0].data == {"n": "end"}  # nothing delivered twice in between
            assert reader.reconnects == 1
            # what this test is about happened: several pages, some truncated (today's server does not
            # recover from since; once it does, "recovered": true makes the pages unnecessary)
            if pages:
                assert len(pages) >= 3 and any(p.get("truncated") for p in pages)
        api.close()

    with spawn_server("--api-key", KEY, "--max-buffer", "32768", *FAST) as server:
        run(scenario(server), timeout=120)


def test_a_server_restart_mid_conversation_loses_and_repeats_nothing(tmp_path: Path) -> None:
    """A SQLite store in tmp_path and the same port: messages published through the API while the
    clients are away, and a publish a client made while away (sent again once back), reach every
    client exactly once and in the store's order."""
    room = unique("restart")
    port = free_port()
    args = ("--api-key", KEY, "--port", str(port), "--store", f"sqlite:///{tmp_path / 'hub.db'}", *FAST)
    url = f"ws://127.0.0.1:{port}"

    async def scenario() -> None:
        api = Client(f"http://127.0.0.1:{port}", KEY)
        first = spawn_server(*args)
        await in_thread(first)
        reader_gate, writer_gate = Gate(), Gate()
        async with connect(url, user="reader", backoff=reader_gate) as reader, \
                connect(url, user="writer", backoff=writer_gate) as writer:
            r = await reader.join(room, meta={"role": "reader"})
            w = await writer.join(room)
            for i in range(5):
                await asyncio.to_thread(api.publish, room, i)
            mine = [(await w.publish("w-before")).id]
            assert [m.data for m in await take(r, 6)] == [0, 1, 2, 3, 4, "w-before"]
            assert [m.data for m in await take(w, 5)] == [0, 1, 2, 3, 4]
            await leave_thread(first)  # SIGTERM: 1001 to every client
            await until(lambda: not reader.connected and not writer.connected)
            away = asyncio.ensure_future(w.publish("w-away"))  # waits for the connection to come back
            second = spawn_server(*args)
            await in_thread(second)
            try:
                for i in range(5, 10):  # published while both clients are away
                    await asyncio.to_thread(api.publish, room, i)
                reader_gate.open()
                writer_gate.open()
                mine.append((await asyncio.wait_for(away, 20)).id)
                await until(lambda: reader.reconnects == 1 and not reader._rejoins)  # back and caught up
                for i in range(10, 15):
                    await asyncio.to_thread(api.publish, room, i)
                await asyncio.to_thread(api.publish, room, "end")
                stored = await asyncio.to_thread(api.history, room, 100)
                assert [m["data"] for m in stored][:6] == [0, 1, 2, 3, 4, "w-before"]
                got_r = await take(r, len(stored) - 6)
                got_w = await take(w, len(stored) - 5 - len(mine))
                assert [m.id for m in got_r] == [m["id"] for m in stored[6:]]
                assert [m.id for m in got_w] == [m["id"] for m in stored[5:] if m["id"] not in mine]
                assert got_r[-1].data == got_w[-1].data == "end"
                assert sorted(m["data"] for m in stored if isinstance(m["data"], int)) == list(range(15))
                assert sum(m["data"] == "w-away" for m in stored) == 1
                assert reader.reconnects == writer.reconnects == 1
            finally:
                await leave_thread(second)
        api.close()

    run(scenario(), timeout=120)


def test_join_since_catches_up_from_an_id() -> None:
    room = unique("since")

    async def scenario(server: RunningServer) -> None:
        api = Client(server.http, KEY)
        acks = [await asyncio.to_thread(api.publish, room, i) for i in range(8)]
        async with connect(server.url, user="late") as hub:
            member = await hub.join(room, since=acks[2]["id"])
            await asyncio.to_thread(api.publish, room, 8)
            assert [m.data for m in await take(member, 6)] == [3, 4, 5, 6, 7, 8]
            assert member.last_id is not None and member.last_id > acks[-1]["id"]
        api.close()

    with spawn_server("--api-key", KEY, *FAST) as server:
        run(scenario(server))


def test_a_server_that_recovers_since_exactly_is_used_as_is() -> None:
    """What issue 15's server will answer (PROTOCOL.md, "Recovery: since"): ``joined`` with
    ``recovered: true`` and the missed ``messages``. Today's server ignores ``since``, so this one
    scripted stand-in (a ``websockets`` server speaking just enough /ws) checks the client's side of
    that path: the join asks ``since`` the last delivered id, the recovered messages come first, a
    live message that repeats one of them is dropped, and no history page is asked for."""
    from websockets.asyncio.server import ServerConnection, serve

    def message(n: int) -> dict[str, Any]:
        return {"event": "message", "room": "r", "id": f"id-{n:03d}", "ts": n, "user": "u", "data": n}

    joins: list[dict[str, Any]] = []
    histories: list[dict[str, Any]] = []

    async def handler(ws: ServerConnection) -> None:
        first = not joins
        async for frame in ws:
            event = json.loads(frame)
            if event["event"] == "history":
                histories.append(event)
                await ws.send(json.dumps({"event": "history", "room": "r", "ref": event["ref"], "messages": []}))
            if event["event"] != "join":
                continue
            joins.append(event)
            reply: dict[str, Any] = {"event": "joined", "room": "r", "ref": event["ref"], "presence": {"u": [{}]}}
            if first:
                await ws.send(json.dumps(reply))
                for n in (1, 2):
                    await ws.send(json.dumps(message(n)))
                await ws.close(1012, "restarting")
                return
            reply |= {"recovered": True, "messages": [message(3), message(4)]}
            await ws.send(json.dumps(reply))
            for n in (4, 5):
                await ws.send(json.dumps(message(n)))

    async def scenario() -> None:
        async with serve(handler, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            async with connect(f"ws://127.0.0.1:{port}", user="u", backoff=Backoff(initial=0.01)) as hub:
                room = await hub.join("r")
                got = await take(room, 5)
                assert [m.data for m in got] == [1, 2, 3, 4, 5]
                assert [j.get("since") for j in joins] == [None, "id-002"]
                assert histories == [] and hub.reconnects == 1

    run(scenario())


def test_an_unacknowledged_publish_is_sent_again_with_its_key_after_the_room_is_joined_again() -> None:
    """A publish in flight when the connection drops: the next connection joins the room again
    first, then sends the publish again with the same ``key`` (scripted server: today's does not
    deduplicate keys, issue 15's will, and answers the original id)."""
    from websockets.asyncio.server import ServerConnection, serve

    seen: list[list[dict[str, Any]]] = []

    async def handler(ws: ServerConnection) -> None:
        frames: list[dict[str, Any]] = []
        seen.append(frames)
        async for frame in ws:
            event = json.loads(frame)
            frames.append(event)
            if event["event"] == "join":
                await ws.send(json.dumps({"event": "joined", "room": event["room"], "ref": event["ref"]}))
            elif event["event"] == "publish" and len(seen) == 1:
                await ws.close(1011, "lost before the ack")  # stored, maybe, but never acknowledged
                return
            elif event["event"] == "publish":
                await ws.send(json.dumps({"event": "ack", "ref": event["ref"], "id": "id-1", "ts": 1}))
            elif event["event"] == "history":
                await ws.send(json.dumps({"event": "history", "room": event["room"], "ref": event["ref"],
                                          "messages": []}))

    async def scenario() -> None:
        async with serve(handler, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            async with connect(f"ws://127.0.0.1:{port}", user="u", backoff=Backoff(initial=0.01)) as hub:
                room = await hub.join("r", presence=False)
                ack = await room.publish({"n": 1})
                assert ack.id == "id-1" and hub.reconnects == 1
        first, second = seen
        assert [e["event"] for e in first] == ["join", "publish"]
        assert [e["event"] for e in second][:2] == ["join", "publish"]
        assert second[1]["key"] == first[1]["key"] and second[1]["data"] == {"n": 1}
        assert second[0]["presence"] is False

    run(scenario())


def test_reconnection_gives_up_after_the_configured_attempts() -> None:
    async def scenario() -> None:
        server = spawn_server(*FAST)
        running = await in_thread(server)
        async with connect(running.url, user="u", backoff=Backoff(initial=0.01, maximum=0.05, attempts=3)) as hub:
            room = await hub.join("r")
            await leave_thread(server)  # gone, and nobody comes back on that port
            with pytest.raises(HubbubClosed) as closed:
                await asyncio.wait_for(anext(room), 20)
            assert "3 reconnection attempts" in str(closed.value)
            with pytest.raises(HubbubClosed):
                await hub.join("s")

    run(scenario())


def test_catching_up_through_history_rewinds_over_messages_that_came_out_of_id_order() -> None:
    """Until every instance sequences each room (issue 15), a message from another instance can
    arrive after one with a greater id. Caught up through ``history``, the client pages from the
    smallest of its recent ids, so a message with an id below the last delivered one that was still
    on its way is not lost, and what it had already is dropped (scripted server)."""
    from websockets.asyncio.server import ServerConnection, serve

    def message(n: int) -> dict[str, Any]:
        return {"event": "message", "room": "r", "id": f"id-{n:03d}", "ts": n, "user": "u", "data": n}

    stored = [message(n) for n in (1, 2, 3, 4)]
    afters: list[str | None] = []

    async def handler(ws: ServerConnection) -> None:
        first = not afters
        async for frame in ws:
            event = json.loads(frame)
            if event["event"] == "join":
                await ws.send(json.dumps({"event": "joined", "room": "r", "ref": event["ref"]}))
                if first:
                    afters.append(None)
                    for n in (1, 3):  # 2 (from "another instance") is still on its way when the socket drops
                        await ws.send(json.dumps(message(n)))
                    await ws.close(1012)
                    return
            elif event["event"] == "history":
                afters.append(event.get("after"))
                page = [m for m in stored if m["id"] > event.get("after", "")][: event.get("limit", 50)]
                await ws.send(json.dumps({"event": "history", "room": "r", "ref": event["ref"], "messages": page}))

    async def scenario() -> None:
        async with serve(handler, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            async with connect(f"ws://127.0.0.1:{port}", user="u", backoff=Backoff(initial=0.01)) as hub:
                room = await hub.join("r", presence=False)
                assert [m.data for m in await take(room, 4)] == [1, 3, 2, 4]
                assert afters[1] == "id-001"  # from the smallest recent id, not from the last (id-003)

    run(scenario())
