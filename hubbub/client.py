"""The Python client of hubbub's ``/ws`` protocol (PROTOCOL.md section 1), on asyncio and ``websockets``.

::

    import hubbub.client

    async with hubbub.client.connect("ws://127.0.0.1:8765", token=get_token) as hub:
        room = await hub.join("general", meta={"device": "laptop"})
        ack = await room.publish({"text": "hi"})          # Ack(id=..., ts=...), once stored
        async for message in room:                          # every message of the room, once, in order
            print(message.user, message.data)

One socket carries every room. Every request has a ``ref`` and waits for the reply with that
``ref``; an ``error`` reply raises ``HubbubError(code, detail)``.

Reconnection: when the connection drops (a network failure, a server restart: close 1001, 1006,
1011, 1012, 1013, ...) the client waits (``Backoff``: exponential with jitter), connects again
(calling a callable ``token`` again), joins every room again with ``since`` = the id of the last
message it delivered, and sends again every publish that was not acknowledged, with the same
``key`` (every publish carries a random key unless given one, so a server that deduplicates keys
stores it once). What the iterator yields stays exact across the gap: when ``joined`` says
``"recovered": true`` its ``messages`` are used; otherwise (a server that ignores ``since``, or
a gap it cannot promise) the client pages ``history`` forward from the last id until it meets the
live stream, and drops every id it has already delivered or published itself. The iterator then
yields every message of the room once, in the room's order, as if the socket had never dropped.

A close that means "do not come back" ends every iterator and pending request with
``HubbubClosed`` instead of reconnecting: 1008 (policy: flooding, an expired token), 1002/1003/
1007/1009 (the client's own frames were refused; sending them again would be refused again), any
4000-4999 code (4001: disconnected through the server API), and a refused handshake (HTTP 400,
401, 403, 404, 405, 426, ...; 429 and 5xx are retried).

This module needs the ``websockets`` library: ``pip install 'hubbub[client]'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
import logging
import random
import secrets
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

__all__ = [
    "Ack",
    "Backoff",
    "ConnectionLost",
    "Hub",
    "HubbubClosed",
    "HubbubError",
    "Message",
    "Room",
    "connect",
]

log = logging.getLogger("hubbub.client")

TokenSource = str | Callable[[], str | Awaitable[str]] | None
"""A token: a string, or a (sync or async) callable asked for one at every connect and refresh."""

FATAL_CLOSE_CODES = frozenset({1002, 1003, 1007, 1008, 1009})
"""Closes after which connecting again would only be refused again (plus every 4000-4999 code)."""
RETRIED_HTTP_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
"""Handshake refusals worth retrying (overload, a proxy in front of a restarting server)."""
HISTORY_PAGE = 100
"""Messages asked for per ``history`` page while catching up (the server's default ``--history-max``)."""
SEEN_IDS = 10_000
"""Ids remembered per room to drop duplicates (delivered and self-published ones)."""
MAX_MESSAGE_SIZE = 64 * 1024
"""The server's default ``--max-message-size``: a frame over it would be closed 1009, which ends the client."""
REWIND = 100
"""Catching up through ``history``, the client pages from the smallest of the last ``REWIND`` ids it
delivered rather than from the last one: where the broker does not sequence the rooms (NATS, or
around a Redis outage: PROTOCOL.md section 3, README "What is and is not promised across instances"), messages from two
instances can arrive slightly out of id order, and one with a smaller id than the last delivered
could still have been on its way. What comes twice is dropped."""


class HubbubError(Exception):
    """An ``error`` reply (``code``: ``not_joined``, ``forbidden``, ``bad_room``, ...), or a room the
    server removed this connection from (``code``: the ``left`` event's ``reason``)."""

    def __init__(self, code: str, detail: str = "", room: str | None = None) -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail
        self.room = room


class HubbubClosed(Exception):
    """The connection ended for good: closed by the user, refused, or closed with a code that means
    "do not come back" (``code``: the close code, or ``None``; ``status``: a refused handshake's
    HTTP status)."""

    def __init__(self, reason: str, code: int | None = None, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.status = status


@dataclass(frozen=True)
class Message:
    """A message of a room: ``data`` (v2, the server API) or ``text`` (v1 chat), as stored."""

    room: str
    id: str
    ts: int | None
    user: str
    data: Any = None
    text: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_event(cls, event: dict[str, Any], room: str | None = None) -> Message:
        return cls(room=event.get("room", room) or "", id=event["id"], ts=event.get("ts"),
                   user=event.get("user", ""), data=event.get("data"), text=event.get("text"), raw=event)


@dataclass(frozen=True)
class Ack:
    """A publish the server stored: its ``id`` and ``ts`` (Unix milliseconds)."""

    id: str
    ts: int | None


@dataclass
class Backoff:
    """Waits between reconnection attempts: ``initial * factor ** attempt`` seconds, capped at
    ``maximum``, times a random factor in ``[1 - jitter, 1]`` (so a restart does not bring every
    client back in the same millisecond). ``attempts``: give up after this many failed attempts in
    a row (``None``: never). Subclass and override ``wait`` to control it in tests."""

    initial: float = 0.5
    factor: float = 2.0
    maximum: float = 15.0
    jitter: float = 0.5
    attempts: int | None = None
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt number ``attempt`` (0: the first after a drop)."""
        base = min(self.maximum, self.initial * self.factor ** min(attempt, 64))
        return base * (1.0 - self.jitter * self.rng.random())

    async def wait(self, attempt: int) -> None:
        """Sleep before attempt number ``attempt``."""
        await asyncio.sleep(self.delay(attempt))


@dataclass
class _Request:
    frame: dict[str, Any]
    future: asyncio.Future[dict[str, Any]]
    resend: bool  # sent again on a new connection while unanswered (else failed with ConnectionLost)
    generation: int = -1  # the connection it was last sent on


class ConnectionLost(ConnectionError):
    """The connection dropped before a request that is not sent again (``Hub.request``) was answered."""




_END = object()


class Room:
    """A room this hub joined: ``publish``, ``history``, ``leave``, ``presence``; iterate it for
    its messages (``async for message in room``)."""

    def __init__(self, hub: Hub, name: str, meta: dict[str, Any] | None, watch: bool, since: str | None,
                 on_presence: Callable[[Room], Any] | None) -> None:
        self.hub = hub
        self.name = name
        self.meta = meta
        self.watch = watch
        self.presence: dict[str, list[dict[str, Any]]] = {}
        """Who is here: user -> one meta per connection, kept current from ``presence_diff``."""
        self.last_id: str | None = since
        """The id of the last message delivered (what a rejoin asks ``since``)."""
        self.on_presence = on_presence
        self._queue: asyncio.Queue[Message | object] = asyncio.Queue()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._recent: deque[str] = deque(maxlen=REWIND)  # the last ids delivered
        self._recovering = False
        self._live: list[Message] = []  # live messages that arrived while catching up
        self._presence_changed = asyncio.Event()  # set (and replaced) at every change
        self._ended: BaseException | None = None
        self.left = False

    def __repr__(self) -> str:
        return f"<Room {self.name!r} last_id={self.last_id!r}>"

    # -- the public API ---------------------------------------------------------------------

    async def publish(self, data: Any, key: str | None = None) -> Ack:
        """Publish ``data`` (any JSON value) to the room; returns once the server stored it.

        ``key`` (at most 64 bytes) is the idempotency key; a random one is used unless given. The
        publish is sent again with the same key after a reconnect until it is acknowledged.
        Raises ``HubbubError`` on an ``error`` reply (``forbidden``, ``not_joined``, ...)."""
        frame = {"event": "publish", "room": self.name, "data": data,
                 "key": key if key is not None else secrets.token_urlsafe(16)}
        reply = await self.hub._request(frame, resend=True)
        ack = Ack(reply["id"], reply.get("ts"))
        self._remember(ack.id)  # our own message: never yielded back (live, the server does not echo it)
        return ack

    async def history(self, limit: int | None = None, before: str | None = None,
                      after: str | None = None) -> list[Message]:
        """One page of the room's stored messages, oldest first (``after``: the oldest ``limit`` after
        that id; ``before``: the newest ``limit`` before it; both: between them)."""
        page = await self._history_page(limit, before, after, resend=True)
        return [Message.from_event(m, self.name) for m in page["messages"]]

    async def leave(self) -> None:
        """Leave the room; iterating it then ends."""
        if self.left:
            return
        self.hub._rooms.pop(self.name, None)
        self._end(None)
        try:
            await self.hub._request({"event": "leave", "room": self.name}, resend=False)
        except (ConnectionLost, HubbubClosed):
            pass  # gone with the connection: a new one does not join it again
        except HubbubError as exc:
            if exc.code != "not_joined":
                raise

    async def update_presence(self, meta: dict[str, Any]) -> None:
        """Replace this connection's presence metadata in the room (members get a ``presence_diff``)."""
        self.meta = meta
        await self.hub._send({"event": "presence_update", "room": self.name, "meta": meta})

    async def wait_presence(self, predicate: Callable[[dict[str, list[dict[str, Any]]]], bool] | None = None
                            ) -> dict[str, list[dict[str, Any]]]:
        """Wait for the next presence change (or, with ``predicate``, until it holds); returns the presence.
        Also returns once the room is left, and raises what ended it (``HubbubClosed``, ``HubbubError``)."""
        if predicate is None:
            if not self.left:
                await self._presence_changed.wait()
        else:
            while not predicate(self.presence) and not self.left:
                await self._presence_changed.wait()
        self._raise_if_ended()
        return self.presence

    def __aiter__(self) -> AsyncIterator[Message]:
        return self

    async def __anext__(self) -> Message:
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)  # every later call ends too
            self._raise_if_ended()
            raise StopAsyncIteration
        assert isinstance(item, Message)
        return item

    # -- what the hub feeds it --------------------------------------------------------------

    def _raise_if_ended(self) -> None:
        if self._ended is not None:
            raise self._ended

    def _end(self, exc: BaseException | None) -> None:
        if not self.left:
            self.left = True
            self._ended = exc
            self._queue.put_nowait(_END)
            self._notify_presence()

    def _remember(self, message_id: str) -> None:
        self._seen[message_id] = None
        if len(self._seen) > SEEN_IDS:
            self._seen.popitem(last=False)

    def _deliver(self, message: Message) -> None:
        """Queue ``message`` for the iterator unless it was delivered (or published here) already."""
        if message.id in self._seen or self.left:
            return
        self._remember(message.id)
        self._recent.append(message.id)
        self.last_id = message.id
        self._queue.put_nowait(message)

    def _on_message(self, message: Message) -> None:
        if self._recovering:
            self._live.append(message)
        else:
            self._deliver(message)

    def _set_presence(self, presence: dict[str, list[dict[str, Any]]]) -> None:
        self.presence = {user: list(metas) for user, metas in presence.items()}
        self._presence_event()

    def _apply_diff(self, joins: dict[str, list[Any]], leaves: dict[str, list[Any]]) -> None:
        for user, metas in leaves.items():
            have = self.presence.get(user, [])
            for meta in metas:
                if meta in have:
                    have.remove(meta)
            if not have:
                self.presence.pop(user, None)
        for user, metas in joins.items():
            self.presence.setdefault(user, []).extend(metas)
        self._presence_event()

    def _presence_event(self) -> None:
        if self.on_presence is not None:
            try:
                result = self.on_presence(self)
                if inspect.isawaitable(result):
                    self.hub._spawn(result)
            except Exception:
                log.exception("presence callback of room %r failed", self.name)
        self._notify_presence()

    def _notify_presence(self) -> None:
        changed, self._presence_changed = self._presence_changed, asyncio.Event()
        changed.set()

    async def _history_page(self, limit: int | None, before: str | None, after: str | None,
                            resend: bool) -> dict[str, Any]:
        frame: dict[str, Any] = {"event": "history", "room": self.name}
        for name, value in (("limit", limit), ("before", before), ("after", after)):
            if value is not None:
                frame[name] = value
        return await self.hub._request(frame, resend=resend)

    # -- joining, and catching up after a reconnect -------------------------------------------

    def _join_frame(self) -> dict[str, Any]:
        frame: dict[str, Any] = {"event": "join", "room": self.name}
        if self.meta is not None:
            frame["meta"] = self.meta
        if not self.watch:
            frame["presence"] = False
        if self.last_id is not None:
            frame["since"] = self.last_id
        return frame

    async def _join(self, resend: bool) -> None:
        """Join (or join again) and deliver, in order and once, every message after ``last_id``."""
        catch_up = self.last_id is not None
        self._recovering = catch_up
        self._live = []
        try:
            joined = await self.hub._request(self._join_frame(), resend=resend)
            if "presence" in joined:
                self._set_presence(joined["presence"])
            if not catch_up:
                return
            # our publishes sent again on this connection: once acked, their ids are ours (not yielded)
            pending = [r.future for r in self.hub._requests.values()
                       if r.frame.get("event") == "publish" and r.frame.get("room") == self.name]
            if pending:
                await asyncio.wait(pending)
            if joined.get("recovered") is True:
                missed = [Message.from_event(m, self.name) for m in joined.get("messages", [])]
            else:
                missed = await self._page_forward(min(self._recent, default=self.last_id))
            for message in missed:
                self._deliver(message)
            for message in self._live:
                self._deliver(message)
        finally:
            self._recovering = False
            self._live = []

    async def _page_forward(self, after: str | None) -> list[Message]:
        """Every stored message after ``after``, oldest first, until the live stream is met."""
        found: list[Message] = []
        cursor = after
        while True:
            batch = await self._range(cursor, None)
            if not batch:
                return found
            found += batch
            cursor = batch[-1].id
            if {m.id for m in self._live}.intersection(m.id for m in batch):
                return found  # met the live stream: nothing lies between

    async def _range(self, after: str | None, before: str | None) -> list[Message]:
        """One page after ``after`` (and before ``before``); a page the server had to truncate (the
        newest that fit) is completed with what lies between."""
        page = await self._history_page(HISTORY_PAGE, before, after, resend=False)
        batch = [Message.from_event(m, self.name) for m in page["messages"]]
        if page.get("truncated") and batch:
            batch = await self._range(after, batch[0].id) + batch
        return batch


