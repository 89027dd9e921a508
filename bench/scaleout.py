"""Messages per second between two hubbub instances through a broker (Redis by default), and what a
delivery costs the receiving instance against a local one.

Starts two ``server.py`` processes sharing the broker. Each run has two phases, each in a room of its own:

- *local*: publishers and subscribers all on A. A's CPU (user + sys, from /proc) over the phase, divided
  by A's deliveries (every subscriber and every other publisher gets each message), is the CPU of a
  **local delivery**: a message read from a client, acked, stored, published, and fanned out.
- *remote*: publishers on A, the same number of subscribers on B. B's CPU divided by B's deliveries is
  the CPU of a **delivery through the broker**: a batch envelope read and decoded, each message
  sequence-checked, stored, and fanned out. Messages per second through the broker is the phase's
  message count over its wall time, from the first send to the last subscriber's last message.

Every subscriber must get every message exactly once and in each publisher's order (checked after each
phase from everything it received), or the run fails. The clients are lean asyncio Protocols on uvloop
(``bench.loadclient``'s handshake and marker; a read costs one ``bytes.count``), so that the client, not
the servers, is not what is measured: a library client parses every frame in Python, which at 50,000
messages/s to 10 subscribers is more than a core.

    python bench/scaleout.py --broker redis://127.0.0.1:6379/0 --publishers 4 --subscribers 10 --messages 5000 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.loadclient import CARRY, MARKER, Conn, Run, ServerProcess, client_frame, raise_fd_limit
from tests.servers import spawn_server

SEQ_DIGITS = 9
TAGGED = re.compile(re.escape(MARKER) + rb"(\d{3})(\d{%d})" % SEQ_DIGITS)
ACK = b'"event":"ack"'
ACK_CARRY = len(ACK) - 1


def message_frame(publisher: int, seq: int, size: int) -> bytes:
    """Publisher ``publisher``'s message ``seq``: the marker, both numbers, padding to ``size`` characters."""
    text = MARKER + b"%03d%0*d" % (publisher, SEQ_DIGITS, seq)
    text += b"_" * max(0, size - len(text))
    return client_frame(b'{"event":"message","text":"%s","ref":%d}' % (text, seq))


class Member(Conn):
    """A room member that counts the markers it receives (one ``bytes.count`` a read, as the race's client)
    and keeps every read, to check once the phase is over that each message came once and in order."""

    def __init__(self, run: Run, index: int, path: str, expected: int) -> None:
        super().__init__(run, index, path)
        self.expected = expected
        self.count = 0
        self.acks = 0
        self.tail = b""
        self.ack_tail = b""
        self.reads: list[bytes] = []
        self.done: asyncio.Future[None] = run.loop.create_future()

    def data_received(self, data: bytes) -> None:
        if not self.joined or self.closing:
            Conn.data_received(self, data)  # the upgrade, the join barrier, the closing handshake
            return
        # a marker (or ack) split between two reads is in the edge: the last read's tail and this one's head
        self.count += data.count(MARKER) + (self.tail + data[:CARRY]).count(MARKER)
        self.acks += data.count(ACK) + (self.ack_tail + data[:ACK_CARRY]).count(ACK)
        self.tail = (self.tail + data)[-CARRY:] if len(data) < CARRY else data[-CARRY:]
        self.ack_tail = (self.ack_tail + data)[-ACK_CARRY:] if len(data) < ACK_CARRY else data[-ACK_CARRY:]
        self.reads.append(data)
        if self.count >= self.expected and not self.done.done():
            self.done.set_result(None)

    def frames(self, data: bytes) -> None:
        if self.joined:
            self.watch_close(data)
        elif rest := self.past_barrier(data):
            self.data_received(rest)

    def check(self, publishers: dict[int, int], skip: int | None = None) -> None:
        """Every message of every publisher but ``skip`` (itself), once, in order; nothing else."""
        seen: dict[int, list[int]] = {}
        for publisher, seq in TAGGED.findall(b"".join(self.reads)):
            seen.setdefault(int(publisher), []).append(int(seq))
        want = {p: list(range(n)) for p, n in publishers.items() if p != skip}
        if seen != want:
            for p, seqs in want.items():
                got = seen.get(p, [])
                if got != seqs:
                    raise AssertionError(
                        f"member {self.index}: publisher {p}'s messages arrived {len(got)} of {len(seqs)}, "
                        f"{len(set(got))} distinct, {'in' if got == sorted(got) else 'out of'} order"
                    )
            raise AssertionError(f"member {self.index}: messages from unknown publishers {set(seen) - set(want)}")


