"""Chat broadcast: rooms of ``--room-size`` members on ``/chat/{room}``, a few senders each, counted loss.

Phases:

1. Everyone connects (users are spawned at ``-r`` per second; each connects in its task).
2. When spawning completes, everyone waits ``--settle`` seconds for the last handshakes.
3. The first ``--senders`` members of every room send one message each ``--send-interval``
   seconds, on an absolute schedule (``_schedule``: slot k at start + offset + k * interval,
   never "sleep after send", so a slow pass does not stretch the run; overdue slots are sent
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
import os
import random
import time
from typing import Any

import _metrics
import gevent
from _metrics import ROW_BROADCAST
from _schedule import IDLE_POLL, Pace, Schedule
from _ws import WebSocketUser
from locust import constant, events, task


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
        self.pace = Pace(options.send_interval)
        _metrics.counters.chat_users += 1

    def ws_path(self) -> str:
        return f"/chat/{self.room.name}?user={self.name}"

    @task
    def chat(self) -> None:
        if not self.ensure_connected():
            return
        if not self.sender:
            gevent.sleep(IDLE_POLL)
            return
        if not schedule.due(self.pace, lambda: self.ws is not None, self.environment):
            return
        counters = _metrics.counters
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


schedule = Schedule(
    "hubbub",
    settle=lambda environment: environment.parsed_options.settle,
    drain=lambda environment: environment.parsed_options.drain,
    on_test_start=Members.reset,
    drains=lambda: True,  # the suite's window: it ends the run
)