class Hub:
    """One connection to a hubbub server's ``/ws``, reconnecting; use ``connect``."""

    def __init__(self, url: str, token: TokenSource = None, *, user: str | None = None,
                 backoff: Backoff | None = None, open_timeout: float = 10.0,
                 max_message_size: int = MAX_MESSAGE_SIZE, **websocket_options: Any) -> None:
        self.url = _ws_url(url, user)
        self.max_message_size = max_message_size
        """Bytes per frame this client sends at most (the server's ``--max-message-size``): a bigger
        request is refused here with ``HubbubError("bad_field")``, never sent, since the server would
        close the connection (1009) and the client with it."""
        parts = urlsplit(self.url)
        self._where = f"{parts.scheme}://{parts.netloc}{parts.path}"  # for logs: never the query (a ?token=)
        self.token = token
        self.backoff = backoff or Backoff()
        self.open_timeout = open_timeout
        self.websocket_options = websocket_options
        self.reconnects = 0
        """How many times the connection was opened again."""
        self._rooms: dict[str, Room] = {}
        self._requests: dict[int, _Request] = {}
        self._refs = itertools.count(1)
        self._ws: ClientConnection | None = None  # while open
        self._socket: ClientConnection | None = None  # the latest, to close
        self._rejoins: set[asyncio.Task[None]] = set()
        self._generation = 0
        self._send_lock = asyncio.Lock()
        self._closed: HubbubClosed | None = None
        self._runner: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Hub:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Connect for the first time (raises if that fails), then keep the connection up."""
        ws = await self._dial()
        self._runner = asyncio.get_running_loop().create_task(self._run(ws))

    async def close(self) -> None:
        """Close the connection; every room's iterator ends, pending requests raise ``HubbubClosed``."""
        self._fail_all(HubbubClosed("closed by the client", 1000), ended_by_user=True)
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._runner
        for task in [*self._tasks, *self._rejoins]:
            task.cancel()
        if self._socket is not None:
            with contextlib.suppress(Exception):
                await self._socket.close()

    @property
    def connected(self) -> bool:
        """A connection is open right now."""
        return self._ws is not None

    @property
    def rooms(self) -> dict[str, Room]:
        """The rooms joined, by name."""
        return dict(self._rooms)

    # -- the public API ---------------------------------------------------------------------

    async def join(self, name: str, meta: dict[str, Any] | None = None, presence: bool = True,
                   since: str | None = None, on_presence: Callable[[Room], Any] | None = None) -> Room:
        """Join room ``name`` (``meta``: this connection's presence metadata there; ``presence=False``:
        no presence events; ``since``: a message id to catch up from; ``on_presence``: called with the
        room whenever its presence changes). Joining a joined room returns the same ``Room``."""
        if self._closed is not None:
            raise self._closed
        if name in self._rooms:
            return self._rooms[name]
        room = Room(self, name, meta, presence, since, on_presence)
        self._rooms[name] = room
        try:
            await room._join(resend=True)
        except ConnectionLost:
            pass  # joined, and the connection dropped while catching up: the next one catches up
        except BaseException:
            self._rooms.pop(name, None)
            raise
        return room

    async def request(self, event: str, **fields: Any) -> dict[str, Any]:
        """Send any request (``{"event": event, **fields}`` with a fresh ``ref``) and return its reply;
        an ``error`` reply raises ``HubbubError``. Not sent again after a reconnect: raises
        ``ConnectionLost`` if the connection is down or drops before the reply."""
        return await self._request({"event": event, **fields}, resend=False)

    # -- requests -----------------------------------------------------------------------------

    async def _request(self, frame: dict[str, Any], resend: bool) -> dict[str, Any]:
        if self._closed is not None:
            raise self._closed
        ref = next(self._refs)
        frame = {**frame, "ref": ref}
        self._check_size(frame)
        request = _Request(frame, asyncio.get_running_loop().create_future(), resend)
        self._requests[ref] = request
        try:
            await self._send_request(request)
            reply = await asyncio.shield(request.future)
        finally:
            self._requests.pop(ref, None)
        if reply.get("event") == "error":
            raise HubbubError(reply.get("code", "error"), reply.get("detail", ""), reply.get("room"))
        return reply

    async def _send_request(self, request: _Request) -> None:
        async with self._send_lock:
            ws = self._ws
            if ws is None and not request.resend and not request.future.done():
                request.future.set_exception(ConnectionLost("not connected"))
            if ws is None or request.generation == self._generation or request.future.done():
                return  # sent when the connection is back (or already sent on this one)
            request.generation = self._generation
            try:
                await ws.send(json.dumps(request.frame))
            except ConnectionClosed:
                pass  # the runner notices and reconnects

    def _check_size(self, frame: dict[str, Any]) -> None:
        """Refuse a frame the server would close the connection for (1009, which ends the client)."""
        size = len(json.dumps(frame))  # ASCII (non-ASCII characters escaped): its length is its bytes
        if size > self.max_message_size:
            raise HubbubError("bad_field", f"the {frame.get('event')} would be {size} bytes, over the "
                                           f"{self.max_message_size} the server takes: not sent", frame.get("room"))

    async def _send(self, frame: dict[str, Any]) -> None:
        self._check_size(frame)
        ws = self._ws
        if ws is None:
            return
        async with self._send_lock:
            with contextlib.suppress(ConnectionClosed):
                await ws.send(json.dumps(frame))

    # -- the connection -------------------------------------------------------------------------

    async def _token(self) -> str | None:
        token = self.token
        if token is None or isinstance(token, str):
            return token
        value = token()
        if inspect.isawaitable(value):
            value = await value
        return value

    async def _dial(self) -> ClientConnection:
        token = await self._token()
        headers = {"Authorization": f"Bearer {token}"} if token else None
        try:
            return await ws_connect(self.url, additional_headers=headers, open_timeout=self.open_timeout,
                                    **self.websocket_options)
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in RETRIED_HTTP_STATUSES:
                raise
            raise HubbubClosed(f"the server refused the connection: HTTP {status}", status=status) from exc

    async def _run(self, ws: ClientConnection) -> None:
        try:
            await self._keep_up(ws)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("hubbub: the client failed")
            self._fail_all(HubbubClosed("the client failed (logged)"))

    async def _keep_up(self, ws: ClientConnection) -> None:
        attempt = 0
        while True:
            try:
                await self._serve(ws)
            except HubbubClosed as exc:
                self._fail_all(exc)
                return
            # dropped: wait, dial again
            while True:
                if self.backoff.attempts is not None and attempt >= self.backoff.attempts:
                    self._fail_all(HubbubClosed(f"gave up after {attempt} reconnection attempts"))
                    return
                await self.backoff.wait(attempt)
                attempt += 1
                try:
                    ws = await self._dial()
                except HubbubClosed as exc:
                    self._fail_all(exc)
                    return
                except (OSError, InvalidHandshake, TimeoutError) as exc:
                    log.info("hubbub: reconnecting to %s failed (%s)", self._where, type(exc).__name__)
                    continue
                self.reconnects += 1
                attempt = 0
                break

    async def _serve(self, ws: ClientConnection) -> None:
        """Use ``ws`` until it closes: join the rooms again, send unanswered requests again, read."""
        self._generation += 1
        self._socket = ws
        async with self._send_lock:
            self._ws = ws
        rejoined = [room for room in self._rooms.values()
                    if not any(r.frame.get("event") == "join" and r.frame.get("room") == room.name
                               for r in self._requests.values())]
        for room in rejoined:  # joins first, then what waits (in ref order): publishes need the room joined
            task = asyncio.ensure_future(self._rejoin(room))
            self._rejoins.add(task)
            task.add_done_callback(self._rejoins.discard)
        for request in sorted(self._requests.values(), key=lambda r: r.frame["ref"]):
            if request.resend:
                self._spawn(self._send_request(request))
        try:
            async for frame in ws:
                if isinstance(frame, str):
                    try:
                        self._dispatch(json.loads(frame))
                    except Exception:
                        log.exception("hubbub: could not handle a frame from the server")
        except ConnectionClosed:
            pass
        finally:
            async with self._send_lock:
                self._ws = None
        self._connection_lost(ws)

    def _connection_lost(self, ws: ClientConnection) -> None:
        for task in list(self._rejoins):  # a catch-up in progress starts over on the next connection
            task.cancel()
        close = ws.protocol.close_rcvd
        code = close.code if close is not None else None
        reason = close.reason if close is not None else ""
        for request in list(self._requests.values()):
            if not request.resend and not request.future.done():
                request.future.set_exception(ConnectionLost("the connection dropped"))
        if code is not None and (code in FATAL_CLOSE_CODES or 4000 <= code <= 4999):
            raise HubbubClosed(f"closed by the server with {code}" + (f": {reason}" if reason else ""), code)
        log.info("hubbub: connection to %s lost (close %s); reconnecting", self._where, code)

    async def _rejoin(self, room: Room) -> None:
        try:
            await room._join(resend=False)
        except ConnectionLost:
            pass  # the next connection starts over
        except HubbubError as exc:
            self._rooms.pop(room.name, None)
            room._end(exc)
        except HubbubClosed:
            pass

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _fail_all(self, exc: HubbubClosed, ended_by_user: bool = False) -> None:
        if self._closed is None:
            self._closed = exc
        for request in list(self._requests.values()):
            if not request.future.done():
                request.future.set_exception(exc)
        for room in list(self._rooms.values()):
            room._end(None if ended_by_user else exc)
        self._rooms.clear()

    # -- what the server sends ----------------------------------------------------------------

    def _dispatch(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        ref = event.get("ref")
        room = self._rooms.get(event.get("room", ""))
        if kind == "message":
            if room is not None and "id" in event:
                room._on_message(Message.from_event(event))
            return
        if kind == "presence_state" and room is not None:
            room._set_presence(event.get("users", {}))
        if ref is not None and isinstance(ref, int) and ref in self._requests:
            request = self._requests[ref]
            if kind == "ack" and request.frame["event"] == "publish" and "id" in event:
                publisher = self._rooms.get(request.frame["room"])
                if publisher is not None:  # at once, before a catch-up waiting for this ack goes on
                    publisher._remember(event["id"])
            if not request.future.done():
                request.future.set_result(event)
            return
        if kind == "presence_diff" and room is not None:
            room._apply_diff(event.get("joins", {}), event.get("leaves", {}))
        elif kind == "left" and room is not None:  # removed by the server (API) or no longer allowed
            self._rooms.pop(room.name, None)
            reason = event.get("reason", "removed")
            room._end(HubbubError(reason, "the server took this connection out of the room", room.name))
        elif kind == "token_expiring":
            if callable(self.token):
                self._spawn(self._refresh())
        elif kind == "error":
            log.warning("hubbub: error from the server: %s %s", event.get("code"), event.get("detail"))

    async def _refresh(self) -> None:
        try:
            token = await self._token()
            await self._request({"event": "refresh", "token": token}, resend=False)
        except (HubbubError, ConnectionLost, HubbubClosed) as exc:
            log.warning("hubbub: token refresh failed: %s", type(exc).__name__)


def _ws_url(url: str, user: str | None) -> str:
    """``ws://host:port`` gets the ``/ws`` path; ``user`` goes into the query as ``?user=``."""
    parts = urlsplit(url)
    path = parts.path if parts.path not in ("", "/") else "/ws"
    query = parse_qsl(parts.query)
    if user is not None:
        query = [(k, v) for k, v in query if k != "user"] + [("user", user)]
    return urlunsplit((parts.scheme, parts.netloc, path, urlencode(query), ""))


@contextlib.asynccontextmanager
async def connect(url: str, token: TokenSource = None, *, user: str | None = None, backoff: Backoff | None = None,
                  open_timeout: float = 10.0, max_message_size: int = MAX_MESSAGE_SIZE,
                  **websocket_options: Any) -> AsyncIterator[Hub]:
    """``async with connect("ws://host:port", token=...) as hub``: a ``Hub`` on ``/ws``.

    ``token``: a JWT (sent as ``Authorization: Bearer``), or a sync or async callable returning one,
    called at every connect and when the server says ``token_expiring`` (then sent as ``refresh``).
    ``user``: ``?user=NAME`` for a server without JWT. ``backoff``: the reconnection policy.
    ``max_message_size``: the server's ``--max-message-size`` (a bigger publish raises ``HubbubError``).
    Other keyword arguments go to ``websockets.asyncio.client.connect`` (``ssl=``, ...).
    The first connection is made before the block starts and raises if it fails."""
    hub = Hub(url, token, user=user, backoff=backoff, open_timeout=open_timeout,
              max_message_size=max_message_size, **websocket_options)
    await hub.open()
    try:
        yield hub
    finally:
        await hub.close()
