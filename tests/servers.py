"""Starting real hubbub servers for tests: as a subprocess (``python server.py``)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"hubbub listening on ws://([^:]+):(\d+)")


@dataclass
class RunningServer:
    """A ``server.py`` child process and where it listens; ``output`` collects its log lines."""

    process: subprocess.Popen[str]
    host: str
    port: int
    output: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    @property
    def http(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Signal the server and wait for it; returns its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)


@contextmanager
def spawn_server(*args: str, env: dict[str, str] | None = None, timeout: float = 20.0) -> Iterator[RunningServer]:
    """Run ``python server.py --port 0 ARGS`` until the block ends (then SIGTERM, or SIGKILL)."""
    cmd = [sys.executable, str(ROOT / "server.py"), "--port", "0", *args]
    process = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # the memory store unless a test asks for another: parallel servers must not share ./hubbub.db
        env={**os.environ, "PYTHONUNBUFFERED": "1", "HUBBUB_STORE": "memory", **(env or {})},
    )
    output: list[str] = []
    found = threading.Event()
    address: list[tuple[str, int]] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            match = LISTENING.search(line)
            if match and not found.is_set():
                address.append((match.group(1), int(match.group(2))))
                found.set()
        found.set()

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(timeout) or not address:
        process.kill()
        raise RuntimeError("server did not start:\n" + "".join(output))
    running = RunningServer(process, address[0][0], address[0][1], output)
    try:
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