async def phase(args: argparse.Namespace, pub_run: Run, sub_run: Run, measured: ServerProcess,
                servers: dict[str, ServerProcess]) -> dict[str, Any]:
    """Publishers on ``pub_run``'s server, subscribers on ``sub_run``'s; ``measured``'s CPU per delivery, and
    every server's (and this client's) CPU utilisation over the phase."""
    room = f"bench-{uuid.uuid4().hex[:8]}"
    total = args.publishers * args.messages
    pubs = await pub_run.open(
        lambda i: Member(pub_run, i, f"/chat/{room}?user=p{i}", (args.publishers - 1) * args.messages),
        args.publishers, 16,
    )
    subs = await sub_run.open(lambda i: Member(sub_run, 100 + i, f"/chat/{room}?user=s{i}", total),
                              args.subscribers, 16)
    await pub_run.barrier([[pubs[0], *pubs[1:], *subs]], timeout=20)  # B hears A through the broker, too
    await asyncio.sleep(0.3)  # the last probes arrive before the counting starts
    frames = [b"".join(message_frame(p, n, args.size) for n in range(args.messages)) for p in range(args.publishers)]
    cpu_before = sum(measured.cpu())
    others_before = {name: sum(p.cpu()) for name, p in servers.items()}
    own_before = sum(os.times()[:2])
    started = time.perf_counter()
    for pub, data in zip(pubs, frames, strict=True):
        pub.send(data)
    members = subs + pubs[1:] if args.publishers > 1 else subs
    try:
        await asyncio.wait_for(asyncio.gather(*(m.done for m in members)), args.timeout)
    except TimeoutError:
        short = [(m.index, m.count, m.expected) for m in members if m.count < m.expected]
        raise AssertionError(f"not every message arrived within {args.timeout} s: {short[:5]}") from None
    elapsed = time.perf_counter() - started
    cpu = sum(measured.cpu()) - cpu_before
    utilisation = {name: round((sum(p.cpu()) - others_before[name]) / elapsed, 2) for name, p in servers.items()}
    utilisation["client"] = round((sum(os.times()[:2]) - own_before) / elapsed, 2)
    deadline = time.monotonic() + args.timeout
    while any(p.acks < args.messages for p in pubs) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    counts = {p: args.messages for p in range(args.publishers)}
    for sub in subs:
        sub.check(counts)
    for p, pub in enumerate(pubs):
        pub.check(counts, skip=p)
        assert pub.acks == args.messages, f"publisher {p}: {pub.acks} acks of {args.messages}"
    same = pub_run is sub_run
    deliveries = total * args.subscribers + (total - args.messages) * args.publishers * same
    await pub_run.close(pubs)
    await sub_run.close(subs)
    return {
        "seconds": elapsed,
        "messages_per_s": total / elapsed,
        "deliveries": deliveries,
        "deliveries_per_s": deliveries / elapsed,
        "server_cpu_s": cpu,
        "us_per_delivery": cpu / deliveries * 1e6,
        "cpu_utilisation": utilisation,
    }


async def run(args: argparse.Namespace, a: tuple[str, int], b: tuple[str, int]) -> dict[str, Any]:
    run_a, run_b = Run(a[0], a[1]), Run(b[0], b[1])
    servers = {"A": run_a.server, "B": run_b.server}
    if args.broker_pid:
        servers["broker"] = ServerProcess(args.broker_pid)
    local = await phase(args, run_a, run_a, run_a.server, servers)
    remote = await phase(args, run_a, run_b, run_b.server, servers)
    for r in (run_a, run_b):
        if r.errors or r.unexpected_closes:
            raise AssertionError(f"client failures: {r.errors} {dict(r.unexpected_closes)}")
    return {"local": local, "remote": remote, "ratio": remote["us_per_delivery"] / local["us_per_delivery"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--store", default="memory", help="the instances' --store (memory isolates the broker)")
    parser.add_argument("--publishers", type=int, default=4)
    parser.add_argument("--subscribers", type=int, default=10)
    parser.add_argument("--messages", type=int, default=5000, help="per publisher")
    parser.add_argument("--size", type=int, default=64, help="characters of text per message")
    parser.add_argument("--runs", type=int, default=1, help="runs, each with a fresh pair of servers")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a phase may take")
    parser.add_argument("--json", action="store_true", help="print each run's figures as one JSON line too")
    parser.add_argument("--broker-pid", type=int, default=None,
                        help="the broker's process, to report its CPU utilisation too (redis-server's pid, say)")
    args = parser.parse_args()
    if not 1 <= args.publishers <= 999:
        parser.error("--publishers must be 1 to 999")
    raise_fd_limit()
    for n in range(1, args.runs + 1):
        channel = f"bench-{uuid.uuid4().hex[:8]}"
        flags = ["--broker", args.broker, "--broker-channel", channel, "--store", args.store, "--rate-limit", "0",
                 "--max-buffer", str(256 * 1024 * 1024), "--log-level", "warning", "--no-compression"]
        with ExitStack() as stack:
            a = stack.enter_context(spawn_server(*flags))
            b = stack.enter_context(spawn_server(*flags))
            result = uvloop.run(run(args, (a.url, a.process.pid), (b.url, b.process.pid)))
        local, remote = result["local"], result["remote"]
        print(
            f"run {n}: {args.publishers} publishers on A -> {args.subscribers} subscribers on B via "
            f"{args.broker.split(':')[0]}, {args.publishers * args.messages} messages of {args.size} chars, "
            f"store {args.store}: {remote['messages_per_s']:,.0f} messages/s through the broker, "
            f"{remote['deliveries_per_s']:,.0f} deliveries/s on B ({remote['seconds']:.2f} s); "
            f"CPU per delivery: B (through the broker) {remote['us_per_delivery']:.2f} us, "
            f"A (local, {local['messages_per_s']:,.0f} messages/s) {local['us_per_delivery']:.2f} us, "
            f"ratio {result['ratio']:.2f}; every message once and in order; CPU utilisation (cores) local "
            f"{local['cpu_utilisation']}, remote {remote['cpu_utilisation']}",
            flush=True,
        )
        if args.json:
            print(json.dumps({"run": n, "args": vars(args), **result}), flush=True)


if __name__ == "__main__":
    main()
