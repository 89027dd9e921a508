"""Publishes per second through the server API (``POST /api/publish``) with HTTP/1.1 keep-alive, the
default SQLite store on (a file in a temporary directory), and the server's CPU time per request.

Starts one ``server.py`` (``--api-key``, ``--store sqlite:///TMP/api.db``) and measures, each for
``--requests`` publishes:

- *sequential*: ``--connections`` asyncio connections, each sending one request and reading its
  answer before the next (what a pool of backend workers does);
- *pipelined*: the same connections, each keeping ``--depth`` requests in flight (answers come back
  in order on each connection);
- *hubbub.api.Client*: the package's stdlib client, one thread, one kept-alive connection;
- *urllib*: ``urllib.request``, a new TCP connection per request (what keep-alive saves).

Every answer must be 200 with an ``id``, or the run fails. The server's CPU (user + sys of the
whole process, from /proc) over each phase divided by its requests is the CPU per request; the load
generator runs on the same machine, so on a small machine publishes/s is bounded by both.

    python bench/api_throughput.py --connections 8 --depth 16 --requests 20000 --runs 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.loadclient import ServerProcess
from hubbub.api import Client
from tests.servers import spawn_server

KEY = "bench-api-key-" + "k" * 24


def request_bytes(room: str, n: int) -> bytes:
    body = json.dumps({"room": room, "data": {"n": n, "text": "hello from the backend"}}).encode()
    return (f"POST /api/publish HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


async def read_answer(reader: asyncio.StreamReader) -> bytes:
    """One HTTP answer's body (it must be 200)."""
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200 "):
        raise RuntimeError(f"unexpected answer: {head[:200]!r}")
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    body = await reader.readexactly(length)
    if b'"id"' not in body:
        raise RuntimeError(f"no id in {body!r}")
    return body


async def connection(host: str, port: int, room: str, count: int, depth: int) -> None:
    """``count`` publishes on one kept-alive connection, ``depth`` in flight (1: sequential)."""
    reader, writer = await asyncio.open_connection(host, port)
    sent = received = 0
    try:
        while received < count:
            burst = min(depth - (sent - received), count - sent)
            if burst > 0:
                writer.write(b"".join(request_bytes(room, sent + i) for i in range(burst)))
                sent += burst
            await read_answer(reader)
            received += 1
    finally:
        writer.close()


@dataclass
class Figure:
    name: str
    requests: int
    seconds: float
    cpu_seconds: float

    def line(self) -> str:
        return (f"{self.name:<44} {self.requests / self.seconds:>9,.0f} publishes/s   "
                f"server CPU {self.cpu_seconds / self.requests * 1e6:>6.0f} µs/request")


def measure(name: str, server: ServerProcess, requests: int, work: object) -> Figure:
    user0, sys0 = server.cpu()
    started = time.perf_counter()
    work()  # type: ignore[operator]
    seconds = time.perf_counter() - started
    user1, sys1 = server.cpu()
    return Figure(name, requests, seconds, (user1 - user0) + (sys1 - sys0))


def run_once(host: str, port: int, server: ServerProcess, args: argparse.Namespace, round_: int) -> list[Figure]:
    n, c = args.requests, args.connections
    per = n // c

    def asyncio_phase(depth: int) -> None:
        async def all_of_them() -> None:
            await asyncio.gather(*(connection(host, port, f"bench-{round_}-{depth}-{i}", per, depth)
                                   for i in range(c)))
        asyncio.run(all_of_them())

    figures = [
        measure(f"sequential, {c} connections", server, per * c, lambda: asyncio_phase(1)),
        measure(f"pipelined, {c} connections x {args.depth} in flight", server, per * c,
                lambda: asyncio_phase(args.depth)),
    ]
    api = Client(f"http://{host}:{port}", KEY)
    small = max(1, n // 10)
    figures.append(measure("hubbub.api.Client, 1 thread (keep-alive)", server, small,
                           lambda: [api.publish(f"bench-{round_}-client", i) for i in range(small)]))
    api.close()

    def with_urllib() -> None:
        body = json.dumps({"room": f"bench-{round_}-urllib", "data": 1}).encode()
        for _ in range(small):
            req = urllib.request.Request(f"http://{host}:{port}/api/publish", data=body, method="POST",
                                         headers={"Authorization": f"Bearer {KEY}",
                                                  "Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=10) as answer:
                answer.read()

    figures.append(measure("urllib.request, 1 thread (a connection each)", server, small, with_urllib))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--depth", type=int, default=16, help="requests in flight per connection when pipelined")
    parser.add_argument("--requests", type=int, default=20000, help="publishes per asyncio phase")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--store", default=None, help="the server's --store (default: SQLite in a temporary file)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = args.store or f"sqlite:///{Path(tmp) / 'api.db'}"
        with spawn_server("--api-key", KEY, "--store", store) as running:
            server = ServerProcess(running.process.pid)
            print(f"hubbub at {running.http}, store {store}, {args.requests} publishes per asyncio phase")
            for round_ in range(args.runs):
                print(f"run {round_ + 1}:")
                for figure in run_once(running.host, running.port, server, args, round_):
                    print("  " + figure.line())


if __name__ == "__main__":
    main()
