"""Chat broadcast: rooms of ``--room-size`` members on ``/chat/{room}``, a few senders each, counted loss.

Phases:

1. Everyone connects (users are spawned at ``-r`` per second; each connects in its task).
2. When spawning completes, everyone waits ``--settle`` seconds for the last handshakes.
3. The first ``--senders`` members of every room send one message each ``--send-interval``
   seconds, on an absolute schedule (slot k at start + offset + k * interval, never
   "sleep after send", so a slow pass does not stretch the run; overdue slots are sent
   at once, those over 1 s overdue are skipped). A slot served more than
   ``--late-after-ms`` (100) late counts as late; more than 1% late makes the run invalid.
4. Sending stops ``--drain`` seconds before ``--run-time`` ends, so every delivery in
   flight arrives before the users stop.

Loss is counted, not sampled: each send adds (members present at send time - 1) to
the expected deliveries, each member counts what it receives, and a member that
connected after a message was sent neither expects nor counts it. Rooms never span
processes (room names carry the process's tag), so every process counts its own
rooms exactly and the master sums the counts (see ``_metrics``).

hubbub limits each connection to 100 messages/s by default (``--rate-limit``), so
keep ``--send-interval`` above 0.01 s or start the server with ``--rate-limit 0``.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import time
from typing import Any

import _metrics
import gevent
import gevent.event
from _metrics import ROW_BROADCAST
from _ws import WebSocketUser
from locust import constant, events, task
from locust.runners import MasterRunner, WorkerRunner

log = logging.getLogger("hubbub.loadtest")

MSG_SCHEDULE = "hubbub_schedule"
MSG_STOP_SENDING = "hubbub_stop_sending"
MAX_CATCH_UP = 1.0  # seconds: overdue slots are sent at once (catching up), unless this far behind
IDLE_POLL = 1.0  # seconds a task sleeps when it has nothing to do (bounds how late a reconnect starts)


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    group = parser.add_argument_group("hubbub chat broadcast")
    group.add_argument("--room-size", type=int, default=100, env_var="LOCUST_ROOM_SIZE",
                       help="members per room (rooms never span worker processes)")
    group.add_argument("--senders", type=int, default=1, env_var="LOCUST_SENDERS",
                       help="members per room that send")
    group.add_argument("--send-interval", type=float, default=0.25, env_var="LOCUST_SEND_INTERVAL",
                       help="seconds between two messages of one sender (hubbub allows 100/s per connection)")
    group.add_argument("--settle", type=float, default=2.0, env_var="LOCUST_SETTLE",
                       help="seconds between the end of spawning and the first send")
    group.add_argument("--drain", type=float, default=5.0, env_var="LOCUST_DRAIN",
                       help="seconds before the end of --run-time when sending stops")


class Plan:
    """When this process's senders send: set by the master's schedule message (time.monotonic())."""

    start_at: float | None = None
    stop_at: float | None = None
    known = gevent.event.Event()  # set once the schedule arrived

    @classmethod
    def reset(cls) -> None:
        cls.start_at = cls.stop_at = None
        cls.known.clear()

    @classmethod
    def sending(cls, now: float) -> bool:
        return cls.start_at is not None and cls.start_at <= now and (cls.stop_at is None or now < cls.stop_at)


class Room:
    """The members of one room, all in this process."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.members: list[ChatUser] = []

    def present(self, t: float, but: ChatUser) -> int:
        """Members other than ``but`` whose handshake completed by time ``t``."""
        return sum(1 for m in self.members if m is not but and m.connected_at is not None and m.connected_at <= t)


class Members:
    """This process's rooms; reset per test. The tag is made in the process that runs the users
    (``--processes`` forks after importing this file), so no two processes share a room."""

    tag = ""
    numbers = itertools.count()
    rooms: dict[int, Room] = {}

    @classmethod
    def reset(cls) -> None:
        cls.tag = f"{os.getpid():x}{random.randrange(16**4):04x}"
        cls.numbers = itertools.count()
        cls.rooms = {}


