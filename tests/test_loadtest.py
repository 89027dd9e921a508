"""Smoke tests of the Locust suite in loadtest/: short headless runs against real servers.

Locust is run as a subprocess (importing it here would monkey-patch this test
process with gevent). The verdict line ``hubbub-loadtest {...}`` that the suite
logs at the end carries the counted figures.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tests.servers import LISTENING, ROOT, spawn_server

EXIT_LOSS = 3  # loadtest/_metrics.py EXIT_LOSS
FIGURES = re.compile(r"hubbub-loadtest (\{.*\})")

# ~7 s of load with a few dozen users: spawn 1 s, settle 1 s, send 3 s, drain 2 s. The lateness
# limit is loosened so a busy CI machine cannot turn the run invalid (exit 5); nothing here
# asserts on time.
SMOKE = [
    "--headless", "-u", "30", "-r", "30", "-t", "7s", "--only-summary",
    "--room-size", "10", "--senders", "2", "--send-interval", "0.2", "--settle", "1", "--drain", "2",
    "--late-after-ms", "1000",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_locust(host: str, *args: str) -> tuple[int, dict[str, Any], str]:
    """``locust -f loadtest`` (top-level locust.conf applies) against ``host``; exit code, figures, output."""
    cmd = [sys.executable, "-m", "locust", "-f", "loadtest", "--host", host, *SMOKE, *args]
    done = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    output = done.stdout + done.stderr
    match = FIGURES.search(output)
    assert match, f"no verdict in the output of {cmd}:\n{output[-5000:]}"
    return done.returncode, json.loads(match.group(1)), output


@contextmanager
def lossy_server(drop_every: int) -> Iterator[str]:
    """tests/lossy_server.py: hubbub's chat protocol, dropping one delivery in ``drop_every``."""
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "lossy_server.py"), "--port", "0", "--drop-every", str(drop_every)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    address: list[str] = []
    found = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            match = LISTENING.search(line)
            if match and not found.is_set():
                address.append(f"ws://{match.group(1)}:{match.group(2)}")
                found.set()
        found.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not found.wait(20) or not address:
            raise RuntimeError("the lossy server did not start")
        yield address[0]
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_smoke_against_server_counts_every_delivery_across_processes() -> None:
    port = str(free_port())
    with spawn_server() as server:
        code, figures, output = run_locust(
            server.url, "--processes", "2", "--master-bind-port", port, "--master-port", port,
        )
    assert code == 0, output[-5000:]
    assert figures["sent"] > 0
    assert figures["received"] > 0
    assert figures["received"] == figures["expected"]
    assert figures["lost"] == 0
    assert figures["connect_failures"] == 0
    assert figures["unexpected_closes"] == 0
    assert figures["missing_workers"] == 0
    assert figures["presence_states"] > 0  # the PresenceUsers ran too


def test_lossy_server_fails_with_the_loss_exit_code() -> None:
    with lossy_server(drop_every=20) as url:
        code, figures, output = run_locust(url, "ChatUser")
    assert code == EXIT_LOSS, output[-5000:]
    assert figures["lost"] > 0
    assert figures["received"] > 0
    assert figures["connect_failures"] == 0
    assert figures["unexpected_closes"] == 0

