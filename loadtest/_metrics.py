"""Counters of the hubbub load test, summed across worker processes, and the verdict.

Every process counts for the users it runs (``counters``); a worker sends its
running totals to the master with each stats report (``report_to_master``) and
the master keeps the latest totals per worker (``worker_report``). When the test
stops, the master asks every worker for its final totals (a worker keeps them
until the next test starts) and waits for all of them; a worker that does not answer makes
the run invalid, since its counts would be stale. Rooms never span processes,
so each process can count its own expected deliveries exactly.

The verdict runs where the run ends (the master, or the only process) and sets
Locust's exit code:

====  ==========================================================================
code  meaning
====  ==========================================================================
0     pass
1     failures: a connect failed, the server closed a connection unexpectedly,
      an ``error`` event arrived, a delivery came out of order, or a user raised
3     loss: lost deliveries above ``--max-loss`` (or more deliveries than expected)
4     latency: broadcast p99 above ``--max-p99-ms``
5     invalid run: the load generator saturated (more than 1% of sends served
      over ``--late-after-ms`` late, or Locust's CPU warning fired), nothing was
      sent, or a worker's final counts never arrived; fix the generator, not the server
====  ==========================================================================

When several apply, the first in the order 5, 1, 3, 4 wins: a saturated
generator measures itself, not the server, so nothing else it saw can be trusted.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import gevent
from locust import events
from locust.runners import MasterRunner, WorkerRunner

log = logging.getLogger("hubbub.loadtest")

WS = "WS"  # the request type of every row this suite reports
ROW_CONNECT = "connect"
ROW_SEND = "send"
ROW_BROADCAST = "recv broadcast"  # requests/s of this row = delivered messages/s
ROW_UNEXPECTED_CLOSE = "unexpected close"

EXIT_OK = 0
EXIT_FAILURES = 1
EXIT_LOSS = 3  # 2 is Locust's own code for an unhandled greenlet exception
EXIT_LATENCY = 4
EXIT_INVALID = 5

MSG_REPORT = "hubbub_report"  # master -> workers: send your final counts
MSG_COUNTS = "hubbub_counts"  # worker -> master: my counts
FINAL_WAIT = 30.0  # seconds the master waits for every worker's final counts (recovery.py checks first)

MAX_LATE_RATIO = 0.01  # more late sends than this: the generator saturated, the run is invalid


@dataclass
class Counters:
    """What one process counted; all fields are running totals since the test started."""

    chat_users: int = 0  # ChatUsers that joined a room
    scheduled: int = 0  # send slots that came due
    late: int = 0  # of those, slots served more than --late-after-ms late (or skipped)
    sent: int = 0  # chat messages sent
    expected: int = 0  # sum over sent messages of (members present at send time - 1)
    received: int = 0  # deliveries counted against ``expected``
    unexpected: int = 0  # deliveries to a member that joined after the send (not expected, not counted)
    out_of_order: int = 0  # deliveries older than or equal to one already seen from the same sender
    presence_states: int = 0
    presence_diffs: int = 0
    cpu_warnings: int = 0  # Locust's CPU warning fired in this process
    # RecoveringUser (recovery.py): the chaos run, and its check against the store at the end
    recovery_users: int = 0
    recovery_rooms: int = 0  # rooms checked against the store
    stored_messages: int = 0  # in the store's history of those rooms
    publishes: int = 0  # keyed publishes made (each counted once, however often sent)
    resends: int = 0  # unacked publishes sent again, with their key, after a reconnect
    acks: int = 0
    publishes_stored: int = 0  # publishes whose key the store holds
    publishes_lost: int = 0  # acked, yet not in the store
    publishes_duplicated: int = 0  # extra rows of a key stored more than once
    ack_mismatches: int = 0  # an ack id that is not the stored row's, or two acks of one key that differ
    unacked: int = 0  # publishes never acked by the end
    cuts: int = 0  # connections reset on purpose
    reconnects: int = 0
    switches: int = 0  # reconnects to another host than the connection before
    recovered_true: int = 0  # rejoins with since answered recovered true
    recovered_false: int = 0
    recovered_messages: int = 0  # messages carried by recovered-true joined replies
    history_pages: int = 0  # pages asked while catching up
    expected_deliveries: int = 0  # per member: the stored messages of its room that others published
    deliveries: int = 0
    messages_lost: int = 0  # expected, never delivered
    messages_duplicated: int = 0  # a delivery of an id already delivered to that member
    messages_out_of_order: int = 0  # deliveries that must move to follow the store's order
    messages_not_stored: int = 0  # delivered ids the store does not hold
    own_returned: int = 0  # a member's own messages that came back in a recovery or a page
    unsettled: int = 0  # members away or catching up when the users stopped
    check_failures: int = 0  # readers of the store's history that failed
    sabotaged: int = 0  # --sabotage: members whose record was spoiled (one lost, one duplicated, one swapped)

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, 0)

    def add(self, other: dict[str, Any]) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + int(other.get(f.name, 0)))


counters = Counters()  # this process's counts
_workers: dict[str, dict[str, Any]] = {}  # master only: the latest totals reported by each worker
_final: set[str] = set()  # master only: workers whose final counts arrived
_missing: list[str] = []  # master only: workers whose final counts did not arrive
_verdict: list[str] = []  # the lines logged when Locust quits
window: dict[str, float] = {}  # deciding process: "start" and "stop" of sending (time.monotonic())
checks: list[Callable[[Counters], tuple[list[str], tuple[int, str] | None]]] = []
"""Further verdicts (recovery.py's): each gives lines to log and, when it fails, (exit code, why)."""
PRECEDENCE = (EXIT_INVALID, EXIT_FAILURES, EXIT_LOSS, EXIT_LATENCY, EXIT_OK)  # the first that applies wins


def totals(environment: Any) -> Counters:
    """The run's counts: this process's, or on a master, the sum of its workers' latest reports."""
    if isinstance(environment.runner, MasterRunner):
        total = Counters()
        for data in _workers.values():
            total.add(data)
        total.cpu_warnings += counters.cpu_warnings  # the master's own monitor
        return total
    return counters


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    group = parser.add_argument_group("hubbub verdict")
    group.add_argument(
        "--max-loss", type=float, default=0.0, env_var="LOCUST_MAX_LOSS",
        help="largest tolerated fraction of lost broadcast deliveries (0.001 = 0.1%%); above it exit 3",
    )
    group.add_argument(
        "--max-p99-ms", type=float, default=0.0, env_var="LOCUST_MAX_P99_MS",
        help="largest tolerated p99 broadcast delivery latency in ms (0 = no limit); above it exit 4",
    )
    group.add_argument(
        "--late-after-ms", type=float, default=100.0, env_var="LOCUST_LATE_AFTER_MS",
        help="a send served this many ms after its slot is late; more than 1%% late sends: invalid run, exit 5",
    )


def late_after(environment: Any) -> float:
    """Seconds after its slot at which a send counts as late."""
    return float(getattr(environment.parsed_options, "late_after_ms", 100.0)) / 1000


@events.test_start.add_listener
def _reset(environment: Any, **_: Any) -> None:
    counters.reset()
    _workers.clear()
    _final.clear()
    _missing.clear()
    _verdict.clear()
    window.clear()


@events.init.add_listener
def _register(environment: Any, **_: Any) -> None:
    runner = environment.runner
    if isinstance(runner, MasterRunner):
        runner.register_message(MSG_COUNTS, _on_counts)
    elif isinstance(runner, WorkerRunner):
        runner.register_message(MSG_REPORT, _on_report_request)


def _on_report_request(environment: Any, msg: Any, **_: Any) -> None:
    environment.runner.send_message(MSG_COUNTS, asdict(counters))


def _on_counts(environment: Any, msg: Any, **_: Any) -> None:
    _workers[msg.node_id] = msg.data
    _final.add(msg.node_id)


@events.test_stop.add_listener
def _collect_final(environment: Any, **_: Any) -> None:
    """Master: ask every worker for its final counts (workers still hold them) and wait for all."""
    runner = environment.runner
    if not isinstance(runner, MasterRunner):
        return
    workers = {client.id for client in runner.clients.all}
    _final.clear()
    runner.send_message(MSG_REPORT, {})
    deadline = time.monotonic() + FINAL_WAIT
    while not workers <= _final and time.monotonic() < deadline:
        gevent.sleep(0.05)
    _missing[:] = sorted(workers - _final)
    if _missing:
        log.warning("no final counts from workers %s: their counts are stale", ", ".join(_missing))


@events.report_to_master.add_listener
def _report(client_id: str, data: dict[str, Any]) -> None:
    data["hubbub"] = asdict(counters)


@events.worker_report.add_listener
def _collect(client_id: str, data: dict[str, Any]) -> None:
    if "hubbub" in data:
        _workers[client_id] = data["hubbub"]


@events.cpu_warning.add_listener
def _cpu_warning(environment: Any, cpu_usage: float, **_: Any) -> None:
    counters.cpu_warnings += 1


def verdict(environment: Any) -> tuple[int, list[str], dict[str, Any]]:
    """The exit code, the lines explaining it, and the figures (a dict), from the run's stats and counts."""
    options = environment.parsed_options
    max_loss = float(getattr(options, "max_loss", 0.0) or 0.0)
    max_p99 = float(getattr(options, "max_p99_ms", 0.0) or 0.0)
    runner = environment.runner
    stats = environment.stats
    total = totals(environment)

    def row(name: str) -> Any:
        return stats.entries.get((name, WS))

    connect, broadcast, closes = row(ROW_CONNECT), row(ROW_BROADCAST), row(ROW_UNEXPECTED_CLOSE)
    connect_failures = connect.num_failures if connect else 0
    unexpected_closes = closes.num_requests if closes else 0
    failures = stats.total.num_failures
    lost = total.expected - total.received
    loss_ratio = lost / total.expected if total.expected else 0.0
    late_ratio = total.late / total.scheduled if total.scheduled else 0.0
    sending = window.get("stop", 0.0) - window.get("start", 0.0)
    delivered_sending = total.received / sending if sending > 0 else 0.0
    cpu_saturated = bool(
        total.cpu_warnings
        or getattr(runner, "cpu_warning_emitted", False)
        or getattr(runner, "worker_cpu_warning_emitted", False)
    )
    p50 = broadcast.get_response_time_percentile(0.5) if broadcast and broadcast.num_requests else None
    p99 = broadcast.get_response_time_percentile(0.99) if broadcast and broadcast.num_requests else None
    figures = {
        **asdict(total),
        "lost": lost,
        "loss_ratio": loss_ratio,
        "late_ratio": late_ratio,
        "connect_failures": connect_failures,
        "unexpected_closes": unexpected_closes,
        "failures": failures,
        "exceptions": len(runner.exceptions),
        "cpu_saturated": cpu_saturated,
        "delivered_per_s": broadcast.total_rps if broadcast else 0.0,  # over the whole run
        "sending_s": max(0.0, sending),
        "delivered_per_s_sending": delivered_sending,  # over the sending phase
        "missing_workers": len(_missing),
        "p50_ms": p50,
        "p99_ms": p99,
    }

    lines = [
        f"sent {total.sent} messages, expected {total.expected} deliveries, received {total.received}, "
        f"lost {lost} ({loss_ratio:.4%}, limit {max_loss:.4%})",
        f"delivered {delivered_sending:.0f} messages/s over {max(0.0, sending):.1f}s of sending "
        f"({figures['delivered_per_s']:.0f}/s over the whole run: the 'recv broadcast' row)",
        f"broadcast latency p50 {p50} ms, p99 {p99} ms (limit {max_p99 or 'none'})",
        f"connect failures {connect_failures}, unexpected closes {unexpected_closes}, "
        f"failed requests {failures}, out of order {total.out_of_order}, user exceptions {len(runner.exceptions)}",
        f"generator: {total.late} of {total.scheduled} sends late ({late_ratio:.2%}, limit {MAX_LATE_RATIO:.0%}), "
        f"CPU warning {'fired' if cpu_saturated else 'not fired'}",
    ]
    if total.presence_states or total.presence_diffs:
        lines.append(f"presence: {total.presence_states} presence_state, {total.presence_diffs} presence_diff")

    if late_ratio > MAX_LATE_RATIO or cpu_saturated:
        code, why = EXIT_INVALID, "INVALID RUN: the load generator saturated; use more --processes or fewer users"
    elif _missing:
        code, why = EXIT_INVALID, f"INVALID RUN: no final counts from {len(_missing)} worker(s)"
    elif failures or unexpected_closes or runner.exceptions:
        code, why = EXIT_FAILURES, "FAIL: failed connects, unexpected closes or failed requests"
    elif total.chat_users and not total.sent:
        code, why = EXIT_INVALID, "INVALID RUN: no message was sent (is --run-time longer than spawn + settle + drain?)"
    elif lost < 0:
        code, why = EXIT_LOSS, f"FAIL: {-lost} more deliveries than expected"
    elif loss_ratio > max_loss:
        code, why = EXIT_LOSS, f"FAIL: lost {lost} deliveries"
    elif max_p99 and p99 is not None and p99 > max_p99:
        code, why = EXIT_LATENCY, f"FAIL: broadcast p99 {p99} ms above {max_p99:g} ms"
    else:
        code, why = EXIT_OK, "PASS"
    for check in checks:
        more, failed = check(total)
        lines += more
        if failed is not None and PRECEDENCE.index(failed[0]) < PRECEDENCE.index(code):
            code, why = failed
    lines.append(f"verdict: {why} (exit code {code})")
    figures["exit_code"] = code
    return code, lines, figures


@events.quitting.add_listener
def _decide(environment: Any, **_: Any) -> None:
    """Set the exit code before Locust reads it; the lines are logged after the stats table."""
    if isinstance(environment.runner, WorkerRunner):
        return
    code, lines, figures = verdict(environment)
    environment.process_exit_code = code
    _verdict[:] = [*lines, "hubbub-loadtest " + json.dumps(figures, sort_keys=True)]


@events.quit.add_listener
def _print(exit_code: int, **_: Any) -> None:
    for line in _verdict:
        log.info(line)
