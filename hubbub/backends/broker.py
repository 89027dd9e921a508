"""Brokers: how several hubbub instances act as one.

``--broker`` picks one by URL:

- ``memory`` (the default): one instance; nothing leaves the process.
- ``redis://HOST:PORT/DB``: Redis pub/sub through redis-py's asyncio client.
- ``nats://HOST:PORT``: NATS core pub/sub through nats-py.

What goes over the wire is one channel (Redis) or subject (NATS), ``--broker-channel``,
carrying small JSON envelopes, each tagged with the sending instance's node tag ``n``:

- ``{"n": NODE, "q": FIRST, "b": [{"r": ROOM, "m": MESSAGE}, ...]}``: a batch of chat messages for
  the rooms' members elsewhere, numbered FIRST, FIRST + 1, ... in the order they were published
  (every node counts 1, 2, 3... so a receiver sees a gap). Everything one instance publishes while
  its sender is busy (at least one loop pass's worth) leaves as one batch, up to ``batch_messages``
  messages or ``batch_bytes`` bytes: one broker round trip and one decode for hundreds of messages.
  Each item is an object so that per-message fields can join ``r`` and ``m`` later (a per-room
  order, say); a receiver ignores the fields it does not know.
- ``{"n": NODE, "q": SEQ, "r": ROOM, "m": MESSAGE}``: one message, the format before batches; still
  received as a batch of one, so instances of both versions can run side by side during an upgrade.
- ``{"n": NODE, "p": {ROOM: [USERS]}}``: a presence heartbeat, the node's whole local
  presence, sent on every change and every ``presence_heartbeat`` seconds; ``"p": null``
  is a goodbye. Several changes while the sender is busy cost one heartbeat: the newest.
- ``{"n": NODE, "s": {NODE2: SEQ, ...}}``: "I (re)connected, or saw a gap: the last I have
  from NODE2 is SEQ". Everyone answers with a heartbeat, and NODE2 sends again what it
  published after SEQ (from its ring of the last ``replay`` messages, batched again).

Exactly once and in order: one connection publishes a node's envelopes in the order the
core produced them, and Redis and NATS keep a publisher's order. Pub/sub forgets what
arrives while a subscriber is away, so a receiver delivers each node's messages strictly
in sequence order: a repeat is dropped; after a gap the newer messages wait (up to
``max_pending``) while it asks for a replay; a gap still open after ``gap_timeout``
seconds (the messages fell out of the publisher's ring, or the publisher died) is given
up and counted in ``lost``. The core's own check (no id older than the last one delivered
from a node) stands behind this. While the broker is unreachable, messages wait in a
bounded queue (``max_queue``) and go out, in order, on reconnect; a batch whose fate is
unknown is sent again and the receivers drop the copies.

One bad envelope costs only itself, and one bad item of a batch only that item. A received
envelope is checked field by field; a malformed one (or item) is dropped and counted in
``malformed`` (an item keeps its place in the sequence, so it opens no gap), a sink callback
that raises on one is counted in ``failures``, and the next is handled as usual (either is
logged at most once a second, with the number held back). An outgoing message that is not
strict JSON (NaN, a lone surrogate) or too large for the broker is dropped and counted in
``failures``: ``publish`` never raises into the event loop.

Sequencing (Redis; ``sequence=True``, as ``server.py`` runs it): one order per room on every instance,
ids following it (PROTOCOL.md §3). A message the core hands to ``sequence`` is not delivered anywhere
yet. The sender orders each batch with one Lua script call (``_ORDER_SCRIPT``, loaded once, EVALSHA,
loaded again on NOSCRIPT): it takes the next positions from one hash per channel, ``{channel}:order``
(18 hex digits, milliseconds then a counter: ``max(now from TIME, last + 1)`` and above the greatest
position this instance knows, so the order also stays above the ids an outage made), and PUBLISHes
``{"g": G, "e": EPOCH, "i": FIRST, "n": NODE, "q": FIRST_Q, "b": [...]}`` in the same atomic step: item
k's position is FIRST + k. One counter for all rooms (not one per room): one key whatever the number
of rooms, ids unique across rooms, and one sequence ``g`` of ordered envelopes that every subscriber
receives in the same total order, the publishing instance included (its own ordered envelopes are
decoded, not skipped: it delivers them at their place, and the core stores and acks them then). A
receiver delivers ordered envelopes strictly in ``g`` order and each node's items once (its ``q``);
after a gap in ``g`` (a subscription that dropped) the later envelopes wait while every instance
replays the missing ones as they were published (a sync request carries ``"g": [EPOCH, G]``; our own
come from what we sent), for ``gap_timeout`` at most. A batch whose fate is unknown (the connection broke
before the script's answer) is sent again exactly as it was, and the script answers a repeat with its
first answer (each node's last batch is kept a minute) instead of ordering it twice. ``EPOCH`` is when
the hash was created: after a Redis restart (or a day of silence, ``order_ttl``) ``g`` starts again at 1
in a new epoch.
While the broker is down, messages wait to be ordered for ``sequence_grace`` seconds (a dropped
subscription is back within that, and the order goes on); past it the broker stops ordering
(``Sink.on_sequencing(False)``): the core delivers, stores and acks what waited and everything after
with its own ids, as without sequencing, and those messages go out unordered, in order, on reconnect.

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
    if "b" in envelope:
        if not _is_int(envelope.get("q")):
            raise ValueError("q is not an integer")
        items = envelope["b"]
        if not isinstance(items, list) or not items:
            raise ValueError("b is not a non-empty list")
        if "g" in envelope and not (_is_int(envelope["g"]) and _is_int(envelope.get("e"))
                                    and _is_position(envelope.get("i"))):
            raise ValueError("an ordered batch needs integers g and e and a position i")
    elif "m" in envelope:
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
        want = envelope.get("g")
        if want is not None and not (isinstance(want, list) and len(want) == 2 and all(map(_is_int, want))):
            raise ValueError("g is not [epoch, g]")
    else:
        raise ValueError("neither b, m, p nor s")
    return envelope


def _is_position(value: Any) -> bool:
    """18 lowercase hex digits: a place in the order (milliseconds, then a counter)."""
    return isinstance(value, str) and len(value) == 18 and all(c in "0123456789abcdef" for c in value)


def _next_position(position: str, count: int) -> str:
    """The position ``count`` places after ``position`` (the broker keeps a batch's in one millisecond)."""
    return f"{position[:12]}{int(position[12:], 16) + count:06x}"


def _item(item: Any) -> tuple[str, dict[str, Any]] | None:
    """One item of a batch as (room, message), or None when it is malformed."""
    if type(item) is dict:
        room = item.get("r")
        message = item.get("m")
        if type(room) is str and type(message) is dict:
            return room, message
    return None


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
    """Where a broker hands what it receives: the shell, which passes it on to the core.

    ``on_sequenced`` is a message the broker put in order (every instance's own included), with its
    ``position`` in the order (18 hex digits: milliseconds, then a counter); ``on_sequencing`` says
    whether the broker orders messages now (a sequencing broker only: see ``PubSubBroker``)."""

    def on_message(self, room: str, message: Mapping[str, Any], node: str) -> None: ...
    def on_sequenced(self, room: str, message: Mapping[str, Any], node: str, position: str) -> None: ...
    def on_sequencing(self, on: bool) -> None: ...
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
    batches_out = messages_out = batches_in = messages_in = 0

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
        self.pending: dict[int, Any] = {}  # q -> batch item ({"r": room, "m": message}), waiting behind a gap
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
        batch_messages: int = 1000,
        batch_bytes: int = 256 * 1024,
        replay: int = 10_000,
        max_pending: int = 10_000,
        gap_timeout: float = 2.0,
        observe: Callable[[str, float], None] | None = None,
        sequence: bool = False,
        sequence_grace: float = 1.0,
    ) -> None:
        self.url = url
        self.node = node
        self.channel = channel
        self.presence_ttl = presence_ttl
        self.batch_messages = batch_messages
        self.batch_bytes = batch_bytes
        self.max_pending = max_pending
        self.gap_timeout = gap_timeout
        self.observe = observe or (lambda op, seconds: None)
        self.up = False
        self.dropped = 0  # envelopes dropped because the queue was full during an outage
        self.lost = 0  # messages from others given up after a gap that no replay filled
        self.malformed = 0  # received envelopes dropped as malformed
        self.failures = 0  # sink callbacks that raised, and our envelopes that could not be encoded
        # batching at work, for /metrics: messages per envelope is messages_out / batches_out
        self.batches_out = 0  # message envelopes sent (replays not counted)
        self.messages_out = 0  # messages in them
        self.batches_in = 0  # message envelopes received from other nodes (repeats included)
        self.messages_in = 0  # messages in them
        self._malformed_log = _Throttle()
        self._failure_log = _Throttle()
        self._seq = 0
        self._queue: deque[tuple[int, bytes]] = deque()  # (q, encoded item), not yet sent
        self._max_queue = max_queue
        self._sent: deque[tuple[int, bytes]] = deque(maxlen=replay)  # the last items sent, for replays
        self._replay: list[bytes] = []  # envelopes to send again (another node asked)
        self._node_json = orjson.dumps(node)
        # how every envelope we send begins (batches and _pack's alike: "n" first, no spaces)
        self._own_prefix = b'{"n":' + self._node_json + b","
        self._control: list[bytes] = []  # sync requests, sent before anything else
        self._peers: dict[str, Peer] = {}
        self._presence: bytes | None = None  # the newest heartbeat, not yet sent
        self._presence_rooms: Mapping[str, Sequence[str]] | None = {}
        self._wake: anyio.Event | None = None  # made in run(): an Event belongs to a running loop
        # -- sequencing (see "Sequencing" in the module's docstring) --
        self.sequences = sequence and self.can_sequence  # asked to, and able to
        self.sequencing = False  # the broker orders messages now: told to the sink as it changes
        self.sequence_grace = sequence_grace
        self._ordered: deque[tuple[int, bytes]] = deque()  # (q, encoded item) waiting for the broker to order them
        # ordered envelopes sent, as published, for replays and to fill our own gaps: (first q, last q, e, g, envelope)
        self._ordered_sent: deque[tuple[int, int, int, int, bytes]] = deque()
        self._ordered_sent_messages = 0
        self._replay_limit = replay
        self._epoch: int | None = None  # the order's epoch (when Redis started its counter), None: not known yet
        self._next_g = 1  # the ordered envelope we deliver next
        self._seen_g = 0  # the greatest g known to exist in this epoch
        self._held: dict[int, dict[str, Any]] = {}  # g -> envelope, waiting behind a gap in the order
        self._held_since: float | None = None
        self._own_delivered = 0  # the last q of ours the sink got back in order
        self._retry: tuple[int, int] | None = None  # (first q, count) of an ordered batch whose fate is unknown
        self._floor = ""  # the greatest position known here: the broker's next ones must be above it
        self._down_since = time.monotonic()
        self._outage: anyio.Event | None = None  # set when the broker goes down (made in run())
        self._sink: Sink | None = None

    can_sequence = False
    """The broker can put messages in one order (``sequence`` then turns it on)."""

    @property
    def queued(self) -> int:
        return len(self._queue) + len(self._ordered)

    # -- what the shell calls (never blocks) ------------------------------------

    max_item = 64 * 1024 * 1024
    """Bytes of one encoded message the broker takes at most (NATS lowers it to the server's max_payload)."""

    def publish(self, room: str, message: Mapping[str, Any]) -> None:
        """Queue one message for the other instances; the sender batches what is queued."""
        item = self._pack_item(room, message)
        if item is None:
            return  # its sequence number is not used, so the others see no gap
        if self.sequences:  # the order goes on above the ids this instance gave out on its own
            message_id = message.get("id")
            if isinstance(message_id, str) and message_id[:18] > self._floor:
                self._floor = message_id[:18]
        queue = self._queue
        if len(queue) >= self._max_queue:
            queue.popleft()
            self.dropped += 1
        self._seq = seq = self._seq + 1
        queue.append((seq, item))
        self._poke()

    def sequence(self, room: str, message: Mapping[str, Any]) -> None:
        """Queue one message for the broker to put in the order (while ``sequencing``): every instance,
        this one included, gets it back through ``Sink.on_sequenced`` at its place in the order. One that
        comes after ordering stopped (the core had it before it heard) goes out unordered, as the core
        then delivered it itself."""
        if not self.sequencing:
            self.publish(room, message)
            return
        item = self._pack_item(room, message)
        if item is None:
            return
        self._seq = seq = self._seq + 1
        self._ordered.append((seq, item))
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
            while self.up and (self._queue or self._ordered or self._presence is not None):
                await anyio.sleep(0.01)

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _pack_item(self, room: str, message: Mapping[str, Any]) -> bytes | None:
        """One batch item, ``{"r": ROOM, "m": MESSAGE}``, as strict JSON; None (logged, counted in
        ``failures``) when it cannot be, or is larger than the broker takes.

        orjson first, at a tenth of the standard library's cost; but it writes NaN and Infinity as
        ``null``, and refuses some values the standard library writes (integer keys), so an item
        holding ``null`` or refused by orjson is encoded again by ``_pack``'s strict encoder, which
        decides. Chat messages hold no ``null``: the fast path is the path."""
        try:
            item = orjson.dumps({"r": room, "m": message})
        except TypeError:  # orjson.JSONEncodeError: a lone surrogate, a non-str key, a type it lacks
            item = None
        if item is None or b"null" in item:
            item = self._pack({"r": room, "m": message})
            if item is None:
                return None
        if len(item) > self.max_item:
            self.failures += 1
            self._failure_log.log(logging.ERROR, "broker: dropped a message of %d bytes, more than the broker takes "
                                  "(%d)", len(item), self.max_item)
            return None
        return item

    def _envelopes(self, items: Sequence[tuple[int, bytes]]) -> list[bytes]:
        """``items`` (q, encoded item), ascending, as batch envelopes: a new one at every hole in the
        numbering (messages dropped from a full queue), every ``batch_messages`` messages and once an
        envelope passes ``batch_bytes``."""
        envelopes: list[bytes] = []
        head = b'{"n":' + self._node_json + b',"q":'
        run: list[bytes] = []
        first = expected = 0
        size = 0
        for seq, item in items:
            if run and (seq != expected or len(run) >= self.batch_messages or size + len(item) > self.batch_bytes):
                envelopes.append(b"%s%d,\"b\":[%s]}" % (head, first, b",".join(run)))
                run = []
            if not run:
                first, size = seq, 0
            run.append(item)
            size += len(item) + 1
            expected = seq + 1
        if run:
            envelopes.append(b"%s%d,\"b\":[%s]}" % (head, first, b",".join(run)))
        return envelopes

    def _take(self, queue: deque[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
        """The next envelope's worth of ``queue``'s items (at least one)."""
        taken = [queue.popleft()]
        size = len(taken[0][1])
        limit, cap = self.batch_messages, self.batch_bytes
        while queue and len(taken) < limit:
            seq, item = queue[0]
            if seq != taken[-1][0] + 1 or size + len(item) > cap:
                break
            taken.append(queue.popleft())
            size += len(item) + 1
        return taken

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
        self._outage = anyio.Event()
        self._sink = sink
        async with anyio.create_task_group() as tg:
            if self.sequences:
                tg.start_soon(self._watch_outages, sink)
            task_status.started()
            await self._connect_forever(sink)

    async def _connect_forever(self, sink: Sink) -> None:
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
        malformed one or a sink that raises costs that envelope, not the connection and all behind it.
        Our own envelopes come back too (one channel for all): they are known by their first bytes and
        skipped undecoded, which on the publishing instance is a decode of everything it publishes saved.
        Ordered envelopes begin with ``{"g":``, so ours are decoded: we deliver them at their place too."""
        own = self._own_prefix
        async for data in self._listen():
            if data.startswith(own):
                continue
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
        try:
            if "g" in envelope and "b" in envelope:
                self._order(sink, envelope)
                return
            if node == self.node:
                return
            if "b" in envelope:
                self.batches_in += 1
                self.messages_in += len(envelope["b"])
                self._receive(sink, node, envelope["q"], envelope["b"])
            elif "m" in envelope:
                self.batches_in += 1
                self.messages_in += 1
                self._receive(sink, node, envelope["q"], [envelope])
            elif "p" in envelope:
                sink.on_presence(node, envelope["p"])
            else:
                self._on_sync(envelope["s"], envelope.get("g"))
                sink.on_sync()
        except Exception as exc:
            self._sink_failed(exc)

    def _deliver(self, sink: Sink, item: Any, node: str) -> None:
        """One item of a batch to ``sink.on_message``, contained: an item that is malformed or that the
        sink fails on still counts as delivered, so the ones behind it are not held back as if after a gap."""
        checked = _item(item)
        if checked is None:
            self._malformed_envelope(ValueError("a batch item is not {r: room, m: message}"), repr(item).encode())
            return
        try:
            position = item.get("i")
            if position is None:
                sink.on_message(checked[0], checked[1], node)
            else:
                sink.on_sequenced(checked[0], checked[1], node, position)
        except Exception as exc:
            self._sink_failed(exc)

    def _sink_failed(self, exc: Exception) -> None:
        self.failures += 1
        self._failure_log.log(logging.ERROR, "broker: the sink failed on an envelope: %r", exc, exc_info=exc)

    def _malformed_envelope(self, exc: BaseException, data: bytes | str) -> None:
        self.malformed += 1
        self._malformed_log.log(logging.WARNING, "broker: ignored a malformed envelope (%s): %.200r", exc, data)

    def _receive(self, sink: Sink, node: str, first: int, items: list[Any]) -> None:
        """Deliver each node's messages once, in sequence order (``items`` are numbered from ``first``);
        hold the newer ones behind a gap."""
        peer = self._peers.get(node)
        if peer is None:  # the first we hear of it: its stream starts here for us
            peer = self._peers[node] = Peer(first)
        peer.heard = time.monotonic()
        start = peer.next - first
        if start >= len(items):
            return  # repeats only (a replay, or a batch sent again after an outage)
        if start < 0 or peer.pending:  # a gap before this batch (or one still open): they wait
            self._hold(sink, node, peer, first, items)
            return
        for item in items[start:] if start else items:
            self._deliver(sink, item, node)
        peer.next = first + len(items)

    def _hold(self, sink: Sink, node: str, peer: Peer, first: int, items: list[Any]) -> None:
        """Keep the items after a gap (each once), ask for a replay, and deliver whatever became due."""
        pending = peer.pending
        for seq, item in enumerate(items, first):
            if seq < peer.next or seq in pending:
                continue  # a repeat
            if seq > peer.next and peer.gap_since is None:
                peer.gap_since = time.monotonic()
                self._request_replay({node: peer.next - 1})
            if len(pending) >= self.max_pending:
                self._skip_gap(sink, node, peer)
            if seq == peer.next:
                self._deliver(sink, item, node)
                peer.next = seq + 1
                self._drain(sink, node, peer)
            else:
                pending[seq] = item
        self._drain(sink, node, peer)

    def _drain(self, sink: Sink, node: str, peer: Peer) -> None:
        pending = peer.pending
        while peer.next in pending:
            self._deliver(sink, pending.pop(peer.next), node)
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
            if self._held_since is not None and now - self._held_since >= self.gap_timeout:
                self._skip_order_gap(sink)
            for node, peer in list(self._peers.items()):
                if peer.gap_since is not None and now - peer.gap_since >= self.gap_timeout:
                    self._skip_gap(sink, node, peer)
                elif not peer.pending and now - peer.heard > forget_after:
                    del self._peers[node]

    def _request_replay(self, marks: Mapping[str, int], want: list[int] | None = None) -> None:
        request: dict[str, Any] = {"n": self.node, "s": marks}
        if want is not None:
            request["g"] = want
        data = self._pack(request)
        if data is not None:
            self._control.append(data)
            self._poke()

    def _on_sync(self, marks: Mapping[str, int], want: list[int] | None = None) -> None:
        """Another instance (re)connected or saw a gap: send again what it lacks of ours (``want``, [epoch, g]:
        and our ordered envelopes from g on in that epoch), as they were: in q order."""
        mark = marks.get(self.node)
        replay: list[tuple[int, bytes]] = []
        if mark is not None:  # else it never heard from us
            replay += self._envelopes_after(mark)
        for first, last, epoch, g, envelope in self._ordered_sent:
            if (mark is not None and last > mark) or (want is not None and epoch == want[0] and g >= want[1]):
                replay.append((first, envelope))
        replay.sort(key=lambda entry: entry[0])
        self._replay = [envelope for _, envelope in replay]
        if self._replay:
            self._poke()

    def _envelopes_after(self, mark: int) -> list[tuple[int, bytes]]:
        """Our unordered messages after q ``mark`` as envelopes, each with the first q of its run (the
        ordered ones between runs are replayed as they were)."""
        runs: list[list[tuple[int, bytes]]] = []
        for entry in self._sent:
            if entry[0] <= mark:
                continue
            if runs and entry[0] == runs[-1][-1][0] + 1:
                runs[-1].append(entry)
            else:
                runs.append([entry])
        return [(run[0][0], envelope) for run in runs for envelope in self._envelopes(run)]

    async def _hello(self, sink: Sink) -> None:
        """Just (re)connected: ask everyone for their presence and for what we missed; send ours."""
        marks = {node: peer.next - 1 for node, peer in self._peers.items()}
        request: dict[str, Any] = {"n": self.node, "s": marks}
        if self._held_since is not None and self._epoch is not None:  # and the ordered envelopes we missed
            request["g"] = [self._epoch, self._next_g]
        hello = self._pack(request)
        if hello is not None:
            await self._send([hello])
        if self._presence is None and self._presence_rooms is not None:
            self._presence = self._pack({"n": self.node, "p": self._presence_rooms})

    async def _sender(self) -> None:
        queue = self._queue
        ordered = self._ordered
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
            if self._presence is None and not queue and not ordered:
                assert self._wake is not None
                await self._wake.wait()
                self._wake = anyio.Event()
                continue
            # the queues in q order: what waited during an outage goes out before what came after it
            source = ordered if ordered and (not queue or ordered[0][0] < queue[0][0]) else queue
            taken = self._take(source) if source else []
            if source is ordered and self._retry is not None and taken[0][0] == self._retry[0]:
                # the batch whose fate was unknown goes again exactly as it was, so the script knows it
                keep = self._retry[1]
                source.extendleft(reversed(taken[keep:]))
                del taken[keep:]
            batch = [] if source is ordered else self._envelopes(taken)
            presence = self._presence
            if presence is not None:
                batch.append(presence)
            started = time.perf_counter()
            if taken:  # counted before the reply: the others may have the batch before we hear back
                self.batches_out += 1
                self.messages_out += len(taken)
            try:
                if source is ordered:
                    await self._send_ordered(taken, batch, presence=presence is not None)
                else:
                    await self._send(batch, presence=presence is not None)
            except BaseException:
                source.extendleft(reversed(taken))  # unsent, or its fate unknown: send again on reconnect
                if source is ordered:
                    self._retry = (taken[0][0], len(taken))
                if taken:
                    self.batches_out -= 1
                    self.messages_out -= len(taken)
                raise
            self.observe("publish", time.perf_counter() - started)
            if source is queue:
                sent.extend(taken)
            else:
                self._retry = None
            if self._presence is presence:
                self._presence = None

    async def _send_ordered(self, taken: list[tuple[int, bytes]], batch: list[bytes], presence: bool = False) -> None:
        """Have the broker order ``taken`` (one envelope, q consecutive) and publish it in the same step, with
        ``batch`` (a heartbeat) beside it; keep the envelope as published (``_ordered_sent``)."""
        rest = b'"n":%s,"q":%d,"b":[%s]}' % (self._node_json, taken[0][0], b",".join(item for _, item in taken))
        epoch, g, position = await self._order_and_publish(taken[0][0], len(taken), rest, batch, presence)
        self._floor = max(self._floor, _next_position(position, len(taken) - 1))
        self._ordered_sent.append((taken[0][0], taken[-1][0], epoch, g, b'{"g":%d,"e":%d,"i":"%s",%s' % (
            g, epoch, position.encode(), rest)))
        self._ordered_sent_messages += len(taken)
        while self._ordered_sent_messages > self._replay_limit and len(self._ordered_sent) > 1:
            first, last, *_ = self._ordered_sent.popleft()
            self._ordered_sent_messages -= last - first + 1
        if self._held_since is not None and self._sink is not None:
            self._fill_own(self._sink)  # a gap may be waiting for this very envelope, which our subscription missed

    def _set_up(self, up: bool, sink: Sink, why: str = "") -> None:
        if up != self.up:
            self.up = up
            if up:
                log.warning("broker: connected to %s", self.name)
                if self.sequences and not self.sequencing:
                    self.sequencing = True
                    sink.on_sequencing(True)
            else:
                log.warning("broker: %s unreachable (%s); %d messages wait", self.name, why, self.queued)
                self._down_since = time.monotonic()
                if self._outage is not None:
                    self._outage.set()
            sink.on_broker_status(up)
        elif not up:
            log.debug("broker: still unreachable: %s", why)

    # -- the order (a sequencing broker) -----------------------------------------------

    def _order(self, sink: Sink, envelope: dict[str, Any]) -> None:
        """An ordered envelope (anyone's, ours too): delivered in g order; the later ones wait behind a gap
        (a subscription that dropped) while the instances replay it, for ``gap_timeout`` at most."""
        epoch, g = envelope["e"], envelope["g"]
        if envelope["n"] != self.node:
            self.batches_in += 1
            self.messages_in += len(envelope["b"])
        last = _next_position(envelope["i"], len(envelope["b"]) - 1)
        if last > self._floor:
            self._floor = last
        if epoch != self._epoch:
            if self._epoch is not None and epoch < self._epoch:
                self._release(sink, envelope)  # a late replay from before Redis started its counter again
                return
            self._skip_order_gap(sink)  # a new epoch (Redis lost its counter): the old one's stragglers first
            self._epoch, self._next_g, self._seen_g = epoch, 1, 0
        self._seen_g = max(self._seen_g, g)
        if g < self._next_g:
            self._release(sink, envelope)  # a replay: the per-node numbering drops what was delivered
        elif g > self._next_g:
            self._held.setdefault(g, envelope)
            if self._held_since is None:
                self._held_since = time.monotonic()
                self._request_replay({node: peer.next - 1 for node, peer in self._peers.items()},
                                     [epoch, self._next_g])
                self._fill_own(sink)
        else:
            self._release(sink, envelope)
            self._next_g = g + 1
            self._drain_order(sink)

    def _drain_order(self, sink: Sink) -> None:
        held = self._held
        while self._next_g in held:
            self._release(sink, held.pop(self._next_g))
            self._next_g += 1
        if not held and self._seen_g < self._next_g:
            self._held_since = None

    def _release(self, sink: Sink, envelope: dict[str, Any]) -> None:
        """One ordered envelope to the sink, each item with its position; another node's through its
        numbering (once each, in its order), ours straight (the core knows which of its own it still awaits)."""
        node, first, items = envelope["n"], envelope["q"], envelope["b"]
        ms, count = envelope["i"][:12], int(envelope["i"][12:], 16)
        for k, item in enumerate(items):
            if type(item) is dict:
                item["i"] = f"{ms}{count + k:06x}"
        if node != self.node:
            self._receive(sink, node, first, items)
            return
        for item in items:
            self._deliver(sink, item, node)
        self._own_delivered = max(self._own_delivered, first + len(items) - 1)

    def _skip_order_gap(self, sink: Sink) -> None:
        """Give up waiting for the missing envelopes of the order: deliver the held ones in order (another
        node's missing messages are still asked for by its numbering, and counted in ``lost`` if they never come)."""
        for g in sorted(self._held):
            self._release(sink, self._held.pop(g))
            self._next_g = g + 1
        self._next_g = max(self._next_g, self._seen_g + 1)
        self._held_since = None

    def _fill_own(self, sink: Sink) -> None:
        """Our own ordered envelopes that the order waits for, from what we sent (our subscription missed them)."""
        for _, _, epoch, g, envelope in self._ordered_sent:
            if epoch == self._epoch and g >= self._next_g and g not in self._held:
                self._held[g] = _decode(envelope)
        self._drain_order(sink)

    def _resume_order(self, epoch: int | None, g: int) -> None:
        """Just (re)connected; the order's counter stands at (``epoch``, ``g``): what we missed of it, if anything,
        is asked for in the hello, and what follows waits for it."""
        if epoch is not None and epoch == self._epoch:
            self._seen_g = max(self._seen_g, g)
        elif epoch is not None and self._epoch is not None and epoch < self._epoch:
            return  # a counter older than ours: not ours to follow
        elif self._epoch is None and epoch is not None and not self._held:  # the first we hear: we start here
            self._epoch, self._next_g, self._seen_g = epoch, g + 1, g
        elif epoch is not None:  # Redis started its counter again: all of this epoch may be news
            if self._sink is not None:
                self._skip_order_gap(self._sink)
            self._epoch, self._next_g, self._seen_g = epoch, 1, g
        if self._seen_g >= self._next_g and self._held_since is None:
            self._held_since = time.monotonic()

    async def _watch_outages(self, sink: Sink) -> None:
        """While the broker is down, messages wait for it for ``sequence_grace`` seconds (a subscription that
        dropped reconnects within that, and the order goes on); past it, this instance stops sequencing
        (``_unsequence``) until the broker is back."""
        while True:
            assert self._outage is not None
            await self._outage.wait()
            self._outage = anyio.Event()
            while not self.up and self.sequencing:
                left = self._down_since + self.sequence_grace - time.monotonic()
                if left <= 0:
                    self._unsequence(sink)
                    break
                await anyio.sleep(left)

    def _unsequence(self, sink: Sink) -> None:
        """The broker stayed down: deliver what we hold of the order, and our own messages it ordered that
        our subscription has not brought back yet; the rest of ours go out unordered when it is back
        (the sink delivers them here now)."""
        self._skip_order_gap(sink)
        for first, last, _, _, envelope in list(self._ordered_sent):
            if last > self._own_delivered:
                decoded = _decode(envelope)
                if first <= self._own_delivered:
                    skip = self._own_delivered - first + 1
                    decoded["b"], decoded["q"] = decoded["b"][skip:], first + skip
                    decoded["i"] = _next_position(decoded["i"], skip)
                self._release(sink, decoded)
        waiting = sorted([*self._queue, *self._ordered])
        self._queue.clear()
        self._queue.extend(waiting[-self._max_queue:])
        self.dropped += max(0, len(waiting) - self._max_queue)
        self._ordered.clear()
        self.sequencing = False
        log.warning("broker: down for %.1f s: ordering stops until it is back; %d messages wait",
                    time.monotonic() - self._down_since, len(self._queue))
        sink.on_sequencing(False)

    async def _order_and_publish(
        self, first_q: int, count: int, rest: bytes, batch: list[bytes], presence: bool
    ) -> tuple[int, int, str]:
        """Order ``count`` messages (numbered from ``first_q``) and publish ``{"g":G,"e":E,"i":POSITION,`` +
        ``rest`` in one step (and ``batch`` beside it); returns (E, G, POSITION). The same batch again (after a
        failure whose fate was unknown) gets the first answer back and is not published twice."""
        raise NotImplementedError

    # -- for subclasses -----------------------------------------------------------

    async def _open(self) -> None:
        raise NotImplementedError

    async def _send(self, batch: list[bytes], presence: bool = False) -> None:
        raise NotImplementedError

    def _listen(self) -> Any:
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError


_ORDER_SCRIPT = """
-- One batch of COUNT messages put in the order and published in one atomic step. The order's state is
-- one hash: its epoch e (the time it was started), the envelopes ordered so far g, and the last position
-- (ms, seq). The batch's positions follow max(now, last + 1), above FLOOR too (the greatest this
-- instance knows), in one millisecond. Returns {e, g, first position}. The same batch sent again (its
-- fate was unknown: the connection broke before the answer) is not ordered twice: the node's last batch
-- is kept for a minute in KEYS[2] ("first q, count, e, g, position"), and a repeat gets its answer back.
local key = KEYS[1]
local count = tonumber(ARGV[2])
local batch = ARGV[7] .. ':' .. count
local last = redis.call('GET', KEYS[2])
if last and string.sub(last, 1, #batch + 1) == batch .. ':' then
  local e, g, first = string.match(string.sub(last, #batch + 2), '^(%d+):(%d+):(%x+)$')
  return {e, tonumber(g), first}
end
local floor_ms, floor_seq = tonumber(ARGV[3]), tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HMGET', key, 'e', 'g', 'ms', 'seq')
local epoch = state[1] or tostring(now)
local g = tonumber(state[2] or '0') + 1
local ms, seq = tonumber(state[3] or '0'), tonumber(state[4] or '-1') + 1
if ms < floor_ms or (ms == floor_ms and seq <= floor_seq) then ms, seq = floor_ms, floor_seq + 1 end
if ms < now then ms, seq = now, 0 end
if seq + count > 16777216 then ms, seq = ms + 1, 0 end
redis.call('HSET', key, 'e', epoch, 'g', g, 'ms', ms, 'seq', seq + count - 1)
redis.call('PEXPIRE', key, ARGV[6])
local first = string.format('%012x%06x', ms, seq)
redis.call('PUBLISH', ARGV[1], '{"g":' .. g .. ',"e":' .. epoch .. ',"i":"' .. first .. '",' .. ARGV[5])
redis.call('SET', KEYS[2], batch .. ':' .. epoch .. ':' .. g .. ':' .. first, 'PX', 60000)
return {epoch, g, first}
"""


class RedisBroker(PubSubBroker):
    """Redis pub/sub: one connection publishes (pipelined batches), one subscribes. It can sequence: one
    Lua script per batch orders it and publishes it (``_ORDER_SCRIPT``)."""

    name = "redis"
    can_sequence = True
    order_ttl = 86_400_000
    """Milliseconds the order's state outlives the last message (a channel nobody uses leaves no key)."""

    def __init__(self, url: str, node: str, **kwargs: Any) -> None:
        super().__init__(url, node, **kwargs)
        self._client: Any = None
        self._pubsub: Any = None
        self._node_key = f"{self.channel}:node:{node}"
        self._order_key = f"{self.channel}:order"
        self._batch_key = f"{self.channel}:order:{node}"  # our last ordered batch, for a repeat of it
        self._script_sha = ""

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
            if self.sequences:  # subscribed first: whatever is ordered from now on reaches us
                self._script_sha = await self._client.script_load(_ORDER_SCRIPT)
                epoch, g = await self._client.hmget(self._order_key, "e", "g")
                self._resume_order(int(epoch) if epoch else None, int(g or 0))
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
                self._publish_into(pipe, batch, presence)
                await pipe.execute()
        except self._errors as exc:
            raise BrokerUnavailable(str(exc) or type(exc).__name__) from exc

    def _publish_into(self, pipe: Any, batch: list[bytes], presence: bool) -> None:
        for data in batch:
            pipe.publish(self.channel, data)
        if presence:
            if self._presence_rooms is None:
                pipe.delete(self._node_key)
            else:
                pipe.set(self._node_key, batch[-1], px=int(self.presence_ttl * 1000))

    async def _order_and_publish(
        self, first_q: int, count: int, rest: bytes, batch: list[bytes], presence: bool
    ) -> tuple[int, int, str]:
        from redis.exceptions import NoScriptError

        floor = self._floor
        args = (self.channel, count, int(floor[:12], 16) if floor else 0, int(floor[12:], 16) if floor else -1,
                rest, self.order_ttl, first_q)
        try:
            for attempt in (1, 2):
                try:
                    async with self._client.pipeline(transaction=False) as pipe:
                        pipe.evalsha(self._script_sha, 2, self._order_key, self._batch_key, *args)
                        self._publish_into(pipe, batch, presence)
                        epoch, g, position = (await pipe.execute())[0]
                    return int(epoch), int(g), position.decode()
                except NoScriptError:  # Redis forgot it (SCRIPT FLUSH): nothing was ordered; load it again
                    if attempt == 2:
                        raise
                    self._script_sha = await self._client.script_load(_ORDER_SCRIPT)
        except self._errors as exc:
            raise BrokerUnavailable(str(exc) or type(exc).__name__) from exc
        raise AssertionError("unreachable")

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

    max_item = 1024 * 1024 - 256  # a default server's max_payload; the server's own word replaces it at connect

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
        # what this server takes in one message (1 MiB unless configured), less room for the envelope's head
        self.max_item = max(1024, self._nc.max_payload - 256)
        self.batch_bytes = min(self.batch_bytes, self.max_item)

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