class ChatUser(WebSocketUser):
    """A member of one chat room; the first ``--senders`` of each room send on the schedule."""

    weight = 19
    wait_time = constant(0)  # the task paces itself

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.room_size = max(1, options.room_size)
        self.interval = options.send_interval
        if not Members.tag:
            Members.reset()
        number = next(Members.numbers)
        room_no, position = divmod(number, self.room_size)
        room = Members.rooms.get(room_no)
        if room is None:
            room = Members.rooms[room_no] = Room(f"lt{Members.tag}r{room_no}")
        room.members.append(self)
        self.room = room
        self.name = f"lt{Members.tag}u{number}"
        self.sender = position < options.senders
        self.seq = 0
        self.last_seen: dict[str, int] = {}  # sender name -> newest seq delivered here
        self.acks: dict[int, float] = {}  # ref -> send time, for the ack row
        self.next_slot: float | None = None
        _metrics.counters.chat_users += 1

    def ws_path(self) -> str:
        return f"/chat/{self.room.name}?user={self.name}"

    @task
    def chat(self) -> None:
        if not self.ensure_connected():
            return
        now = time.monotonic()
        if not self.sender:
            gevent.sleep(IDLE_POLL)
            return
        if Plan.start_at is None:
            Plan.known.wait(IDLE_POLL)
            return
        if not Plan.sending(now):
            gevent.sleep(min(IDLE_POLL, max(0.0, Plan.start_at - now)) if Plan.start_at > now else IDLE_POLL)
            return
        if self.next_slot is None:
            self.next_slot = Plan.start_at + random.uniform(0, self.interval)
        wait = self.next_slot - now
        if Plan.stop_at is not None and self.next_slot >= Plan.stop_at:
            gevent.sleep(min(IDLE_POLL, max(0.0, Plan.stop_at - now)))
            return
        if wait > 0:
            gevent.sleep(min(wait, IDLE_POLL))
            if wait > IDLE_POLL:
                return  # check the connection and the plan again before the slot
        now = time.monotonic()
        if self.ws is None or not Plan.sending(now):
            return
        late = now - self.next_slot
        counters = _metrics.counters
        counters.scheduled += 1
        if late > MAX_CATCH_UP:  # a stall: skip the slots more than MAX_CATCH_UP behind, counting them late
            missed = int((late - MAX_CATCH_UP) // self.interval) + 1
            counters.scheduled += missed
            counters.late += missed
            self.next_slot += missed * self.interval
            late -= missed * self.interval
        if late > _metrics.late_after(self.environment):
            counters.late += 1
        self.next_slot += self.interval
        self.seq += 1
        sent_at = time.monotonic()
        expected = self.room.present(sent_at, self)
        text = json.dumps({"event": "message", "text": f"{self.name} {self.seq} {sent_at!r}", "ref": self.seq})
        self.acks[self.seq] = sent_at
        if self.send_text(text):
            counters.sent += 1
            counters.expected += expected
        else:
            self.acks.pop(self.seq, None)

    def on_text(self, text: str, now: float) -> None:
        event = json.loads(text)
        kind = event.get("event")
        if kind == "message":
            sender, seq, sent_at = event["text"].split(" ")
            seq_no = int(seq)
            sent = float(sent_at)
            if event.get("room") != self.room.name:
                self.fire(ROW_BROADCAST, 0, len(text), AssertionError(f"message for room {event.get('room')}"))
                return
            if self.connected_at is None or sent < self.connected_at:
                _metrics.counters.unexpected += 1  # sent before we joined: neither expected nor counted
                return
            if seq_no <= self.last_seen.get(sender, 0):
                _metrics.counters.out_of_order += 1
                self.fire(ROW_BROADCAST, (now - sent) * 1000, len(text),
                          AssertionError(f"{sender} #{seq_no} after #{self.last_seen[sender]}"))
                return
            self.last_seen[sender] = seq_no
            _metrics.counters.received += 1
            self.fire(ROW_BROADCAST, (now - sent) * 1000, len(text))
        elif kind == "ack":
            sent_at = self.acks.pop(event.get("ref"), None)
            if sent_at is not None:
                self.fire("ack", (now - sent_at) * 1000, len(text))
        elif kind == "error":
            self.fire(f"error {event.get('code')}", 0, len(text), RuntimeError(event.get("detail")))
        else:
            self.fire(f"unexpected {kind}", 0, len(text), RuntimeError(text[:200]))

    def on_lost(self) -> None:
        self.acks.clear()
        self.last_seen.clear()


# -- the phases: decided by the master (or the only process), applied by every process --

_run_started: float | None = None  # deciding process: when the test started (when --run-time began)
_scheduled = False  # deciding process: the schedule went out
_environment: list[Any] = []


@events.init.add_listener
def _register(environment: Any, **_: Any) -> None:
    _environment[:] = [environment]
    runner = environment.runner
    if runner is not None and not isinstance(runner, MasterRunner):
        runner.register_message(MSG_SCHEDULE, _apply_schedule)
        runner.register_message(MSG_STOP_SENDING, _apply_stop)


def _apply_schedule(environment: Any, msg: Any, **_: Any) -> None:
    now = time.monotonic()
    Plan.start_at = now + msg.data["start_in"]
    Plan.stop_at = None if msg.data["stop_in"] is None else now + msg.data["stop_in"]
    Plan.known.set()
    log.debug("sending from +%.1fs to %s", msg.data["start_in"], msg.data["stop_in"])


def _apply_stop(environment: Any, msg: Any, **_: Any) -> None:
    now = time.monotonic()
    if Plan.stop_at is None or Plan.stop_at > now:
        Plan.stop_at = now


def _deciding(environment: Any) -> bool:
    return environment.runner is not None and not isinstance(environment.runner, WorkerRunner)


@events.test_start.add_listener
def _on_test_start(environment: Any, **_: Any) -> None:
    global _run_started, _scheduled
    Plan.reset()
    Members.reset()
    _run_started = time.monotonic()
    _scheduled = False


@events.spawning_complete.add_listener
def _on_spawned(user_count: int, **_: Any) -> None:
    global _scheduled
    environment = _environment[0] if _environment else None
    if environment is None or not _deciding(environment):
        return
    options = environment.parsed_options
    now = time.monotonic()
    run_time = getattr(options, "run_time", None)
    stop_in = None
    if run_time and _run_started is not None:
        stop_in = _run_started + run_time - options.drain - now
    log.info(
        "spawning complete: sending starts in %.1fs, stops %s",
        options.settle, f"in {stop_in:.1f}s" if stop_in is not None else "when the test stops (then a drain)",
    )
    _scheduled = True
    _metrics.window["start"] = now + options.settle
    if stop_in is not None:
        _metrics.window["stop"] = now + stop_in
    environment.runner.send_message(MSG_SCHEDULE, {"start_in": options.settle, "stop_in": stop_in})


@events.test_stopping.add_listener
def _on_stopping(environment: Any, **_: Any) -> None:
    """Stopped before the planned end (no --run-time, or stopped by hand): stop sending, then drain."""
    if not _deciding(environment) or not _scheduled:
        return
    now = time.monotonic()
    run_time = getattr(environment.parsed_options, "run_time", None)
    planned_stop = _run_started + run_time - environment.parsed_options.drain if run_time and _run_started else None
    if planned_stop is not None and now >= planned_stop:
        return
    _metrics.window["stop"] = now
    environment.runner.send_message(MSG_STOP_SENDING, {})
    log.info("stopping: no more sends, draining for %.1fs", environment.parsed_options.drain)
    gevent.sleep(environment.parsed_options.drain)

