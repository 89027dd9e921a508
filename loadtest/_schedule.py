"""The sending window the senders of a load test share, and each sender's pace.

The deciding process (the master, or the only process) opens the window ``--settle`` seconds
after spawning completes and closes it ``--drain`` seconds before ``--run-time`` ends (or at
once, when the test is stopped earlier: then it drains too); every process hears it by a
message, in its own ``time.monotonic()``. A sender sends one message per ``interval`` on an
absolute schedule (slot k at the window's start + a random offset + k * interval, never "sleep
after send", so a slow pass does not stretch the run); overdue slots are sent at once, those
over ``MAX_CATCH_UP`` overdue are skipped, and both kinds count as late in ``_metrics``.

Each locustfile that sends makes its own ``Schedule`` (its own message names), so two of them
loaded in one run keep their windows apart; the one that ``drains`` ends the run's window.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any

import _metrics
import gevent
import gevent.event
from locust import events
from locust.runners import MasterRunner, WorkerRunner

log = logging.getLogger("hubbub.loadtest")

MAX_CATCH_UP = 1.0  # seconds: overdue slots are sent at once (catching up), unless this far behind
IDLE_POLL = 1.0  # seconds a task sleeps when it has nothing to do (bounds how late a reconnect starts)


class Pace:
    """One sender's slots: every ``interval`` seconds, from a random offset after the window opens."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.next_slot: float | None = None


class Schedule:
    """When this process's senders send (``start_at``, ``stop_at``: ``time.monotonic()``, None until
    known), as the deciding process planned it; ``due`` paces a sender through it."""

    def __init__(
        self,
        name: str,
        settle: Callable[[Any], float],
        drain: Callable[[Any], float],
        on_test_start: Callable[[], None],
        drains: Callable[[], bool],
    ) -> None:
        """``name`` tags the messages; ``settle``/``drain`` read the run's options; ``on_test_start``
        resets the locustfile's own state; ``drains``: this schedule ends the run's window (sets its
        end, and waits the drain when the test is stopped early)."""
        self.start_at: float | None = None
        self.stop_at: float | None = None
        self.known = gevent.event.Event()  # set once the schedule arrived
        self.name = name
        self._start_message = f"{name}_schedule"
        self._stop_message = f"{name}_stop_sending"
        self._settle, self._drain, self._on_test_start, self._drains = settle, drain, on_test_start, drains
        self._environment: Any = None
        self._run_started: float | None = None  # deciding process: when the test (and --run-time) began
        self._scheduled = False  # deciding process: the schedule went out
        events.init.add_listener(self._register)
        events.test_start.add_listener(self._test_start)
        events.spawning_complete.add_listener(self._spawned)
        events.test_stopping.add_listener(self._stopping)

    def sending(self, now: float) -> bool:
        return self.start_at is not None and self.start_at <= now and (self.stop_at is None or now < self.stop_at)

    def due(self, pace: Pace, connected: Callable[[], bool], environment: Any) -> bool:
        """Wait towards ``pace``'s next slot (at most ``IDLE_POLL`` at a time, so that the caller checks
        its connection again); True when one message is to be sent now (counted as scheduled, and as
        late if it is)."""
        now = time.monotonic()
        if self.start_at is None:
            self.known.wait(IDLE_POLL)
            return False
        if not self.sending(now):
            gevent.sleep(min(IDLE_POLL, max(0.0, self.start_at - now)) if self.start_at > now else IDLE_POLL)
            return False
        if pace.next_slot is None:
            pace.next_slot = self.start_at + random.uniform(0, pace.interval)
        wait = pace.next_slot - now
        if self.stop_at is not None and pace.next_slot >= self.stop_at:
            gevent.sleep(min(IDLE_POLL, max(0.0, self.stop_at - now)))
            return False
        if wait > 0:
            gevent.sleep(min(wait, IDLE_POLL))
            if wait > IDLE_POLL:
                return False  # check the connection and the plan again before the slot
        now = time.monotonic()
        if not connected() or not self.sending(now):
            return False
        late = now - pace.next_slot
        counters = _metrics.counters
        counters.scheduled += 1
        if late > MAX_CATCH_UP:  # a stall: skip the slots more than MAX_CATCH_UP behind, counting them late
            missed = int((late - MAX_CATCH_UP) // pace.interval) + 1
            counters.scheduled += missed
            counters.late += missed
            pace.next_slot += missed * pace.interval
            late -= missed * pace.interval
        if late > _metrics.late_after(environment):
            counters.late += 1
        pace.next_slot += pace.interval
        return True

    # -- the phases: decided by the master (or the only process), applied by every process --------

    def _register(self, environment: Any, **_: Any) -> None:
        self._environment = environment
        runner = environment.runner
        if runner is not None and not isinstance(runner, MasterRunner):
            runner.register_message(self._start_message, self._apply_schedule)
            runner.register_message(self._stop_message, self._apply_stop)

    def _apply_schedule(self, environment: Any, msg: Any, **_: Any) -> None:
        now = time.monotonic()
        self.start_at = now + msg.data["start_in"]
        self.stop_at = None if msg.data["stop_in"] is None else now + msg.data["stop_in"]
        self.known.set()
        log.debug("sending from +%.1fs to %s", msg.data["start_in"], msg.data["stop_in"])

    def _apply_stop(self, environment: Any, msg: Any, **_: Any) -> None:
        now = time.monotonic()
        if self.stop_at is None or self.stop_at > now:
            self.stop_at = now

    @staticmethod
    def _deciding(environment: Any) -> bool:
        return environment.runner is not None and not isinstance(environment.runner, WorkerRunner)

    def _test_start(self, environment: Any, **_: Any) -> None:
        self.start_at = self.stop_at = None
        self.known.clear()
        self._on_test_start()
        self._run_started = time.monotonic()
        self._scheduled = False

    def _planned_stop(self, environment: Any) -> float | None:
        """When sending stops by plan: ``--drain`` before the end of ``--run-time`` (None: no run time)."""
        run_time = getattr(environment.parsed_options, "run_time", None)
        if not run_time or self._run_started is None:
            return None
        return self._run_started + run_time - self._drain(environment)

    def _spawned(self, user_count: int, **_: Any) -> None:
        environment = self._environment
        if environment is None or not self._deciding(environment):
            return
        settle = self._settle(environment)
        now = time.monotonic()
        stop = self._planned_stop(environment)
        stop_in = None if stop is None else stop - now
        log.info(
            "%s: spawning complete: sending starts in %.1fs, stops %s", self.name,
            settle, f"in {stop_in:.1f}s" if stop_in is not None else "when the test stops (then a drain)",
        )
        self._scheduled = True
        # every schedule of the run opens the same window: one clock, one phase plan
        _metrics.window["start"] = now + settle
        if stop_in is not None:
            _metrics.window["stop"] = now + stop_in
        environment.runner.send_message(self._start_message, {"start_in": settle, "stop_in": stop_in})

    def _stopping(self, environment: Any, **_: Any) -> None:
        """Stopped before the planned end (no --run-time, or stopped by hand): stop sending, then drain."""
        if not self._deciding(environment) or not self._scheduled:
            return
        now = time.monotonic()
        planned_stop = self._planned_stop(environment)
        if planned_stop is not None and now >= planned_stop:
            return
        environment.runner.send_message(self._stop_message, {})
        if self._drains():
            drain = self._drain(environment)
            _metrics.window["stop"] = now
            log.info("stopping: no more sends, draining for %.1fs", drain)
            gevent.sleep(drain)
