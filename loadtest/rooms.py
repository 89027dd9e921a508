"""Many rooms per socket: ``RoomsUser`` holds one ``/ws`` socket in ``--rooms-per-user`` rooms, counted loss.

    locust -f loadtest --headless RoomsUser -u 3000 -r 300 -t 60s --rooms-per-user 5

Opt-in: a run that does not name ``RoomsUser`` leaves it out (the default mix stays ChatUser and PresenceUser).

Rooms come in groups that never span processes: a group of ``2 * --room-size`` users shares
``2 * --rooms-per-user`` rooms, each user in ``--rooms-per-user`` of them, so a room has about
``--room-size`` members; user ``c`` of a group (row ``q``, column ``r`` of ``divmod(c, rooms)``) is in rooms
``(r + k * s) % rooms`` for ``k < --rooms-per-user`` with a step ``s`` that depends on the row, so rooms share
members in varying combinations, not one fixed set. The first ``2 * --senders`` users of every group send
(``--senders`` per room on average): one publish each ``--send-interval`` seconds, to their rooms in turn, so
messages are spread over the rooms. Phases as in ``chat_broadcast`` (settle after spawning, an absolute send
schedule with late slots counted, sending stops ``--drain`` seconds before ``--run-time`` ends); those options
are ``chat_broadcast``'s, so run the directory (``-f loadtest``), as ``locust.conf`` does.

Loss is counted like ``ChatUser``'s, per room: each publish adds (members *joined* to that room at send time,
from their ``joined`` reply, minus the sender) to the expected deliveries; each member counts every ``message``
of its rooms once; a message sent before this member's ``joined`` arrived is neither expected nor counted; a
message of a room it is not in is a failure, one older than or equal to the last from the same sender in the
same room is out of order. The counts are ``_metrics``'s, so the verdict and the exit code are the suite's.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import sys
import time
from typing import Any

import _metrics
import gevent
from _metrics import ROW_BROADCAST
from _schedule import IDLE_POLL, Pace, Schedule
from _ws import WebSocketUser
from locust import constant, events, task

# chat_broadcast's options (defined there), with its defaults for a run without that file
DEFAULTS = {"room_size": 100, "senders": 1, "send_interval": 0.25, "settle": 2.0, "drain": 5.0}


def option(environment: Any, name: str) -> Any:
    value = getattr(environment.parsed_options, name, None)
    return DEFAULTS[name] if value is None else value


def group_rooms(c: int, rooms: int, per_user: int) -> list[int]:
    """The rooms (numbers in its group, ``rooms`` of them) of user ``c`` of a group: ``per_user`` distinct ones.

    Row ``q``, column ``r`` (``divmod(c, rooms)``): rooms ``(r + k * s) % rooms`` for ``k < per_user``, with
    ``s = 1 + q % (rooms // per_user)``, so ``(per_user - 1) * s < rooms`` and the rooms are distinct; each full
    row puts one member in every room for each ``k``.
    """
    q, r = divmod(c, rooms)
    step = 1 + q % max(1, rooms // per_user)
    return [(r + k * step) % rooms for k in range(per_user)]


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    group = parser.add_argument_group("hubbub rooms (RoomsUser)")
    group.add_argument("--rooms-per-user", type=int, default=5, env_var="LOCUST_ROOMS_PER_USER",
                       help="rooms each RoomsUser joins on its one /ws socket")


class Room:
    """The members of one /ws room, all in this process."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.members: list[RoomsUser] = []

    def present(self, t: float, but: RoomsUser) -> int:
        """Members other than ``but`` whose ``joined`` for this room arrived by time ``t``."""
        name = self.name
        return sum(1 for m in self.members if m is not but and m.joined_at.get(name, t + 1) <= t)


class Groups:
    """This process's rooms; reset per test, tagged per process (no two processes share a room)."""

    tag = ""
    numbers = itertools.count()
    rooms: dict[tuple[int, int], Room] = {}

    @classmethod
    def reset(cls) -> None:
        cls.tag = f"{os.getpid():x}{random.randrange(16**4):04x}"
        cls.numbers = itertools.count()
        cls.rooms = {}


NAME = "RoomsUser"


class RoomsUser(WebSocketUser):
    """One /ws socket in ``--rooms-per-user`` rooms; the first ``2 * --senders`` of each group publish."""

    # Opt-in: only when named (``locust -f loadtest RoomsUser``, or LOCUST_USER_CLASSES), so the default mix
    # (ChatUser 19 : PresenceUser 1) and the figures measured with it stay as they are. Locust drops a class
    # of weight 0 from a run that does not name it.
    weight = 1 if NAME in sys.argv[1:] or NAME in os.environ.get("LOCUST_USER_CLASSES", "").split() else 0
    wait_time = constant(0)  # the task paces itself

    def on_start(self) -> None:
        env = self.environment
        per_user = max(1, int(getattr(env.parsed_options, "rooms_per_user", 5) or 5))
        room_size = max(1, int(option(env, "room_size")))
        if not Groups.tag:
            Groups.reset()
        number = next(Groups.numbers)
        rooms_per_group, users_per_group = 2 * per_user, 2 * room_size
        group, c = divmod(number, users_per_group)
        self.rooms: dict[str, Room] = {}
        for r in group_rooms(c, rooms_per_group, per_user):
            room = Groups.rooms.get((group, r))
            if room is None:
                room = Groups.rooms[(group, r)] = Room(f"lt{Groups.tag}g{group}m{r}")
            room.members.append(self)
            self.rooms[room.name] = room
        self.order = list(self.rooms.values())
        self.name = f"lt{Groups.tag}w{number}"
        self.sender = c < 2 * int(option(env, "senders"))
        self.seq = 0
        self.turn = 0
        self.joined_at: dict[str, float] = {}  # room -> time.monotonic() when its joined reply arrived
        self.last_seen: dict[tuple[str, str], int] = {}  # (room, sender) -> newest seq delivered here
        self.acks: dict[int, float] = {}  # ref -> send time, for the ack row
        self.pace = Pace(float(option(env, "send_interval")))
        _metrics.counters.chat_users += 1  # "users that joined a room": the verdict's "nothing sent" check

    def ws_path(self) -> str:
        return f"/ws?user={self.name}"

    def on_open(self) -> None:
        self.joined_at.clear()
        for name in self.rooms:
            if not self.send_text(json.dumps({"event": "join", "room": name, "presence": False})):
                return

    @task
    def publish(self) -> None:
        if not self.ensure_connected():
            return
        if not self.sender:
            gevent.sleep(IDLE_POLL)
            return
        if not schedule.due(self.pace, lambda: self.ws is not None, self.environment):
            return
        counters = _metrics.counters
        joined = [room for room in self.order if room.name in self.joined_at]
        if not joined:
            return
        room = joined[self.turn % len(joined)]
        self.turn += 1
        self.seq += 1
        sent_at = time.monotonic()
        expected = room.present(sent_at, self)
        text = json.dumps({"event": "publish", "room": room.name, "ref": self.seq,
                           "data": {"from": self.name, "seq": self.seq, "t": sent_at}})
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
            room, data = event.get("room"), event.get("data")
            if room not in self.rooms:
                self.fire(ROW_BROADCAST, 0, len(text), AssertionError(f"message for room {room}"))
                return
            if not isinstance(data, dict) or not {"from", "seq", "t"} <= data.keys():
                self.fire(ROW_BROADCAST, 0, len(text), AssertionError(f"not a RoomsUser message: {text[:200]}"))
                return
            sent = float(data["t"])
            joined = self.joined_at.get(room)
            if joined is None or sent < joined:
                _metrics.counters.unexpected += 1  # sent before we joined: neither expected nor counted
                return
            key = (room, data["from"])
            if data["seq"] <= self.last_seen.get(key, 0):
                _metrics.counters.out_of_order += 1
                self.fire(ROW_BROADCAST, (now - sent) * 1000, len(text),
                          AssertionError(f"{key[1]} #{data['seq']} after #{self.last_seen[key]} in {room}"))
                return
            self.last_seen[key] = data["seq"]
            _metrics.counters.received += 1
            self.fire(ROW_BROADCAST, (now - sent) * 1000, len(text))
        elif kind == "ack":
            sent_at = self.acks.pop(event.get("ref"), None)
            if sent_at is not None:
                self.fire("ack", (now - sent_at) * 1000, len(text))
        elif kind == "joined":
            if event.get("room") in self.rooms:
                self.joined_at.setdefault(event["room"], now)
                self.fire("joined", 0, len(text))
            else:
                self.fire("joined", 0, len(text), AssertionError(f"joined {event.get('room')}"))
        elif kind == "error":
            self.fire(f"error {event.get('code')}", 0, len(text), RuntimeError(event.get("detail")))
        else:
            self.fire(f"unexpected {kind}", 0, len(text), RuntimeError(text[:200]))

    def on_lost(self) -> None:
        self.acks.clear()
        self.last_seen.clear()
        self.joined_at.clear()


schedule = Schedule(
    "hubbub_rooms",
    settle=lambda environment: float(option(environment, "settle")),
    drain=lambda environment: float(option(environment, "drain")),
    on_test_start=Groups.reset,
    # chat_broadcast's schedule ends the run's window when it is loaded too (it opens the same one)
    drains=lambda: "chat_broadcast" not in sys.modules,
)
