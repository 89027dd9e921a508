"""Presence: mostly idle users on ``/presence``.

Each user connects, checks that its ``presence_state`` arrives (row ``presence_state``,
response time = time from the handshake to the state; missing after
``STATE_TIMEOUT`` seconds: a failure), counts the ``presence_diff`` events the
others' joins and leaves cause (row ``presence_diff``), and now and then asks for
the list again (row ``list``, response time = round trip).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time

import _metrics
import gevent
from _ws import WebSocketUser
from locust import constant, task

STATE_TIMEOUT = 10.0  # seconds after the handshake by which presence_state must have arrived
LIST_EVERY = (20.0, 40.0)  # seconds between two {"event":"list"} of one user

_numbers = itertools.count()


class PresenceUser(WebSocketUser):
    """Connects to /presence and idles there."""

    weight = 1
    wait_time = constant(0)  # the task paces itself

    def on_start(self) -> None:
        self.name = f"lp{os.getpid():x}u{next(_numbers)}"
        self.state_at: float | None = None
        self.list_sent: float | None = None
        self.next_list = 0.0

    def ws_path(self) -> str:
        return f"/presence?user={self.name}"

    def on_open(self) -> None:
        self.state_at = None
        self.list_sent = None
        self.next_list = time.monotonic() + random.uniform(*LIST_EVERY)

    @task
    def idle(self) -> None:
        if not self.ensure_connected():
            return
        now = time.monotonic()
        assert self.connected_at is not None
        if self.state_at is None and now - self.connected_at > STATE_TIMEOUT:
            self.fire("presence_state", (now - self.connected_at) * 1000,
                      exception=TimeoutError(f"no presence_state within {STATE_TIMEOUT:g}s"))
            self.state_at = now  # reported once
        if now >= self.next_list and self.list_sent is None:
            self.list_sent = now
            self.send_text('{"event":"list"}')
            self.next_list = now + random.uniform(*LIST_EVERY)
        gevent.sleep(1.0)

    def on_text(self, text: str, now: float) -> None:
        event = json.loads(text)
        kind = event.get("event")
        if kind == "presence_state":
            if not isinstance(event.get("users"), list) or self.name not in event["users"]:
                self.fire("presence_state", 0, len(text), AssertionError(f"{self.name} not in {text[:200]}"))
            elif self.state_at is None and self.connected_at is not None:
                self.state_at = now
                _metrics.counters.presence_states += 1
                self.fire("presence_state", (now - self.connected_at) * 1000, len(text))
            elif self.list_sent is not None:
                self.fire("list", (now - self.list_sent) * 1000, len(text))
                self.list_sent = None
        elif kind == "presence_diff":
            _metrics.counters.presence_diffs += 1
            self.fire("presence_diff", 0, len(text))
        else:
            self.fire(f"unexpected {kind}", 0, len(text), RuntimeError(text[:200]))

    def on_lost(self) -> None:
        self.state_at = None
