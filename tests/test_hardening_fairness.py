"""One connection must never stall the others (``server.py`` in a subprocess, raw sockets).

A flooder writes as fast as the server reads: empty continuation frames (a message that never
completes), pings, tiny messages, or one 256 KiB write of tiny messages. Meanwhile another client
measures its echo round trip. Each connection gets ``--frames-per-pass`` frames per loop pass and
then waits (its socket unread) until the others had their turn, so the round trip stays near its
baseline; and the rate limit counts every frame, so with it on the flood is closed 1008.

The round trips are recorded as figures (printed at the end of the run), never asserted against a
clock: these machines are shared.
"""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests.servers import RunningServer, spawn_server
from tests.wire import Figure, RawClient, assert_still_serves, frame

TINY = frame(b'{"event":"message","text":"x"}')
FLOODS = {
    "empty-fragments": (frame(b"x", fin=False), frame(b"", opcode=0x0, fin=False)),
    "pings": (b"", frame(b"p", opcode=0x9)),
    "tiny-messages": (b"", TINY),
}


def echo_round_trips(port: int, count: int) -> list[float]:
    """``count`` sequential echo round trips on /echo, in milliseconds."""
    client = RawClient(port, "/echo")
    times = []
    try:
        for i in range(count):
            started = time.perf_counter()
            client.send_text(f"ping {i}")
            client.read_messages(i + 1)
            assert len(client.messages) == i + 1, "an echo did not come back"
            times.append((time.perf_counter() - started) * 1000)
    finally:
        client.close()
    return times


def summary(times: list[float]) -> str:
    ordered = sorted(times)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"p50 {statistics.median(ordered):.2f} ms, p99 {p99:.2f} ms, max {ordered[-1]:.2f} ms"


FLOOD = """
import os, socket, sys
sock = socket.fromfd(int(sys.argv[1]), socket.AF_INET, socket.SOCK_STREAM)
sock.setblocking(True)  # the parent's socket has a timeout, which made the shared file non-blocking
data = sys.stdin.buffer.read()
head, batch = data[: int(sys.argv[2])], data[int(sys.argv[2]) :]
try:
    sock.sendall(head)
    while True:
        sock.sendall(batch)
except OSError:
    sys.exit(3)  # the server closed it
"""


class Flooder:
    """Writes ``head`` once, then ``unit`` over and over, as fast as the server takes it, until stopped.

    The writing happens in a process of its own: a thread here would hold the GIL between its sends
    and delay the measuring client's reads by up to the interpreter's 5 ms switch interval."""

    def __init__(self, port: int, head: bytes, unit: bytes) -> None:
        self.client = RawClient(port, "/chat/flood?user=flooder")
        batch = unit * max(1, 65536 // len(unit))
        fd = self.client.sock.fileno()
        self.process = subprocess.Popen(
            [sys.executable, "-c", FLOOD, str(fd), str(len(head))], pass_fds=(fd,), stdin=subprocess.PIPE
        )
        assert self.process.stdin is not None
        self.process.stdin.write(head + batch)
        self.process.stdin.close()

    @property
    def cut_off(self) -> bool:
        """The server closed the flooder's connection (its writes failed)."""
        return self.process.poll() == 3

    def wait(self, timeout: float) -> None:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def close_code(self) -> int | None:
        """Stop writing; the close code the server sent (None: none)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        code = self.client.read_until_closed(timeout=5)
        self.client.close()
        return code


@pytest.fixture(params=["asyncio", "trio"])
def unlimited(request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    """The rate limit off: only the per-pass budget stands between the flood and everyone else."""
    with spawn_server("--rate-limit", "0", "--backend", request.param) as running:
        yield running


@pytest.mark.parametrize("kind", [*FLOODS, "one-256-KiB-write"])
def test_a_flood_delays_another_client_by_one_budget_at_most(unlimited: RunningServer, kind: str,
                                                             figure: Figure) -> None:
    baseline = echo_round_trips(unlimited.port, 100)
    if kind == "one-256-KiB-write":
        # 256 KiB of tiny messages in one write, again and again: each used to be handled whole in one
        # loop pass (300-400 ms in which nobody else was served)
        flooder = Flooder(unlimited.port, b"", TINY * (256 * 1024 // len(TINY)))
    else:
        flooder = Flooder(unlimited.port, *FLOODS[kind])
    time.sleep(0.3)  # the flood is under way
    during = echo_round_trips(unlimited.port, 300)
    still_flooding = not flooder.cut_off
    flooder.close_code()
    figure(f"{kind}: echo round trip {summary(baseline)} before, {summary(during)} during")
    assert still_flooding, "the flooder was closed although the rate limit is off"
    assert len(during) == 300
    assert_still_serves(unlimited)


@pytest.fixture
def limited() -> Iterator[RunningServer]:
    """The default limits (100 frames/s per connection)."""
    with spawn_server() as running:
        yield running


@pytest.mark.parametrize("kind", list(FLOODS))
def test_with_the_rate_limit_every_kind_of_flood_is_closed_1008(limited: RunningServer, kind: str,
                                                                figure: Figure) -> None:
    flooder = Flooder(limited.port, *FLOODS[kind])
    during = echo_round_trips(limited.port, 100)
    flooder.wait(10)
    cut_off = flooder.cut_off
    code = flooder.close_code()
    figure(f"{kind}: close {code}; echo round trip meanwhile {summary(during)}")
    assert cut_off
    assert code == 1008
    assert_still_serves(limited)


def test_input_after_the_budget_is_still_all_handled(limited: RunningServer) -> None:
    """A pipelined burst well over one budget (frames_per_pass is 64): every message arrives, in order."""
    sender = RawClient(limited.port, "/chat/burst?user=s")
    reader = RawClient(limited.port, "/chat/burst?user=r")
    try:
        burst = b"".join(frame(json.dumps({"event": "message", "text": str(i)}).encode()) for i in range(90))
        sender.send(burst)  # 90 messages: within the 100/s burst allowance, more than one budget
        texts = [json.loads(m)["text"] for m in reader.read_messages(90)]
        assert texts == [str(i) for i in range(90)]
        sender.sock.shutdown(socket.SHUT_WR)  # and what was sent before a FIN is handled too
    finally:
        sender.close()
        reader.close()
