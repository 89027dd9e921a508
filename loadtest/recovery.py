"""Chaos: ``RecoveringUser`` on ``/ws``, whose TCP connections are cut, and an exact verdict at the end.

Run it by naming it (``locust -f loadtest`` alone runs the broadcast suite as before)::

    locust -f loadtest --headless -u 1000 -r 100 -t 300s RecoveringUser \\
        --hosts ws://127.0.0.1:8001,ws://127.0.0.1:8002 --drain 10

What happens:

1. Users join rooms of ``--recovery-room-size`` members (``"presence": false``); the first join
   catches up from the room's beginning (``history`` paged forward with ``after``), so every member
   must end with *every* message of its room, whatever the timing of its join.
2. From ``--settle`` seconds after spawning until ``--drain`` seconds before ``--run-time`` ends
   (chat_broadcast's schedule), the first ``--recovery-senders`` members of each room publish one
   message every ``--publish-interval`` seconds, each with an idempotency ``key``; a publish stays
   pending until its ``ack`` arrives (slots that come due while offline are queued, not skipped).
3. Over the same span, every ``--cut-interval`` seconds this process cuts the TCP connection of one
   random connected user: ``SO_LINGER`` 0, then ``close``, so the server sees a reset (RST), not a
   WebSocket close. The user stays away for a random ``--offline`` time, then connects to a random
   host of ``--hosts`` (so, with two, to the other instance half of the time), joins again with
   ``since`` = the id of the last message it delivered (``""`` when none: recovered false), and sends
   again every unacked publish with the same key, right after the join.
4. ``joined`` with ``"recovered": true``: its ``messages``, then the live ones, are delivered as they
   come, with no deduplication at all. ``"recovered": false``: the user pages ``history`` forward
   with ``after`` from its last id until a page is empty or meets a live message that arrived
   meanwhile, then delivers the pages and the live messages that are not in them. That overlap is
   the only place where an id is ever dropped as already seen.
5. When the test stops, each process reads its rooms' whole history from the store (``history``
   pages on ``/ws``, a few paced connections) and compares, per member, what it delivered with the
   store's order (the room's order; its own publishes excluded, since the server never sends a
   sender its own message live):

   - ``lost``: stored messages of its rooms the member never delivered;
   - ``duplicated``: deliveries of an id it had already delivered;
   - ``out_of_order``: deliveries out of the store's order (distinct ids minus the longest run that
     is in order: the fewest messages that would have to move);
   - ``not_stored``: delivered ids that the store does not hold;

   and per publish (the key rides in ``data`` too, so the store's rows can be counted per key):
   ``publishes_lost`` (acked but not stored), ``publishes_duplicated`` (a key stored more than once),
   ``ack_mismatches`` (an ack whose id is not the stored row's, or two acks of one key that differ),
   ``unacked`` (never acked by the end: the drain was too short).

Any lost, duplicated, not stored, lost publish, duplicated publish or ack mismatch: exit 3 (loss);
anything out of order: exit 1; users not caught up at the end, publishes never acked, no cut or
nothing published: exit 5 (invalid run: lengthen ``--drain``); _metrics' precedence (5, 1, 3).
Counts go through ``_metrics`` (summed across ``--processes``); rooms never span processes.

Run the server with ``--max-connections-per-address 0`` (every user comes from 127.0.0.1) and a
``--history-retention`` above what a room gets in the run (or ``off``): the store's history is
the reference. With two instances the store must be shared (PostgreSQL, or one SQLite file).
"""

from __future__ import annotations

import bisect
import itertools
import json
import logging
import os
import random
import socket
import struct
import sys
import time
from typing import Any

import _metrics
import gevent
import websocket
from _ws import WebSocketUser
from locust import constant, events, task
from locust.runners import MasterRunner

log = logging.getLogger("hubbub.loadtest")

PAGE = 100  # messages per history page (the server's default --history-max)
CHECK_CONNECTIONS = 8  # connections reading the store's history at the end
CHECK_RATE = 40.0  # history requests per second per checking connection (under --rate-limit's 100)
JOIN_TIMEOUT = 20.0  # seconds for a joined (or a history page) to arrive; then the user is cut again

IDLE_POLL = 1.0  # seconds a task sleeps when it has nothing to do

