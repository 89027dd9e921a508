"""Brokers: how several hubbub instances act as one.

``--broker`` picks one by URL:

- ``memory`` (the default): one instance; nothing leaves the process.
- ``redis://HOST:PORT/DB``: Redis pub/sub through redis-py's asyncio client.
- ``nats://HOST:PORT``: NATS core pub/sub through nats-py.

What goes over the wire is one channel (Redis) or subject (NATS), ``--broker-channel``,
carrying small JSON envelopes, each tagged with the sending instance's node tag ``n``:

- ``{"n": NODE, "q": SEQ, "r": ROOM, "m": MESSAGE}``: a chat message for the room's members
  elsewhere; ``q`` counts 1, 2, 3... per node, so a receiver sees a gap.
- ``{"n": NODE, "p": {ROOM: [USERS]}}``: a presence heartbeat, the node's whole local
  presence, sent on every change and every ``presence_heartbeat`` seconds; ``"p": null``
  is a goodbye.
- ``{"n": NODE, "s": {NODE2: SEQ, ...}}``: "I (re)connected, or saw a gap: the last I have
  from NODE2 is SEQ". Everyone answers with a heartbeat, and NODE2 sends again what it
  published after SEQ (from its ring of the last ``replay`` messages).

Exactly once and in order: one connection publishes a node's envelopes in the order the
core produced them, and Redis and NATS keep a publisher's order. Pub/sub forgets what
arrives while a subscriber is away, so a receiver delivers each node's messages strictly
in ``q`` order: a repeat is dropped; after a gap the newer messages wait (up to
``max_pending``) while it asks for a replay; a gap still open after ``gap_timeout``
seconds (the messages fell out of the publisher's ring, or the publisher died) is given
up and counted in ``lost``. The core's own check (no id older than the last one delivered
from a node) stands behind this. While the broker is unreachable, envelopes wait in a
bounded queue (``max_queue``) and go out, in order, on reconnect; a batch whose fate is
unknown is sent again and the receivers drop the copies.

One bad envelope costs only itself. A received envelope is checked field by field; a
malformed one is dropped and counted in ``malformed``, a sink callback that raises on one is
counted in ``failures``, and the next envelope is handled as usual (either is logged at most
once a second, with the number held back). An outgoing envelope that is not strict JSON
(NaN, a lone surrogate) is dropped and counted in ``failures``: ``publish`` never raises
into the event loop.

Presence expiry lives in the core (``presence_ttl`` after the last heartbeat); with Redis
each node's presence is also kept in a key that expires after ``presence_ttl``, which a
(re)starting instance reads so it knows everyone at once.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import anyio
import orjson

log = logging.getLogger("hubbub.broker")

_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _presence_of_room(users: Any) -> bool:
    """One room's presence in a heartbeat: a list of user names, or user name -> that user's metas
    (objects), one per connection."""
    if isinstance(users, list):
        return all(isinstance(user, str) for user in users)
    return isinstance(users, dict) and all(
        isinstance(metas, list) and all(isinstance(meta, dict) for meta in metas) for metas in users.values()
    )


def _decode(data: bytes | str) -> dict[str, Any]:
    """A received envelope, strict JSON checked field by field (see the module's docstring);
    ValueError (or RecursionError, for absurdly nested JSON) says what is wrong with it."""
    envelope = orjson.loads(data)  # strict: no NaN or Infinity, no lone surrogate, nesting bounded
    if not isinstance(envelope, dict):
        raise ValueError("not a JSON object")
    node = envelope.get("n")
    if not isinstance(node, str):
        raise ValueError("n is not a string")
    try:
        node.encode()  # we send node tags back (replay requests): they must be text we can send
    except UnicodeEncodeError:
        raise ValueError("n is not valid text") from None
    if "m" in envelope:
        if not _is_int(envelope.get("q")):
            raise ValueError("q is not an integer")
        if not isinstance(envelope.get("r"), str):
            raise ValueError("r is not a string")
        if not isinstance(envelope["m"], dict):
            raise ValueError("m is not an object")
    elif "p" in envelope:
        rooms = envelope["p"]
        if rooms is not None and not (isinstance(rooms, dict) and all(map(_presence_of_room, rooms.values()))):
            raise ValueError("p is neither null nor an object of rooms' presence")
    elif "s" in envelope:
        marks = envelope["s"]
        if not (isinstance(marks, dict) and all(_is_int(seq) for seq in marks.values())):
            raise ValueError("s is not an object of sequence numbers")
    else:
        raise ValueError("neither m, p nor s")
    return envelope


class _Throttle:
    """At most one log line every ``every`` seconds for one kind of trouble; the lines held back are
    counted in the next, so a flood of bad envelopes cannot flood the log (nor cost the time to
    write it)."""

    def __init__(self, every: float = 1.0) -> None:
        self.every = every
        self._next = -math.inf
        self._held = 0

    def log(self, level: int, msg: str, *args: Any, exc_info: BaseException | None = None) -> None:
        now = time.monotonic()
        if now < self._next:
            self._held += 1
            return
        if self._held:
            msg += " (and %d more since the last such line)"
            args = (*args, self._held)
        log.log(level, msg, *args, exc_info=exc_info)
        self._next = now + self.every
        self._held = 0


class Sink(Protocol):
    """Where a broker hands what it receives: the shell, which passes it on to the core."""

    def on_message(self, room: str, message: Mapping[str, Any], node: str) -> None: ...
    def on_presence(self, node: str, rooms: Mapping[str, Sequence[str]] | None) -> None: ...
    def on_sync(self) -> None: ...
    def on_broker_status(self, up: bool) -> None: ...


class BrokerUnavailable(Exception):
    """The broker connection failed; the run loop reconnects with backoff."""


class MemoryBroker:
    """One instance, nothing to share: publishing goes nowhere and the broker is always up."""

    name = "memory"
    up = True
    dropped = 0
    lost = 0
    queued = 0
    malformed = 0
    failures = 0

    def __init__(self, node: str = "", **_: Any) -> None:
        self.node = node

    async def run(self, sink: Sink, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await anyio.sleep_forever()

    def publish(self, room: str, message: Mapping[str, Any]) -> None:
        pass

    def publish_presence(self, rooms: Mapping[str, Sequence[str]] | None) -> None:
        pass

    async def close(self) -> None:
        pass


class Peer:
    """What this instance has received from another node's message stream."""

    __slots__ = ("gap_since", "heard", "next", "pending")

    def __init__(self, next_seq: int) -> None:
        self.next = next_seq  # the q we deliver next
        self.pending: dict[int, tuple[str, Any]] = {}  # q -> (room, message), waiting behind a gap
        self.gap_since: float | None = None
        self.heard = time.monotonic()


class PubSubBroker:
    """The part Redis and NATS share: the outbound queue, the replay ring, the reconnect loop,
    the in-order receiving and the envelopes.

    A subclass opens the connection (``_open``), sends a batch of envelopes
    (``_send``), reads envelopes until the connection fails (``_listen``),
    and closes (``_close``).
    """

    name = "pubsub"

    def __init__(
        self,
        url: str,
        node: str,
        channel: str = "hubbub",
        presence_ttl: float = 6.0,
        max_queue: int = 100_000,
        max_batch: int = 512,
        replay: int = 10_000,
        max_pending: int = 10_000,
        gap_timeout: float = 2.0,
        observe: Callable[[str, float], None] | None = None,
    ) -> None:
        self.url = url
        self.node = node
        self.channel = channel
        self.presence_ttl = presence_ttl
        self.max_batch = max_batch
        self.max_pending = max_pending
        self.gap_timeout = gap_timeout
        self.observe = observe or (lambda op, seconds: None)
        self.up = False
        self.dropped = 0  # envelopes dropped because the queue was full during an outage
        self.lost = 0  # messages from others given up after a gap that no replay filled
        self.malformed = 0  # received envelopes dropped as malformed
        self.failures = 0  # sink callbacks that raised, and our envelopes that could not be encoded
        self._malformed_log = _Throttle()
        self._failure_log = _Throttle()
        self._seq = 0
        self._queue: deque[tuple[int, bytes]] = deque()  # (q, envelope), not yet sent
        self._max_queue = max_queue
        self._sent: deque[tuple[int, bytes]] = deque(maxlen=replay)  # the last messages sent, for replays
        self._replay: list[bytes] = []
        self._control: list[bytes] = []  # sync requests, sent before anything else
        self._peers: dict[str, Peer] = {}
        self._presence: bytes | None = None  # the newest heartbeat, not yet sent
        self._presence_rooms: Mapping[str, Sequence[str]] | None = {}
        self._wake: anyio.Event | None = None  # made in run(): an Event belongs to a running loop

    @property
    def queued(self) -> int:
        return len(self._queue)

    # -- what the shell calls (never blocks) ------------------------------------

    def publish(self, room: str, message: Mapping[str, Any]) -> None:
        seq = self._seq + 1
        data = self._pack({"n": self.node, "q": seq, "r": room, "m": message})
        if data is None:
            return  # its sequence number is not used, so the others see no gap
        if len(self._queue) >= self._max_queue:
            self._queue.popleft()
            self.dropped += 1
        self._seq = seq
        self._queue.append((seq, data))
        self._poke()

    def publish_presence(self, rooms: Mapping[str, Sequence[str]] | None) -> None:
        data = self._pack({"n": self.node, "p": rooms})
        if data is None:
            return  # the last heartbeat that could be sent stays the one repeated
        self._presence_rooms = rooms
        self._presence = data
        self._poke()

    async def close(self) -> None:
        """Send what is queued and a presence goodbye, for at most a second."""
        self.publish_presence(None)
        with anyio.move_on_after(1.0):
            while self.up and (self._queue or self._presence is not None):
                await anyio.sleep(0.01)

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _pack(self, envelope: Mapping[str, Any]) -> bytes | None:
        """An envelope as strict JSON in UTF-8, or None (logged, counted in ``failures``) when it cannot
        be: NaN or Infinity, a lone surrogate, a value JSON does not have."""
        try:
            return _encode(envelope).encode()
        except (ValueError, TypeError) as exc:
            self.failures += 1
            self._failure_log.log(logging.ERROR, "broker: dropped an envelope that is not JSON (%r): %.200r", exc,
                                  envelope)
            return None

    # -- the loop ---------------------------------------------------------------

    async def run(self, sink: Sink, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """Connect, subscribe, send and receive; on failure reconnect with backoff, forever."""
        self._wake = anyio.Event()
        task_status.started()
        delay = 0.1
        while True:
            try:
                await self._open()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._listen_into, sink)
                    tg.start_soon(self._close_gaps, sink)
                    await self._hello(sink)
                    self._set_up(True, sink)
                    delay = 0.1
                    await self._sender()
            except* BrokerUnavailable as group:
                self._set_up(False, sink, "; ".join(str(e) for e in group.exceptions))
            except* Exception as group:  # a client library's surprise: log it, reconnect, keep serving
                log.error("broker: unexpected failure, reconnecting", exc_info=group)
                self._set_up(False, sink, "unexpected failure")
            finally:
                with anyio.CancelScope(shield=True):
                    await self._close()
            await anyio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _listen_into(self, sink: Sink) -> None:
        """Hand each envelope received to ``sink`` until the subscription fails. Each is on its own: a
        malformed one or a sink that raises costs that envelope, not the connection and all behind it."""
        async for data in self._listen():
            try:
                envelope = _decode(data)
            except (ValueError, RecursionError) as exc:
                self._malformed_envelope(exc, data)
                continue
            self._dispatch(sink, envelope)
        raise BrokerUnavailable("subscription ended")

    def _dispatch(self, sink: Sink, envelope: dict[str, Any]) -> None:
        """One envelope that ``_decode`` accepted, to the sink; one the sink fails on is logged and counted."""
        node = envelope["n"]
        if node == self.node:
            return
        try:
            if "m" in envelope:
                self._receive(sink, node, envelope["q"], envelope["r"], envelope["m"])
            elif "p" in envelope:
                sink.on_presence(node, envelope["p"])
            else:
                self._on_sync(envelope["s"])
                sink.on_sync()
        except Exception as exc:
            self._sink_failed(exc)

    def _deliver(self, sink: Sink, room: str, message: Any, node: str) -> None:
        """``sink.on_message``, contained: a message the sink fails on still counts as delivered, so the
        ones behind it are not held back as if after a gap."""
        try:
            sink.on_message(room, message, node)
        except Exception as exc:
            self._sink_failed(exc)

    def _sink_failed(self, exc: Exception) -> None:
        self.failures += 1
        self._failure_log.log(logging.ERROR, "broker: the sink failed on an envelope: %r", exc, exc_info=exc)

    def _malformed_envelope(self, exc: BaseException, data: bytes | str) -> None:
        self.malformed += 1
        self._malformed_log.log(logging.WARNING, "broker: ignored a malformed envelope (%s): %.200r", exc, data)

    def _receive(self, sink: Sink, node: str, seq: int, room: str, message: Any) -> None:
        """Deliver each node's messages once, in q order; hold the newer ones behind a gap."""
        peer = self._peers.get(node)
        if peer is None:  # the first we hear of it: its stream starts here for us
            peer = self._peers[node] = Peer(seq)
        peer.heard = time.monotonic()
        if seq < peer.next or seq in peer.pending:
            return  # a repeat (a replay, or a batch sent again after an outage)
        if seq > peer.next:
            if peer.gap_since is None:
                peer.gap_since = time.monotonic()
                self._request_replay({node: peer.next - 1})
            if len(peer.pending) >= self.max_pending:
                self._skip_gap(sink, node, peer)
            peer.pending[seq] = (room, message)
            return
        self._deliver(sink, room, message, node)
        peer.next = seq + 1
        self._drain(sink, node, peer)

    def _drain(self, sink: Sink, node: str, peer: Peer) -> None:
        pending = peer.pending
        while peer.next in pending:
            room, message = pending.pop(peer.next)
            self._deliver(sink, room, message, node)
            peer.next += 1
        if not pending:
            peer.gap_since = None

    def _skip_gap(self, sink: Sink, node: str, peer: Peer) -> None:
        first = min(peer.pending)
        self.lost += first - peer.next
        log.warning("broker: gave up on %d messages from %s (no replay came)", first - peer.next, node)
        peer.next = first
        self._drain(sink, node, peer)
        if peer.pending:
            peer.gap_since = time.monotonic()

    async def _close_gaps(self, sink: Sink, forget_after: float = 3600.0) -> None:
        """Give up gaps no replay filled; forget nodes silent for an hour (a restart is a new node)."""
        while True:
            await anyio.sleep(self.gap_timeout / 4)
            now = time.monotonic()
            for node, peer in list(self._peers.items()):
                if peer.gap_since is not None and now - peer.gap_since >= self.gap_timeout:
                    self._skip_gap(sink, node, peer)
                elif not peer.pending and now - peer.heard > forget_after:
                    del self._peers[node]

    def _request_replay(self, marks: Mapping[str, int]) -> None:
        data = self._pack({"n": self.node, "s": marks})
        if data is not None:
            self._control.append(data)
            self._poke()

    def _on_sync(self, marks: Mapping[str, int]) -> None:
        """Another instance (re)connected or saw a gap: send again what it lacks of ours."""
        mark = marks.get(self.node)
        if mark is None:
            return  # it never heard from us
        self._replay = [envelope for seq, envelope in self._sent if seq > mark]
        if self._replay:
            self._poke()

    async def _hello(self, sink: Sink) -> None:
        """Just (re)connected: ask everyone for their presence and for what we missed; send ours."""
        marks = {node: peer.next - 1 for node, peer in self._peers.items()}
        hello = self._pack({"n": self.node, "s": marks})
        if hello is not None:
            await self._send([hello])
        if self._presence is None and self._presence_rooms is not None:
            self._presence = self._pack({"n": self.node, "p": self._presence_rooms})

    async def _sender(self) -> None:
        queue = self._queue
        sent = self._sent
        while True:
            if self._control:
                control, self._control = self._control, []
                await self._send(control)
                continue
            if self._replay:
                replay = self._replay
                await self._send(replay)
                if self._replay is replay:
                    self._replay = []
                continue
            if self._presence is None and not queue:
                assert self._wake is not None
                await self._wake.wait()
                self._wake = anyio.Event()
                continue
            taken = [queue.popleft() for _ in range(min(len(queue), self.max_batch))]
            batch = [envelope for _, envelope in taken]
            presence = self._presence
            if presence is not None:
                batch.append(presence)
            started = time.perf_counter()
            try:
                await self._send(batch, presence=presence is not None)
            except BaseException:
                queue.extendleft(reversed(taken))  # unsent, or its fate unknown: send again on reconnect
                raise
            self.observe("publish", time.perf_counter() - started)
            sent.extend(taken)
            if self._presence is presence:
                self._presence = None

    def _set_up(self, up: bool, sink: Sink, why: str = "") -> None:
        if up != self.up:
            self.up = up
            if up:
                log.warning("broker: connected to %s", self.name)
            else:
                log.warning("broker: %s unreachable (%s); %d messages wait", self.name, why, len(self._queue))
            sink.on_broker_status(up)
        elif not up:
            log.debug("broker: still unreachable: %s", why)

    # -- for subclasses -----------------------------------------------------------

    async def _open(self) -> None:
        raise NotImplementedError

    async def _send(self, batch: list[bytes], presence: bool = False) -> None:
        raise NotImplementedError

    def _listen(self) -> Any:
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError


class RedisBroker(PubSubBroker):
    """Redis pub/sub: one connection publishes (pipelined batches), one subscribes."""

    name = "redis"

    def __init__(self, url: str, node: str, **kwargs: Any) -> None:
        super().__init__(url, node, **kwargs)
        self._client: Any = None
        self._pubsub: Any = None
        self._node_key = f"{self.channel}:node:{node}"

    async def _open(self) -> None:
        import redis.asyncio as redis
        from redis.exceptions import RedisError

        self._errors = (RedisError, OSError)
        try:
            self._client = redis.Redis.from_url(
                self.url, socket_connect_timeout=2.0, socket_timeout=5.0, retry_on_timeout=False,
                retry=None, single_connection_client=True,
            )
            self._pubsub = redis.Redis.from_url(self.url, socket_connect_timeout=2.0, retry=None).pubsub(
                ignore_subscribe_messages=True
            )
            await self._pubsub.subscribe(self.channel)
            keys = [key async for key in self._client.scan_iter(match=f"{self.channel}:node:*", count=500)]
            self._known = await self._client.mget(keys) if keys else []
        except self._errors as exc:
            raise BrokerUnavailable(str(exc) or type(exc).__name__) from exc

    async def _hello(self, sink: Sink) -> None:
        for value in self._known:
            if value is None:
                continue
            try:
                envelope = _decode(value)
            except (ValueError, RecursionError) as exc:
                self._malformed_envelope(exc, value)
                continue
            if "p" in envelope:
                self._dispatch(sink, envelope)
        await super()._hello(sink)

    async def _send(self, batch: list[bytes], presence: bool = False) -> None:
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for data in batch:
                    pipe.publish(self.channel, data)
                if presence:
                    if self._presence_rooms is None:
                        pipe.delete(self._node_key)
                    else:
                        pipe.set(self._node_key, batch[-1], px=int(self.presence_ttl * 1000))
                await pipe.execute()
        except self._errors as exc:
            raise BrokerUnavailable(str(exc) or type(exc).__name__) from exc

    async def _listen(self) -> Any:
        try:
            while True:
                message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
                if message is not None and message["type"] == "message":
                    yield message["data"]
        except self._errors as exc:
            raise BrokerUnavailable(str(exc) or type(exc).__name__) from exc

    async def _close(self) -> None:
        for closable in (self._pubsub, self._client):
            if closable is None:
                continue
            try:
                await closable.aclose()
            except Exception as exc:  # closing a broken connection may fail in many ways; it is gone anyway
                log.debug("broker: close: %r", exc)
        self._pubsub = self._client = None


class NatsBroker(PubSubBroker):
    """NATS core pub/sub; nats-py's own reconnect is off so the shared loop above owns it."""

    name = "nats"

    def __init__(self, url: str, node: str, **kwargs: Any) -> None:
        super().__init__(url, node, **kwargs)
        self._nc: Any = None
        self._sub: Any = None

    async def _open(self) -> None:
        import nats
        from nats.errors import Error as NatsError

        self._errors = (NatsError, OSError, TimeoutError)

        async def quiet(exc: Exception) -> None:
            log.debug("broker: nats: %r", exc)

        try:
            self._nc = await nats.connect(
                self.url, allow_reconnect=False, connect_timeout=2, max_reconnect_attempts=0,
                error_cb=quiet, ping_interval=5, max_outstanding_pings=2,
            )
            self._sub = await self._nc.subscribe(self.channel, pending_msgs_limit=1_000_000)
        except self._errors as exc:
            raise BrokerUnavailable(str(exc) or type(exc).__name__) from exc

    async def _send(self, batch: list[bytes], presence: bool = False) -> None:
        nc = self._nc
        try:
            for data in batch:
                await nc.publish(self.channel, data)
            await nc.flush(timeout=5)
        except self._errors as exc:
            raise BrokerUnavailable(str(exc) or type(exc).__name__) from exc
        if nc.is_closed:
            raise BrokerUnavailable("connection closed")

    async def _listen(self) -> Any:
        sub = self._sub
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=1.0)
                except TimeoutError:
                    if self._nc.is_closed or not self._nc.is_connected:
                        raise BrokerUnavailable("connection lost") from None
                    continue
                yield msg.data
        except self._errors as exc:
            raise BrokerUnavailable(str(exc) or type(exc).__name__) from exc

    async def _close(self) -> None:
        if self._nc is not None:
            try:
                await self._nc.close()
            except Exception as exc:  # closing a broken connection may fail in many ways; it is gone anyway
                log.debug("broker: close: %r", exc)
        self._nc = self._sub = None


def open_broker(url: str, node: str, **kwargs: Any) -> MemoryBroker | PubSubBroker:
    """The broker a ``--broker`` URL names."""
    if url == "memory":
        return MemoryBroker(node)
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisBroker(url, node, **kwargs)
    if url.startswith(("nats://", "tls://")):
        return NatsBroker(url, node, **kwargs)
    raise ValueError(f"unknown --broker {url!r}: expected memory, redis://HOST:PORT/DB or nats://HOST:PORT")
