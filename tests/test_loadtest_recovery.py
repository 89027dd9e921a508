"""The chaos load test (loadtest/recovery.py, ``RecoveringUser``) run briefly against one real server.

Two headless Locust runs at once against one ``server.py`` (SQLite in tmp_path, a small ring and
``--recover-max`` so that recoveries come from the ring, from the store and, for the longer gaps,
as ``recovered: false`` with history paging): the honest run must end with nothing lost,
duplicated or out of order, after cuts and recoveries that really happened; the ``--sabotage`` run
(which spoils one member's record per room on purpose) must be caught, with exactly the counts
it spoiled, so the verdict is known to be able to fail. Nothing here asserts on time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.servers import ROOT, spawn_server
from tests.test_loadtest import FIGURES

EXIT_FAILURES = 1  # loadtest/_metrics.py: out of order wins over loss
SERVER = (
    "--history-retention", "off", "--max-connections-per-address", "0",
    "--recover-ring", "6", "--recover-max", "12",  # 8 messages/s per room: a gap over ~1.5 s answers recovered false
)
# ~18 s: spawn at once, settle 1 s, publish and cut for ~9 s, drain 7 s: Locust's start-up eats a second or
# two of it, and what is left must exceed --offline's 2.5 s plus a reconnect and a catch-up
CHAOS = [
    "--headless", "-u", "30", "-r", "30", "-t", "18s", "--only-summary", "RecoveringUser",
    "--recovery-room-size", "5", "--recovery-senders", "2", "--publish-interval", "0.25",
    "--cut-interval", "0.3", "--offline", "0,2.5", "--settle", "1", "--drain", "7",
]


def start_locust(host: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "locust", "-f", "loadtest", "--host", host, *CHAOS, *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def result(process: subprocess.Popen[str]) -> tuple[int, dict[str, Any], str]:
    output, _ = process.communicate(timeout=90)
    match = FIGURES.search(output)
    assert match, f"no verdict in the output:\n{output[-5000:]}"
    return process.returncode, json.loads(match.group(1)), output


def test_cut_connections_recover_every_message_once_in_order_and_sabotage_is_caught(tmp_path: Path) -> None:
    with spawn_server("--store", f"sqlite:///{tmp_path / 'hubbub.db'}", *SERVER) as server:
        honest = start_locust(server.url)
        sabotaged = start_locust(server.url, "--sabotage")
        try:
            code, figures, output = result(honest)
            bad_code, bad, bad_output = result(sabotaged)
        finally:
            for process in (honest, sabotaged):
                if process.poll() is None:
                    process.kill()
                    process.wait()

    assert code == 0, output[-5000:]
    for name in ("messages_lost", "messages_duplicated", "messages_out_of_order", "messages_not_stored",
                 "publishes_lost", "publishes_duplicated", "ack_mismatches", "unacked", "unsettled",
                 "failures", "unexpected_closes", "connect_failures", "check_failures"):
        assert figures[name] == 0, (name, output[-5000:])
    # the chaos really happened: cuts, reconnects, both kinds of recovery, publishes sent again
    for name in ("cuts", "reconnects", "recovered_true", "recovered_messages", "recovered_false",
                 "history_pages", "resends"):
        assert figures[name] > 0, (name, output[-5000:])
    assert figures["recovery_rooms"] == 6
    assert figures["deliveries"] == figures["expected_deliveries"] > 0
    assert figures["publishes_stored"] == figures["publishes"] == figures["stored_messages"] > 0

    assert bad_code == EXIT_FAILURES, bad_output[-5000:]
    assert bad["sabotaged"] == 6
    assert bad["messages_lost"] == bad["messages_duplicated"] == bad["messages_out_of_order"] == 6, bad_output[-5000:]
    assert bad["messages_not_stored"] == bad["publishes_lost"] == bad["publishes_duplicated"] == 0