ROW_CUT = "cut"  # a connection reset on purpose
ROW_RECOVER = "recover"  # from the handshake to caught up (joined, and history pages when recovered is false)
ROW_MESSAGE = "recv message"  # a live delivery; response time = latency from the publish's wall-clock time
ROW_ACK = "ack"


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    group = parser.add_argument_group("hubbub chaos: RecoveringUser")
    group.add_argument("--hosts", default="", env_var="LOCUST_HOSTS",
                       help="comma-separated ws:// URLs of the instances (default: --host); a reconnect picks one")
    group.add_argument("--recovery-room-size", type=int, default=5, env_var="LOCUST_RECOVERY_ROOM_SIZE",
                       help="members per room")
    group.add_argument("--recovery-senders", type=int, default=2, env_var="LOCUST_RECOVERY_SENDERS",
                       help="members of each room that publish")
    group.add_argument("--publish-interval", type=float, default=1.0, env_var="LOCUST_PUBLISH_INTERVAL",
                       help="seconds between two publishes of one sender")
    group.add_argument("--cut-interval", type=float, default=1.0, env_var="LOCUST_CUT_INTERVAL",
                       help="seconds between two connection cuts in each process")
    group.add_argument("--offline", default="0,2", env_var="LOCUST_OFFLINE",
                       help="MIN,MAX seconds a cut user stays away before it reconnects (keep MAX under --drain)")
    group.add_argument("--sabotage", action="store_true", default=False, env_var="LOCUST_SABOTAGE",
                       help="a self-test of the verdict: one member per room records its 5th delivery not at all, "
                            "its 10th twice and swaps its 15th and 16th; the verdict must count each (exit 3)")


class _Plan:
    """chat_broadcast.py's schedule (``schedule``: sending from --settle after spawning until --drain before
    the end), looked up when the test runs: Locust executes every file of ``-f loadtest`` itself, so importing
    chat_broadcast here could make it a second module whose options would be registered twice."""

    def __getattr__(self, name: str) -> Any:
        module = sys.modules.get("chat_broadcast")
        if module is None:
            raise RuntimeError("RecoveringUser runs with the suite: locust -f loadtest ... RecoveringUser")
        return getattr(module.schedule, name)


Plan: Any = _Plan()


def _hosts(user: WebSocketUser) -> list[str]:
    listed = [h.strip().rstrip("/") for h in user.environment.parsed_options.hosts.split(",") if h.strip()]
    return listed or [(user.host or "").rstrip("/")]


def _offline(environment: Any) -> tuple[float, float]:
    low, _, high = environment.parsed_options.offline.partition(",")
    return float(low), float(high or low)


class Room:
    def __init__(self, name: str) -> None:
        self.name = name
        self.members: list[RecoveringUser] = []


class Members:
    """This process's rooms and users; reset per test (the tag keeps processes' rooms apart)."""

    tag = ""
    numbers = itertools.count()
    rooms: dict[int, Room] = {}
    users: list[RecoveringUser] = []

    @classmethod
    def reset(cls) -> None:
        cls.tag = f"{os.getpid():x}{random.randrange(16**4):04x}"
        cls.numbers = itertools.count()
        cls.rooms = {}
        cls.users = []


class Publish:
    __slots__ = ("key", "ref", "sent_at", "text")

    def __init__(self, key: str, text: str) -> None:
        self.key = key
        self.text = text
        self.ref: int | None = None  # of its latest send
        self.sent_at = 0.0


