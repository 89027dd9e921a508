"""What TLS costs hubbub: handshakes/s and deliveries/s with and without ``--tls-cert``, side by side.

Starts two ``server.py`` processes with the same flags, one plain and one with a throwaway certificate
(``trustme``, made at run time: an ECDSA P-256 key by default, ``--key-type rsa`` for RSA-2048), then, in
each round, runs the same two workloads against both, alternating which goes first:

- *handshakes*: ``--handshakes`` connections opened ``--in-flight`` at a time, each a TCP connect, (on
  the TLS side) a full TLS 1.3 handshake with certificate verification, and the WebSocket upgrade, then
  all closed. Handshakes/s over the opening, and the server's CPU per handshake.
- *deliveries*: ``bench/scaleout.py``'s local phase on one server: ``--publishers`` publishers and
  ``--subscribers`` subscribers in one room, every publisher sending ``--messages`` messages at once;
  messages/s and deliveries/s from the first send to the last delivery, the server's CPU per delivery,
  and every message checked to have arrived once and in order.

The clients are the race's lean asyncio Protocols on uvloop (``bench.loadclient``); on the TLS side
uvloop's TLS layer encrypts and decrypts for them. The server's CPU (user + sys, /proc) is the figure
to trust on a shared machine; rates also depend on the client, which pays for TLS too.

    python bench/tls_cost.py --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.loadclient import Conn, Run, raise_fd_limit
from bench.scaleout import phase

ROOT = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"hubbub listening on (wss?)://([^:]+):(\d+)")
C = TypeVar("C", bound=Conn)


class TLSRun(Run):
    """A ``Run`` whose connections go through ``context`` (None: plain TCP)."""

    def __init__(self, url: str, pid: int, context: ssl.SSLContext | None) -> None:
        super().__init__(url, pid)
        self.context = context

    async def open(self, make: Callable[[int], C], count: int, in_flight: int, timeout: float = 15.0) -> list[C]:
        conns: list[C] = []
        indices = iter(range(count))

        async def worker() -> None:
            for i in indices:
                conn = make(i)
                self.conns.append(conn)
                await self.loop.create_connection(
                    lambda conn=conn: conn, self.host, self.port, ssl=self.context,
                    server_hostname="localhost" if self.context else None,
                )
                await asyncio.wait_for(conn.opened, timeout)
                conns.append(conn)

        async with asyncio.TaskGroup() as group:
            for _ in range(min(in_flight, count)):
                group.create_task(worker())
        conns.sort(key=lambda conn: conn.index)
        return conns


@contextmanager
def spawn(*flags: str) -> Iterator[tuple[int, int]]:
    """``python server.py --port 0 FLAGS`` until the block ends: (port, pid)."""
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "server.py"), "--port", "0", *flags], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    found: list[int] = []
    ready = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            if (match := LISTENING.search(line)) and not found:
                found.append(int(match.group(3)))
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not ready.wait(20) or not found:
            raise RuntimeError("server did not start")
        yield found[0], process.pid
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def handshakes(run: TLSRun, count: int, in_flight: int) -> dict[str, float]:
    before = sum(run.server.cpu())
    started = time.perf_counter()
    conns = await run.open(lambda i: Conn(run, i, f"/chat/hs{i % 100}?user=h{i}"), count, in_flight)
    elapsed = time.perf_counter() - started
    cpu = sum(run.server.cpu()) - before
    await run.close(conns)
    if run.errors or run.unexpected_closes:
        raise AssertionError(f"handshake failures: {run.errors} {dict(run.unexpected_closes)}")
    return {"handshakes_per_s": count / elapsed, "us_per_handshake": cpu / count * 1e6}


async def measure(args: argparse.Namespace, port: int, pid: int, context: ssl.SSLContext | None) -> dict[str, Any]:
    shake = await handshakes(TLSRun(f"ws://127.0.0.1:{port}", pid, context), args.handshakes, args.in_flight)
    run = TLSRun(f"ws://127.0.0.1:{port}", pid, context)
    flow = await phase(args, run, run, run.server, {"server": run.server})
    if run.errors or run.unexpected_closes:
        raise AssertionError(f"client failures: {run.errors} {dict(run.unexpected_closes)}")
    return {**shake, "messages_per_s": flow["messages_per_s"], "deliveries_per_s": flow["deliveries_per_s"],
            "us_per_delivery": flow["us_per_delivery"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each measuring both servers")
    parser.add_argument("--handshakes", type=int, default=2000)
    parser.add_argument("--in-flight", type=int, default=32, help="handshakes at a time")
    parser.add_argument("--publishers", type=int, default=4)
    parser.add_argument("--subscribers", type=int, default=10)
    parser.add_argument("--messages", type=int, default=5000, help="per publisher")
    parser.add_argument("--size", type=int, default=64, help="characters of text per message")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds the delivery phase may take")
    parser.add_argument("--key-type", choices=["ec", "rsa"], default="ec", help="the certificate's key")
    parser.add_argument("--json", action="store_true", help="print each round's figures as one JSON line too")
    args = parser.parse_args()
    raise_fd_limit()
    import trustme

    ca = trustme.CA(key_type=trustme.KeyType.ECDSA if args.key_type == "ec" else trustme.KeyType.RSA)
    issued = ca.issue_cert("localhost", "127.0.0.1")
    context = ssl.create_default_context()
    ca.configure_trust(context)
    flags = ["--store", "memory", "--broker", "memory", "--rate-limit", "0", "--max-buffer", str(256 * 1024 * 1024),
             "--log-level", "warning", "--no-compression", "--max-connections", "100000",
             "--max-connections-per-address", "0"]
    rows: dict[str, list[dict[str, Any]]] = {"plain": [], "tls": []}
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
        issued.private_key_pem.write_to_path(str(key))
        with spawn(*flags) as plain, spawn(*flags, "--tls-cert", str(cert), "--tls-key", str(key)) as tls:
            for n in range(1, args.rounds + 1):
                order = [("plain", plain, None), ("tls", tls, context)]
                if n % 2 == 0:
                    order.reverse()
                got = {name: uvloop.run(measure(args, port, pid, ctx)) for name, (port, pid), ctx in order}
                for name in rows:
                    rows[name].append(got[name])
                p, t = got["plain"], got["tls"]
                print(
                    f"round {n}: handshakes/s plain {p['handshakes_per_s']:,.0f}, TLS {t['handshakes_per_s']:,.0f} "
                    f"(x{t['handshakes_per_s'] / p['handshakes_per_s']:.2f}); server CPU per handshake "
                    f"{p['us_per_handshake']:.0f} us, {t['us_per_handshake']:.0f} us "
                    f"(x{t['us_per_handshake'] / p['us_per_handshake']:.2f}); deliveries/s plain "
                    f"{p['deliveries_per_s']:,.0f}, TLS {t['deliveries_per_s']:,.0f} "
                    f"(x{t['deliveries_per_s'] / p['deliveries_per_s']:.2f}); server CPU per delivery "
                    f"{p['us_per_delivery']:.2f} us, {t['us_per_delivery']:.2f} us "
                    f"(x{t['us_per_delivery'] / p['us_per_delivery']:.2f}); every message once and in order",
                    flush=True,
                )
                if args.json:
                    print(json.dumps({"round": n, "key_type": args.key_type, **got}), flush=True)
    keys = ["handshakes_per_s", "us_per_handshake", "deliveries_per_s", "us_per_delivery"]
    ratios = {k: statistics.median(t[k] / p[k] for p, t in zip(rows["plain"], rows["tls"], strict=True)) for k in keys}
    print("median TLS/plain ratio over the rounds: " + ", ".join(f"{k} x{v:.2f}" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
