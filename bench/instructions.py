"""Instructions per message on the core's hot paths, counted by valgrind (callgrind), not timed.

A shared machine makes every timing noisy; an instruction count is the same on every run of the same
code, whatever else the machine is doing, so it shows what a change to the hot path is worth to a few
percent (``tests/`` and the race stay the word on speed; this is the profiler's ruler)::

    python -m bench.instructions                       # every variant, ~4 minutes
    python -m bench.instructions --variants receive-orjson,receive-json --passes 100

Each variant runs twice under callgrind, for ``passes`` and twice as many loop passes, and the difference
is divided by the extra messages: start-up and imports cancel out. A pass is what the shell does with
one read: 64 pipelined 64-byte chat messages from one member of a room of 3 go into ``Server.receive``,
then the effects are carried out by the real ``Backends`` (the memory store writes the batch and acks
every message) and the output is taken as the shell takes it.

Variants:

- ``receive-orjson``: as ``hubbub`` runs (orjson, the receive fast path unmasking with websockets' C
  ``apply_mask``).
- ``receive-json``: the standard library's json instead (the core's default codec).
- ``receive-wsproto``: orjson, every frame through wsproto (``Server(fast_path=False)``).
- ``handshake``: one upgrade and its close per pass (the unit is a handshake).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
from typing import Any

MESSAGES_PER_PASS = 64
VARIANTS = ("receive-orjson", "receive-json", "receive-wsproto", "handshake")
NOW = 1_700_000_000.0


def _frame(payload: bytes) -> bytes:
    """A masked client text frame (the key is fixed: the count must not depend on chance)."""
    key = b"\x11\x22\x33\x44"
    n = len(payload)
    head = bytes((0x81, 0x80 | n)) if n < 126 else bytes((0x81, 0x80 | 126)) + n.to_bytes(2, "big")
    mask = (key * (n // 4 + 1))[:n]
    return head + key + bytes(a ^ b for a, b in zip(payload, mask, strict=True))


def _request(target: str) -> bytes:
    return (
        f"GET {target} HTTP/1.1\r\nHost: localhost:8765\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def run_inner(variant: str, passes: int) -> int:
    """The measured loop, in this process: ``passes`` passes of ``variant``; returns the units done."""
    import anyio

    from hubbub import core
    from hubbub.backends.broker import MemoryBroker
    from hubbub.backends.store import MemoryStore
    from hubbub.handlers import build_router
    from hubbub.server import ORJSON, UNMASK, Backends

    config = core.Config(rate_limit=0, ping_interval=0, max_connections_per_address=0)
    if variant != "receive-json":
        config = dataclasses.replace(config, codec=ORJSON)
    server = core.Server(build_router(config), config, fast_path=variant != "receive-wsproto", unmask=UNMASK)
    done = 0

    async def main() -> None:
        nonlocal done
        backends = Backends(server, MemoryStore(), MemoryBroker(config.node), lambda: None)

        def flush() -> None:
            backends.carry_out(server.effects())
            shared = server.take_shared()
            for conn in server.pending():
                conn.data_to_send()
            for _, members in shared:
                len(members)

        if variant == "handshake":
            request = _request("/chat/r?user=alice")
            for _ in range(passes):
                conn = server.connect(("10.0.0.1", 1), NOW)
                server.receive(conn, request, NOW)
                flush()
                server.receive(conn, b"", NOW)
                flush()
                done += 1
            return
        members = []
        for i in range(3):
            conn = server.connect((f"10.0.0.{i}", 1), NOW)
            server.receive(conn, _request(f"/chat/r?user=u{i}"), NOW)
            members.append(conn)
        flush()
        text = "small room chat line, sixty-four bytes long: {:>019d}"
        data = b"".join(
            _frame(b'{"event":"message","text":"%s","ref":%d}' % (text.format(i).encode(), i))
            for i in range(MESSAGES_PER_PASS)
        )
        for _ in range(passes):
            server.receive(members[0], data, NOW)
            flush()
            done += MESSAGES_PER_PASS

    anyio.run(main)
    return done


def count(variant: str, passes: int) -> int:
    """Instructions callgrind counts for a whole run of ``variant`` with ``passes`` passes."""
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
               sys.executable, "-m", "bench.instructions", "--inner", variant, str(passes)]
    run = subprocess.run(command, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    found = re.search(r"Collected : (\d+)", run.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count from callgrind:\n{run.stderr[-2000:]}")
    return int(found.group(1))


def per_unit(variant: str, passes: int) -> float:
    units = MESSAGES_PER_PASS if variant != "handshake" else 1
    return (count(variant, 2 * passes) - count(variant, passes)) / (passes * units)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    parser.add_argument("--passes", type=int, default=100, help="loop passes of the shorter run")
    parser.add_argument("--inner", nargs=2, metavar=("VARIANT", "PASSES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inner:
        run_inner(args.inner[0], int(args.inner[1]))
        return 0
    if shutil.which("valgrind") is None:
        parser.error("valgrind is needed (apt-get install valgrind)")
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant: {', '.join(unknown)}")
    results: dict[str, Any] = {}
    for variant in chosen:
        results[variant] = per_unit(variant, args.passes)
        unit = "handshake" if variant == "handshake" else "message"
        print(f"{variant:18s} {results[variant]:>10,.0f} instructions per {unit}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