class RecoveringUser(WebSocketUser):
    """A member of one room on ``/ws`` whose connection gets cut; it recovers with ``since`` and keys."""

    # opt-in: `locust -f loadtest` keeps running the broadcast suite; name this class to run it
    abstract = "RecoveringUser" not in sys.argv[1:]
    weight = 1
    wait_time = constant(0)  # the task paces itself

    def on_start(self) -> None:
        options = self.environment.parsed_options
        if not Members.tag:
            Members.reset()
        number = next(Members.numbers)
        size = max(1, options.recovery_room_size)
        room_no, position = divmod(number, size)
        room = Members.rooms.get(room_no)
        if room is None:
            room = Members.rooms[room_no] = Room(f"ch{Members.tag}r{room_no}")
        room.members.append(self)
        Members.users.append(self)
        self.room = room
        self.name = f"ch{Members.tag}u{number}"
        self.hosts = _hosts(self)
        self.target = self.hosts[number % len(self.hosts)]
        self.sender = position < options.recovery_senders
        self.interval = options.publish_interval
        self.next_slot: float | None = None
        self.seq = 0
        self.refs = itertools.count(1)
        # what the verdict reads
        self.delivered: list[str] = []  # ids of others' messages, in the order this user delivered them
        self.sources: list[tuple[int, str]] = []  # per delivery: (connection number, live/recovered/paged)
        self.connections: list[dict[str, Any]] = []  # per connection: host, since, recovered, when (wall clock)
        self.last_id = ""  # the last id delivered (what a rejoin asks since): --sabotage leaves it alone
        self.sabotage = options.sabotage and position == options.recovery_senders  # the first non-sender
        self.made = 0  # deliveries, for --sabotage
        if self.sabotage:
            _metrics.counters.sabotaged += 1
        self.own_returned = 0  # own messages that came back (recovered, paged, or live on a later connection)
        self.published: list[str] = []  # keys, in publish order
        self.acked: dict[str, str] = {}  # key -> id of its first ack
        self.pending: dict[str, Publish] = {}  # key -> publish not acked yet, in publish order
        self.by_ref: dict[int, Publish] = {}
        # the connection's state
        self.away_until = 0.0  # cut: do not reconnect before this
        self.cut_after_publish = False  # the cutter's choice: cut as soon as the next publish is sent
        self.caught_up = False  # joined, and caught up when recovered was false (or on the first join)
        self.catching_up = False  # paging history; live messages wait in self.live
        self.live: list[dict[str, Any]] = []
        self.pages: list[dict[str, Any]] = []
        self.cursor = ""
        self.history_ref: int | None = None
        self.join_ref: int | None = None
        self.since: str | None = None  # of the join in flight
        self.opened_at = 0.0
        self.requested_at = 0.0
        self.joined_once = False
        self._last_target = self.target
        _metrics.counters.recovery_users += 1

    def url(self) -> str:
        host = self.target
        if host.startswith("http://"):
            host = "ws://" + host[len("http://"):]
        elif host.startswith("https://"):
            host = "wss://" + host[len("https://"):]
        return f"{host}/ws?user={self.name}"

    # -- the task: connect (after a cut, when back), publish on the schedule -----------------------

    @task
    def live(self) -> None:
        now = time.monotonic()
        if self.ws is None:
            if now < self.away_until:
                gevent.sleep(min(self.away_until - now, IDLE_POLL))
                return
            if not self.ensure_connected():
                return
        if self.ws is not None and not self.caught_up and now - self.requested_at > JOIN_TIMEOUT:
            self.fire("stalled", (now - self.requested_at) * 1000,
                      exception=TimeoutError(f"no answer within {JOIN_TIMEOUT:g}s (join or history)"))
            self.cut(count=False)
            return
        if not self.sender or Plan.start_at is None:
            gevent.sleep(IDLE_POLL if Plan.start_at is not None else 0.2)
            return
        if not Plan.sending(now):
            gevent.sleep(min(IDLE_POLL, max(0.0, Plan.start_at - now)) if Plan.start_at > now
                         else IDLE_POLL)
            return
        if self.next_slot is None:
            self.next_slot = Plan.start_at + random.uniform(0, self.interval)
        if self.next_slot > now:
            gevent.sleep(min(self.next_slot - now, IDLE_POLL))
            return
        self.next_slot = max(self.next_slot + self.interval, now - self.interval)  # no burst after a stall
        self.publish()

    def publish(self) -> None:
        self.seq += 1
        key = f"{self.name}.{self.seq}"
        data = {"k": key, "n": self.seq, "t": time.time()}
        item = Publish(key, "")
        item.text = json.dumps({"event": "publish", "room": self.room.name, "data": data, "key": key})
        self.pending[key] = item
        self.published.append(key)
        _metrics.counters.publishes += 1
        if self.ws is not None:
            self._send_publish(item)
            if self.cut_after_publish:
                self.cut_after_publish = False
                self.cut()

    def _send_publish(self, item: Publish) -> None:
        item.ref = next(self.refs)
        self.by_ref[item.ref] = item
        item.sent_at = time.monotonic()
        self.send_text(item.text[:-1] + f',"ref":{item.ref}}}')

    # -- cuts -------------------------------------------------------------------------------------

    def cut(self, count: bool = True) -> None:
        """Reset the TCP connection (SO_LINGER 0, close: the server sees an RST) and stay away a while."""
        ws, self.ws, self.connected_at = self.ws, None, None
        receiver, self._receiver = self._receiver, None
        if receiver is not None:
            receiver.kill(block=False)
        self._forget_connection()
        low, high = _offline(self.environment)
        self.away_until = time.monotonic() + random.uniform(low, high)
        self.target = random.choice(self.hosts)
        if ws is None:
            return
        sock = ws.sock
        try:
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
        except OSError:
            pass
        log.debug("cut %s at %.2f (stop at %s)", self.name, time.monotonic(), Plan.stop_at)
        if self.connections:
            self.connections[-1]["cut"] = time.time()
        if count:
            _metrics.counters.cuts += 1
            self.fire(ROW_CUT, 0)

    def _forget_connection(self) -> None:
        self.caught_up = self.catching_up = False
        self.live, self.pages = [], []
        self.by_ref.clear()
        self.history_ref = self.join_ref = None

    def on_lost(self) -> None:
        self._forget_connection()  # an unexpected close (a failure already): rejoin like after a cut

    # -- joining, and catching up ---------------------------------------------------------------

    def on_open(self) -> None:
        counters = _metrics.counters
        self.opened_at = self.requested_at = time.monotonic()
        self.join_ref = next(self.refs)
        join: dict[str, Any] = {"event": "join", "room": self.room.name, "presence": False, "ref": self.join_ref}
        if self.joined_once:
            counters.reconnects += 1
            if self.target != self._last_target:
                counters.switches += 1
            self.since = join["since"] = self.last_id
        else:
            self.since = None
        self._last_target = self.target
        self.connections.append({"host": self.target, "since": self.since, "opened": time.time()})
        ws = self.ws
        if not self.send_text(json.dumps(join)):
            return
        for item in list(self.pending.values()):  # again, with the same key, right after the join
            if self.ws is not ws:
                return
            if self.joined_once:
                counters.resends += 1
            self._send_publish(item)

    def on_text(self, text: str, now: float) -> None:
        event = json.loads(text)
        kind = event.get("event")
        if kind == "message":
            if event.get("room") != self.room.name:
                self.fire("wrong room", 0, len(text), AssertionError(text[:200]))
            elif self.catching_up or not self.caught_up:
                self.live.append(event)
            else:
                self._deliver(event, "live")
                sent = event.get("data", {}).get("t") if isinstance(event.get("data"), dict) else None
                if isinstance(sent, float):
                    self.fire(ROW_MESSAGE, max(0.0, time.time() - sent) * 1000, len(text))
        elif kind == "ack":
            self._on_ack(event, now, len(text))
        elif kind == "joined" and event.get("ref") == self.join_ref:
            self._on_joined(event, now)
        elif kind == "history" and event.get("ref") == self.history_ref:
            self._on_page(event, now)
        elif kind == "error":
            self.fire(f"error {event.get('code')}", 0, len(text), RuntimeError(event.get("detail")))
        else:
            self.fire(f"unexpected {kind}", 0, len(text), RuntimeError(text[:200]))

    def _on_ack(self, event: dict[str, Any], now: float, length: int) -> None:
        item = self.by_ref.pop(event.get("ref"), None)  # type: ignore[arg-type]
        if item is None:
            self.fire("unexpected ack", 0, length, RuntimeError(str(event)[:200]))
            return
        _metrics.counters.acks += 1
        first = self.acked.get(item.key)
        if first is None:
            self.acked[item.key] = event["id"]
        elif first != event["id"]:
            _metrics.counters.ack_mismatches += 1
            self.fire("ack mismatch", 0, length, AssertionError(f"{item.key}: acked {first}, then {event['id']}"))
        self.pending.pop(item.key, None)
        self.fire(ROW_ACK, (now - item.sent_at) * 1000, length)

    def _on_joined(self, event: dict[str, Any], now: float) -> None:
        counters = _metrics.counters
        self.join_ref = None
        if self.connections:
            self.connections[-1].update(joined=time.time(), recovered=event.get("recovered"),
                                        messages=len(event.get("messages", [])))
        first = not self.joined_once
        self.joined_once = True
        if self.since is not None:
            if "recovered" not in event:
                self.fire("joined", 0, 0, AssertionError(f"a join with since answered without recovered: {event}"))
            if event.get("recovered") is True:
                counters.recovered_true += 1
                missed = event.get("messages", [])
                counters.recovered_messages += len(missed)
                for message in missed:
                    self._deliver(message, "recovered")
                for message in self.live:  # none can come before joined, but if one did it is counted too
                    self._deliver(message, "live")
                self.live = []
                self._caught_up(now)
                return
            counters.recovered_false += 1
        elif not first:
            self.fire("joined", 0, 0, AssertionError("a rejoin without since"))
        # the first join, or recovered false: page the store forward from the last delivered id
        self.catching_up = True
        self.pages = []
        self.cursor = self.last_id
        self._ask_page()

    def _ask_page(self) -> None:
        self.history_ref = next(self.refs)
        self.requested_at = time.monotonic()
        _metrics.counters.history_pages += 1
        self.send_text(json.dumps({"event": "history", "room": self.room.name, "after": self.cursor,
                                   "limit": PAGE, "ref": self.history_ref}))

    def _on_page(self, event: dict[str, Any], now: float) -> None:
        self.history_ref = None
        batch = event.get("messages", [])
        if event.get("truncated"):
            self.fire("history truncated", 0, 0, AssertionError("a page was truncated (messages too big?)"))
        self.pages += batch
        live_ids = {m.get("id") for m in self.live}
        if batch and not live_ids.intersection(m.get("id") for m in batch):
            self.cursor = batch[-1]["id"]
            self._ask_page()
            return
        # met the live stream, or the store has nothing more: the pages, then what came live meanwhile
        paged = set()
        for message in self.pages:
            paged.add(message.get("id"))
            self._deliver(message, "paged")
        for message in self.live:
            if message.get("id") not in paged:  # the one overlap where an id is dropped as seen
                self._deliver(message, "live")
        self.pages, self.live = [], []
        self.catching_up = False
        self._caught_up(now)

    def _caught_up(self, now: float) -> None:
        self.caught_up = True
        self.fire(ROW_RECOVER, (now - self.opened_at) * 1000)

    def _deliver(self, message: dict[str, Any], how: str) -> None:
        if message.get("user") == self.name:
            self.own_returned += 1  # allowed in recovery and history; not part of this user's stream
            return
        self.last_id = message["id"]
        self.delivered.append(self.last_id)
        self.sources.append((len(self.connections) - 1, how))
        if self.sabotage:
            self.made += 1
            if self.made == 5:
                self.delivered.pop()  # one lost
            elif self.made == 10:
                self.delivered.append(self.last_id)  # one duplicated
            elif self.made == 16:  # swapped with the 15th: one out of order
                self.delivered[-1], self.delivered[-2] = self.delivered[-2], self.delivered[-1]


# -- the cuts: one greenlet per process -----------------------------------------------------------

_cutter: list[gevent.Greenlet] = []


def _cut_loop(environment: Any) -> None:
    interval = environment.parsed_options.cut_interval
    while True:
        gevent.sleep(interval)
        if not Plan.sending(time.monotonic()):
            continue
        connected = [u for u in Members.users if u.ws is not None]
        senders = [u for u in connected if u.sender and not u.cut_after_publish]
        if senders and random.random() < 0.5:  # half the cuts: right after a publish, before its ack
            random.choice(senders).cut_after_publish = True
        elif connected:
            random.choice(connected).cut()


@events.test_start.add_listener
def _on_test_start(environment: Any, **_: Any) -> None:
    Members.reset()
    _explained[0] = 0
    for greenlet in _cutter:
        greenlet.kill(block=False)
    _cutter.clear()
    if not isinstance(environment.runner, MasterRunner) and environment.parsed_options.cut_interval > 0:
        _cutter.append(gevent.spawn(_cut_loop, environment))


# -- the verdict: read the store, compare -----------------------------------------------------------


class Checker:
    """One paced ``/ws`` connection reading rooms' history forward (request, answer, request...)."""

    def __init__(self, host: str, name: str) -> None:
        self.ws = websocket.create_connection(f"{host}/ws?user={name}", timeout=30, suppress_origin=True,
                                              skip_utf8_validation=True)
        self.refs = itertools.count(1)
        self.last = 0.0

    def history(self, room: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        cursor = ""
        while True:
            batch = self._page(room, cursor, None)
            if not batch:
                return found
            found += batch
            cursor = batch[-1]["id"]

    def _page(self, room: str, after: str, before: str | None) -> list[dict[str, Any]]:
        pause = self.last + 1 / CHECK_RATE - time.monotonic()
        if pause > 0:
            gevent.sleep(pause)
        self.last = time.monotonic()
        ref = next(self.refs)
        request: dict[str, Any] = {"event": "history", "room": room, "after": after, "limit": PAGE, "ref": ref}
        if before is not None:
            request["before"] = before
        self.ws.send(json.dumps(request))
        while True:
            event = json.loads(self.ws.recv())
            if event.get("ref") == ref:
                break
        if event.get("event") != "history":
            raise RuntimeError(f"history of {room}: {event}")
        batch = event["messages"]
        if event.get("truncated") and batch:  # the newest that fit: fetch what lies between
            batch = self._page(room, after, batch[0]["id"]) + batch
        return batch

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:
            pass


def out_of_order(sequence: list[int]) -> int:
    """How many of ``sequence`` (distinct positions in the reference) must move to put it in order:
    its length minus its longest increasing subsequence."""
    tails: list[int] = []
    for x in sequence:
        i = bisect.bisect_left(tails, x)
        if i == len(tails):
            tails.append(x)
        else:
            tails[i] = x
    return len(sequence) - len(tails)


EXPLAIN = 20  # members with a lost or duplicated message whose story is logged, per process
_explained = [0]


def explain(user: RecoveringUser, stored: list[dict[str, Any]], lost: set[str]) -> None:
    """Log what happened to a member that lost or got twice a message: which connection, how."""
    ts = {m["id"]: m.get("ts") for m in stored}
    counts: dict[str, list[int]] = {}
    for i, message_id in enumerate(user.delivered):
        counts.setdefault(message_id, []).append(i)
    twice = {k: v for k, v in counts.items() if len(v) > 1}
    stories = [f"lost {m} (ts {ts.get(m)})" for m in sorted(lost)[:5]]
    stories += [f"twice {m} (ts {ts.get(m)}): " + ", ".join(f"conn {user.sources[i][0]} {user.sources[i][1]}"
                                                           for i in where) for m, where in list(twice.items())[:5]]
    conns = "; ".join(
        f"#{n} {c['host'].rsplit(':', 1)[-1]} since {c['since']!r} joined {c.get('joined', 0) * 1000:.0f} "
        f"recovered {c.get('recovered')} ({c.get('messages')}) cut {c.get('cut', 0) * 1000:.0f}"
        for n, c in enumerate(user.connections))
    log.warning("%s: %s; connections: %s", user.name, "; ".join(stories), conns)


def check_room(room: Room, stored: list[dict[str, Any]], counters: _metrics.Counters) -> None:
    """Compare every member of ``room`` with the store's history ``stored`` (the room's order)."""
    position = {m["id"]: i for i, m in enumerate(stored)}
    counters.recovery_rooms += 1
    counters.stored_messages += len(stored)
    for user in room.members:
        expected = {m["id"] for m in stored if m.get("user") != user.name}
        seen: set[str] = set()
        order: list[int] = []
        for message_id in user.delivered:
            if message_id in seen:
                counters.messages_duplicated += 1
                continue
            seen.add(message_id)
            if message_id not in position:
                counters.messages_not_stored += 1
            else:
                order.append(position[message_id])
        counters.expected_deliveries += len(expected)
        counters.deliveries += len(user.delivered)
        lost = expected - seen
        counters.messages_lost += len(lost)
        if (lost or len(seen) < len(user.delivered)) and _explained[0] < EXPLAIN:
            _explained[0] += 1
            explain(user, stored, lost)
        counters.messages_out_of_order += out_of_order(order)
        counters.own_returned += user.own_returned
        if not user.caught_up:  # away, or still catching up, when the users stopped
            counters.unsettled += 1
    rows_per_key: dict[str, list[str]] = {}
    for m in stored:
        data = m.get("data")
        if isinstance(data, dict) and isinstance(data.get("k"), str):
            rows_per_key.setdefault(data["k"], []).append(m["id"])
    for user in room.members:
        for key in user.published:
            rows = rows_per_key.get(key, [])
            if len(rows) > 1:
                counters.publishes_duplicated += len(rows) - 1
            acked = user.acked.get(key)
            if acked is None:
                counters.unacked += 1
            elif not rows:
                counters.publishes_lost += 1
            elif acked != rows[0]:
                counters.ack_mismatches += 1
            if rows:
                counters.publishes_stored += 1


@events.test_stop.add_listener
def _check(environment: Any, **_: Any) -> None:
    """Every process checks its own rooms once its users have stopped (before the master collects counts)."""
    for greenlet in _cutter:
        greenlet.kill(block=False)
    _cutter.clear()
    rooms = list(Members.rooms.values())
    if not rooms or isinstance(environment.runner, MasterRunner):
        return
    counters = _metrics.counters
    hosts = _hosts(Members.users[0])
    queue = list(rooms)
    started = time.monotonic()

    def work(number: int) -> None:
        checker = Checker(hosts[0], f"ch{Members.tag}check{number}")
        try:
            while queue:
                room = queue.pop()
                check_room(room, checker.history(room.name), counters)
        finally:
            checker.close()

    now = time.monotonic()
    for user in Members.users:
        if not user.caught_up:
            log.warning("%s not caught up at the end: %s, away for %.1fs more, catching up %s, join %s, history %s, "
                        "%d unacked", user.name, "connected" if user.connected_at else "not connected",
                        user.away_until - now, user.catching_up, user.join_ref, user.history_ref, len(user.pending))
    workers = [gevent.spawn(work, n) for n in range(min(CHECK_CONNECTIONS, len(rooms)))]
    gevent.joinall(workers)
    failed = [w.exception for w in workers if w.exception is not None]
    if failed:
        counters.check_failures += len(failed)
        log.error("reading the store's history failed: %r", failed[0])
    log.info("checked %d rooms against the store in %.1fs", counters.recovery_rooms, time.monotonic() - started)


def _verdict(total: _metrics.Counters) -> tuple[list[str], tuple[int, str] | None]:
    """The chaos lines and, when it fails, (exit code, why)."""
    if not total.recovery_users:
        return [], None
    t = total
    lines = [
        f"chaos: {t.recovery_users} users in {t.recovery_rooms} rooms, {t.stored_messages} messages stored; "
        f"{t.cuts} cuts, {t.reconnects} reconnects ({t.switches} to another host), recovered true "
        f"{t.recovered_true} ({t.recovered_messages} messages), false {t.recovered_false}, "
        f"{t.history_pages} history pages",
        f"chaos: {t.deliveries} deliveries of {t.expected_deliveries} expected: lost {t.messages_lost}, "
        f"duplicated {t.messages_duplicated}, out of order {t.messages_out_of_order}, "
        f"not stored {t.messages_not_stored}, own messages back {t.own_returned}",
        f"chaos: {t.publishes} publishes ({t.resends} sent again after a reconnect), {t.acks} acks, "
        f"{t.publishes_stored} stored; lost {t.publishes_lost}, stored twice {t.publishes_duplicated}, "
        f"ack mismatches {t.ack_mismatches}, never acked {t.unacked}; {t.unsettled} users not caught up at the end",
    ]
    sending = _metrics.window.get("stop", 0.0) - _metrics.window.get("start", 0.0)
    if sending > 0:
        lines.append(f"chaos: {t.stored_messages / sending:.0f} messages/s published and {t.deliveries / sending:.0f} "
                     f"delivered over {sending:.1f}s of sending (deliveries include recovered and paged ones)")
    if t.sabotaged:
        lines.append(f"chaos: --sabotage spoiled the record of {t.sabotaged} members (1 lost, 1 duplicated, "
                     "1 out of order each)")
    if t.check_failures or t.recovery_rooms == 0:
        return lines, (_metrics.EXIT_INVALID, "INVALID RUN: the store's history could not be read")
    if t.unacked or t.unsettled:  # their missing messages would pass for losses
        return lines, (_metrics.EXIT_INVALID, "INVALID RUN: publishes never acked or users not caught up at the "
                       "end (lengthen --drain)")
    if not t.publishes or not t.cuts:
        return lines, (_metrics.EXIT_INVALID, "INVALID RUN: nothing published or no connection cut")
    if t.messages_out_of_order:  # _metrics' precedence: 1 (failures) before 3 (loss)
        return lines, (_metrics.EXIT_FAILURES, f"FAIL: {t.messages_out_of_order} deliveries out of the room's order")
    losses = (t.messages_lost, t.messages_duplicated, t.messages_not_stored, t.publishes_lost,
              t.publishes_duplicated, t.ack_mismatches)
    if any(losses):
        return lines, (_metrics.EXIT_LOSS, "FAIL: messages lost, duplicated or not stored, or a publish lost, "
                       "stored twice or acked with another id")
    return lines, None


_metrics.checks.append(_verdict)
