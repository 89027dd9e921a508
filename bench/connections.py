"""The scale test of ``--workers``: tens of thousands of idle connections over several workers, one
message to a room of 1,000 spread over them, RSS per connection, and a worker killed with SIGKILL mid-run.

    python bench/connections.py --connections 40000 --workers 3 --generators 4

What it does, in order (it exits 1 and says why when a check fails):

1. Starts ``python -m hubbub --workers W`` (memory store, the embedded NATS broker, ``--metrics-port``)
   and reads each worker's pid and RSS from the parent's ``/healthz`` and ``/proc``.
2. Starts ``--generators`` load-generator processes (this file with ``--generator``), each opening its
   share of the connections from its own loopback source address (127.0.0.1, .2, ...: one ephemeral
   port range per address) and under the 20,000-descriptor cap of a process. Every connection is in
   a room: ``--big`` of them (spread evenly over the generators, and by the kernel's SO_REUSEPORT hash
   over the workers) in the room ``big``, the others in rooms of ``--room-size``. The clients are lean
   asyncio Protocols on uvloop that parse every frame, answer the server's pings (so they stay
   connected at the default ``--ping-interval``) and keep the numbers of the messages they get.
3. Once every connection is open (the parent's ``/healthz`` counts them): each worker's RSS again,
   and RSS per connection.
4. One message to ``big`` from a member of it: every other member must get it once.
5. A sender in ``big`` sends ``--paced`` messages at ``--rate`` per second; ``--kill-after`` seconds in,
   one worker that is not the sender's gets SIGKILL. Its clients see their connections go and
   reconnect (after 1-3 s, then with backoff while refused: the same room, the same user); the parent
   restarts the worker. Checks: the worker is back (a new pid), every connection is open again, every
   member of ``big`` that was never disconnected got every paced message once and in order, no
   connection of the surviving workers was closed, and after the reconnections one more message to
   ``big`` reaches every other member, the reconnected ones included.

The figures are printed as one line each, and with ``--json`` as one JSON object at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.loadclient import GUID, client_frame, raise_fd_limit

ROOT = Path(__file__).resolve().parent.parent
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux 4.2
TAG = re.compile(rb'"text":"([A-Z])(\d+)"')


# -- the load generator (one process, one source address) ---------------------------------------


class Idle(asyncio.Protocol):
    """One client: the upgrade, then every frame parsed; pings answered; tagged messages recorded."""

    def __init__(self, gen: Generator, index: int, room: str) -> None:
        self.gen = gen
        self.index = index
        self.room = room
        self.transport: asyncio.Transport | None = None
        self.key = base64.b64encode(os.urandom(16))
        self.opened: asyncio.Future[None] = gen.loop.create_future()
        self.open = False
        self.closing = False
        self.buf = b""
        self.seen: dict[str, list[int]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        path = f"/chat/{self.room}?user=g{self.gen.index}c{self.index}"
        transport.write(  # type: ignore[attr-defined]
            b"GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (path.encode(), self.gen.port, self.key)
        )

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.open:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buf = self.buf[:end], self.buf[end + 4 :]
            accept = base64.b64encode(hashlib.sha1(self.key + GUID).digest())
            if not head.startswith(b"HTTP/1.1 101") or accept not in head:
                status = head.split(b"\r\n", 1)[0].decode(errors="replace")
                if not self.opened.done():
                    self.opened.set_exception(ConnectionError(status))
                    self.opened.exception()
                self.closing = True
                self.abort()
                return
            self.open = True
            if not self.opened.done():
                self.opened.set_result(None)
        self.frames()

    def frames(self) -> None:
        buf = self.buf
        at = 0
        while len(buf) - at >= 2:
            opcode, size = buf[at] & 0x0F, buf[at + 1] & 0x7F
            start = at + 2
            if size == 126:
                if len(buf) - at < 4:
                    break
                size, start = int.from_bytes(buf[at + 2 : at + 4], "big"), at + 4
            elif size == 127:
                if len(buf) - at < 10:
                    break
                size, start = int.from_bytes(buf[at + 2 : at + 10], "big"), at + 10
            if len(buf) - start < size:
                break
            payload = buf[start : start + size]
            at = start + size
            if opcode == 0x1:
                if (match := TAG.search(payload)) is not None:
                    self.seen.setdefault(match.group(1).decode(), []).append(int(match.group(2)))
            elif opcode == 0x9:
                self.send(client_frame(payload, 0xA))
            elif opcode == 0x8:
                if not self.closing:
                    self.gen.closed_by_server += 1
                    self.closing = True
                    self.send(client_frame(payload[:2], 0x8))
        self.buf = buf[at:]

    def send(self, frame: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"lost during the handshake ({exc})"))
            self.opened.exception()
        if self.open and not self.gen.stopping:
            self.gen.lost(self)
        self.open = False


class Generator:
    """``count`` connections from ``source``; commands on stdin, answers on stdout (JSON lines)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.loop = asyncio.get_running_loop()
        self.index = args.index
        self.port = args.port
        self.source = args.source
        self.conns: list[Idle | None] = [None] * args.count
        self.rooms = [self.room_of(i, args) for i in range(args.count)]
        self.in_flight = args.in_flight
        self.stopping = False
        self.closed_by_server = 0
        self.dropped: set[int] = set()  # connections that were lost at least once
        self.reconnecting: set[int] = set()
        self.reconnects = 0
        self.gave_up = 0  # reconnections abandoned after every attempt failed
        self.refusals = 0
        self.sender: Idle | None = None

    def room_of(self, i: int, args: argparse.Namespace) -> str:
        if i < args.big:
            return "big"
        return f"r{args.index}-{(i - args.big) // args.room_size}"

    async def connect(self, i: int, attempts: int = 50) -> Idle:
        delay = 0.5
        for attempt in range(attempts):
            conn = Idle(self, i, self.rooms[i])
            try:
                await self.open(conn)
                await asyncio.wait_for(conn.opened, 30)
            except (OSError, ConnectionError, TimeoutError):
                conn.abort()
                self.refusals += 1
                if attempt == attempts - 1:
                    raise
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 5.0)
                continue
            self.conns[i] = conn
            return conn
        raise AssertionError("unreachable")

    async def open(self, conn: Idle) -> None:
        """Connect ``conn`` from our source address. The port is chosen at connect time
        (IP_BIND_ADDRESS_NO_PORT), not at bind: bind would hand a retry the port it just freed, and the
        same address pair hashes to the same worker (SO_REUSEPORT) that just refused it, every time."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((self.source, 0))
            sock.setblocking(False)
            await self.loop.sock_connect(sock, ("127.0.0.1", self.port))
            await self.loop.create_connection(lambda: conn, sock=sock)
        except BaseException:
            sock.close()
            raise

    async def connect_all(self) -> float:
        started = time.perf_counter()
        indices = iter(range(len(self.conns)))

        async def worker() -> None:
            for i in indices:
                await self.connect(i)

        async with asyncio.TaskGroup() as group:
            for _ in range(self.in_flight):
                group.create_task(worker())
        return time.perf_counter() - started

    def lost(self, conn: Idle) -> None:
        """A connection went (its worker died): reconnect it after 1-3 s, as a browser client would."""
        if self.conns[conn.index] is not conn:
            return
        self.conns[conn.index] = None
        self.dropped.add(conn.index)
        self.reconnecting.add(conn.index)

        async def again() -> None:
            await asyncio.sleep(1 + 2 * random.random())
            try:
                await self.connect(conn.index)
                self.reconnects += 1
            except (OSError, ConnectionError, TimeoutError):
                self.gave_up += 1
            finally:
                self.reconnecting.discard(conn.index)

        self.loop.create_task(again())

    def open_count(self) -> int:
        return sum(conn is not None and conn.open for conn in self.conns)

    def big_members(self) -> list[tuple[int, Idle]]:
        return [(i, c) for i, c in enumerate(self.conns) if self.rooms[i] == "big" and c is not None and c.open]

    async def pace(self, tag: str, count: int, rate: float) -> None:
        assert self.sender is not None
        start = time.perf_counter()
        for n in range(count):
            self.sender.send(client_frame(b'{"event":"message","text":"%s%d"}' % (tag.encode(), n)))
            await asyncio.sleep(max(0.0, start + (n + 1) / rate - time.perf_counter()))

    def report(self, tag: str, expect: int) -> dict[str, Any]:
        """For the members of ``big`` (the sender excluded): how many got ``tag``'s 0..expect-1 exactly,
        split by never dropped and dropped (and now back)."""
        kept_ok = kept_bad = back_ok = back_bad = 0
        problems: list[str] = []
        want = list(range(expect))
        for i, conn in enumerate(self.conns):
            if self.rooms[i] != "big" or conn is None or conn is self.sender:
                continue
            got = conn.seen.get(tag, [])
            if i in self.dropped:
                if conn.open and got == want[len(want) - len(got) :] and (expect == 0 or got[-1:] == [expect - 1]):
                    back_ok += 1  # a reconnected member: what it got since it is back, in order, up to the last
                else:
                    back_bad += 1
            elif got == want:
                kept_ok += 1
            else:
                kept_bad += 1
                if len(problems) < 3:
                    problems.append(f"conn {i}: {len(got)} of {expect}, {len(set(got))} distinct, "
                                    f"{'in' if got == sorted(got) else 'out of'} order")
        return {"kept_ok": kept_ok, "kept_bad": kept_bad, "back_ok": back_ok, "back_bad": back_bad,
                "problems": problems}

    async def serve(self) -> None:
        reader = asyncio.StreamReader()
        await self.loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            cmd = json.loads(line)
            op = cmd["op"]
            if op == "connect":
                seconds = await self.connect_all()
                out: dict[str, Any] = {"seconds": seconds, "open": self.open_count(), "refusals": self.refusals}
            elif op == "sender":  # a fresh member of big, to send from
                self.sender = Idle(self, -1, "big")
                await self.open(self.sender)
                await asyncio.wait_for(self.sender.opened, 30)
                out = {"ok": True}
            elif op == "send":
                await self.pace(cmd["tag"], cmd["count"], cmd["rate"])
                out = {"ok": True}
            elif op == "status":
                out = {"open": self.open_count(), "reconnecting": len(self.reconnecting), "dropped": len(self.dropped),
                       "reconnects": self.reconnects, "closed_by_server": self.closed_by_server,
                       "refusals": self.refusals, "gave_up": self.gave_up,
                       "sender_open": bool(self.sender and self.sender.open)}
            elif op == "report":
                out = self.report(cmd["tag"], cmd["count"])
            elif op == "stop":
                self.stopping = True
                for conn in [*self.conns, self.sender]:
                    if conn is not None:
                        conn.abort()
                out = {"ok": True}
            else:
                out = {"error": f"unknown op {op}"}
            sys.stdout.write(json.dumps(out) + "\n")
            sys.stdout.flush()
            if op == "stop":
                return


# -- the controller ------------------------------------------------------------------------------


class Child:
    """A load generator process, driven over its stdin and stdout."""

    def __init__(self, args: argparse.Namespace, index: int, count: int, big: int, port: int) -> None:
        self.index = index
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--generator", "--index", str(index), "--source", f"127.0.0.{index + 1}",
             "--port", str(port), "--count", str(count), "--big", str(big), "--room-size", str(args.room_size),
             "--in-flight", str(args.in_flight)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )

    def ask(self, op: str, **params: Any) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"op": op, **params}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"generator {self.index} exited ({self.process.poll()})")
        return json.loads(line)


def get(url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:  # 503 while a worker is down: the body still has the counts
        return json.loads(exc.read())


def counts(url: str, timeout: float = 60) -> dict[int, int]:
    """Each worker's open connections, from the parent's /healthz: asked again while a worker's answer is
    missing (the parent gives each 2 s; a worker busy with a storm of presence heartbeats can take longer)."""
    deadline = time.monotonic() + timeout
    while True:
        workers = get(url)["workers"]
        if all("connections" in w for w in workers):
            return {w["worker"]: w["connections"] for w in workers}
        if time.monotonic() > deadline:
            raise AssertionError(f"a worker's /healthz did not answer within {timeout:.0f} s: {workers}")
        time.sleep(0.25)


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise KeyError(pid)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for(what: str, check: Any, timeout: float, every: float = 0.25) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)
    return time.monotonic() - started


def controller(args: argparse.Namespace) -> int:
    port = args.port
    metrics = args.metrics_port
    cmd = [sys.executable, "-m", "hubbub", "--workers", str(args.workers), "--port", str(port), "--store", "memory",
           "--metrics-port", str(metrics), "--max-connections", str(args.max_connections_per_worker),
           "--max-connections-per-address", "0", "--rate-limit", "0", "--log-level", "warning"]
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    figures: dict[str, Any] = {"connections": args.connections, "workers": args.workers,
                               "generators": args.generators, "big": args.big}
    children: list[Child] = []
    health = f"http://127.0.0.1:{metrics}/healthz"

    def say(text: str) -> None:
        print(text, flush=True)

    log: list[str] = []  # the server's output, read to the end all along (a full pipe would stall its loops)
    listening = threading.Event()

    def read() -> None:
        assert server.stdout is not None
        for line in server.stdout:
            log.append(line)
            if "listening on" in line:
                listening.set()
        listening.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not listening.wait(30) or server.poll() is not None:
            raise RuntimeError("the server did not start:\n" + "".join(log))
        wait_for("every worker up", lambda: get(health).get("status") == "ok", 30)
        workers = {w["worker"]: w["pid"] for w in get(health)["workers"]}
        time.sleep(1)
        empty = {n: rss_kb(pid) for n, pid in workers.items()}
        say(f"{args.workers} workers up (pids {list(workers.values())}), RSS empty "
            f"{', '.join(f'{kb / 1024:.1f}' for kb in empty.values())} MiB")

        per, rest = divmod(args.connections, args.generators)
        big_per, big_rest = divmod(args.big - 1, args.generators)  # the sender is the big room's last member
        for g in range(args.generators):
            children.append(Child(args, g, per + (g < rest), big_per + (g < big_rest), port))
        cpu_before = sum(cpu_s(pid) for pid in workers.values())
        started = time.perf_counter()
        for child in children:  # all connect at once: one command each, answers read in turn
            assert child.process.stdin is not None
            child.process.stdin.write(json.dumps({"op": "connect"}) + "\n")
            child.process.stdin.flush()
        answers = []
        for child in children:
            assert child.process.stdout is not None
            answers.append(json.loads(child.process.stdout.readline()))
        seconds = time.perf_counter() - started
        opened = sum(a["open"] for a in answers)
        assert opened == args.connections, f"{opened} of {args.connections} connections open"
        wait_for("the workers to count every connection",
                 lambda: get(health).get("connections") == args.connections, 60)
        connect_cpu = sum(cpu_s(pid) for pid in workers.values()) - cpu_before
        time.sleep(args.settle)
        spread = counts(health)
        full = {n: rss_kb(pid) for n, pid in workers.items()}
        idle_before = {n: cpu_s(pid) for n, pid in workers.items()}
        time.sleep(args.idle)  # nothing sent: what holding the connections costs (pings, presence heartbeats)
        idle = {n: round((cpu_s(pid) - idle_before[n]) / args.idle, 3) for n, pid in workers.items()}
        per_conn = (sum(full.values()) - sum(empty.values())) / args.connections
        figures.update(connect_s=round(seconds, 2), handshakes_per_s=round(args.connections / seconds),
                       refusals=sum(a["refusals"] for a in answers), spread=spread,
                       rss_empty_mib={n: round(kb / 1024, 1) for n, kb in empty.items()},
                       rss_full_mib={n: round(kb / 1024, 1) for n, kb in full.items()},
                       kib_per_connection=round(per_conn, 2),
                       worker_cpu_us_per_connect=round(connect_cpu / args.connections * 1e6),
                       idle_cpu_cores=idle)
        say(f"{opened:,} connections open in {seconds:.1f} s ({args.connections / seconds:,.0f}/s, "
            f"{figures['refusals']} retried), spread over the workers {spread}; RSS "
            f"{', '.join(f'{kb / 1024:.0f}' for kb in full.values())} MiB: {per_conn:.1f} KiB per connection; "
            f"the workers' CPU {connect_cpu / args.connections * 1e6:,.0f} us per connection opened, idle "
            f"afterwards {idle} cores over {args.idle:.0f} s")

        # one message to the room of big (its members spread over every worker)
        sender_gen = children[-1]
        before = counts(health)
        sender_gen.ask("sender")
        wait_for("the sender counted", lambda: get(health).get("connections") == args.connections + 1, 30)
        after = counts(health)
        sender_worker = next(n for n in after if after[n] == before[n] + 1)
        time.sleep(1)  # the sender's join reaches the other workers' members of big
        sender_gen.ask("send", tag="A", count=1, rate=100)
        reports: list[dict[str, Any]] = []

        def all_got_a() -> bool:
            reports[:] = [c.ask("report", tag="A", count=1) for c in children]
            return sum(r["kept_ok"] for r in reports) == args.big - 1

        try:
            took = wait_for("every member of big to get the message", all_got_a, 30)
        except AssertionError:
            raise AssertionError(f"one message to big: {reports}") from None
        figures.update(one_message_delivered=sum(r["kept_ok"] for r in reports), one_message_s=round(took, 2))
        say(f"one message to the room of {args.big} (members on every worker, sender on worker {sender_worker}): "
            f"{figures['one_message_delivered']} of {args.big - 1} delivered, once each")

        # a worker killed mid-run
        victim = max((n for n in spread if n != sender_worker), key=lambda n: spread[n])
        victim_pid = workers[victim]
        sending = [c for c in children if c is sender_gen]
        assert sending[0].process.stdin is not None
        sending[0].process.stdin.write(json.dumps({"op": "send", "tag": "B", "count": args.paced,
                                                   "rate": args.rate}) + "\n")
        sending[0].process.stdin.flush()
        time.sleep(args.kill_after)
        os.kill(victim_pid, signal.SIGKILL)
        killed = time.monotonic()
        say(f"worker {victim} (pid {victim_pid}, {spread[victim]:,} connections) killed with SIGKILL "
            f"{args.kill_after:.0f} s into {args.paced} messages at {args.rate:.0f}/s to big")

        def restarted() -> bool:
            w = next(w for w in get(health)["workers"] if w["worker"] == victim)
            return w["pid"] not in (None, victim_pid) and w["status"] == "ok"

        back_s = wait_for("the worker to be restarted", restarted, 60, every=0.05)
        assert sending[0].process.stdout is not None
        assert json.loads(sending[0].process.stdout.readline()).get("ok")  # the paced sending is over
        statuses: list[dict[str, Any]] = []

        def all_back() -> bool:
            statuses[:] = [c.ask("status") for c in children]
            if any(s["gave_up"] for s in statuses):
                raise AssertionError(f"a client gave up reconnecting: {statuses}")
            return sum(s["open"] for s in statuses) == args.connections and not any(s["reconnecting"] for s in statuses)

        try:
            wait_for("every client to reconnect", all_back, args.reconnect_timeout, every=1)
        except AssertionError:
            raise AssertionError(f"not every client reconnected: {statuses}") from None
        reconnected_s = time.monotonic() - killed
        wait_for("the workers to count every connection",
                 lambda: get(health).get("connections") == args.connections + 1, 60)
        dropped = sum(s["dropped"] for s in statuses)
        retried = sum(s["refusals"] for s in statuses) - figures["refusals"]  # attempts refused or failed
        closed = sum(s["closed_by_server"] for s in statuses)
        paced = [c.ask("report", tag="B", count=args.paced) for c in children]
        kept_ok, kept_bad = sum(r["kept_ok"] for r in paced), sum(r["kept_bad"] for r in paced)
        new_pid = next(w["pid"] for w in get(health)["workers"] if w["worker"] == victim)
        figures.update(killed_worker=victim, killed_connections=spread[victim], dropped=dropped,
                       closed_by_server=closed, reconnect_attempts_failed=retried, restarted_s=round(back_s, 2),
                       all_reconnected_s=round(reconnected_s, 2),
                       big_kept=kept_ok + kept_bad, big_kept_lost_nothing=kept_ok,
                       spread_after=counts(health))
        say(f"worker {victim} back in {back_s:.2f} s (pid {new_pid}); {dropped:,} clients dropped and all "
            f"reconnected {reconnected_s:.1f} s after the kill ({retried:,} attempts refused or failed on the way); "
            f"members of big never dropped: {kept_ok} of "
            f"{kept_ok + kept_bad} got all {args.paced} messages once and in order"
            + (f" ({[p for r in paced for p in r['problems']][:3]})" if kept_bad else ""))
        assert dropped == spread[victim], f"{dropped} clients dropped, the killed worker had {spread[victim]}"
        assert closed == 0, f"{closed} connections closed by the server"
        assert kept_bad == 0, "a member of big on a surviving worker lost or reordered a message"

        time.sleep(1)
        sender_gen.ask("send", tag="C", count=1, rate=100)

        def all_got_c() -> bool:
            reports[:] = [c.ask("report", tag="C", count=1) for c in children]
            return sum(r["kept_ok"] + r["back_ok"] for r in reports) == args.big - 1

        try:
            wait_for("every member of big, reconnected ones included, to get one more message", all_got_c, 30)
        except AssertionError:
            raise AssertionError(f"the message after the restart: {reports}") from None
        back = sum(r["back_ok"] for r in reports)
        figures.update(after_restart_delivered=args.big - 1, after_restart_reconnected_members=back)
        say(f"after the restart, one more message to big: {args.big - 1} of {args.big - 1} delivered "
            f"({back} of them to members that had reconnected)")
        if args.json:
            say(json.dumps(figures))
        return 0
    except AssertionError:
        say("the server's last lines:\n" + "".join(log[-20:]))
        raise
    finally:
        for child in children:
            with contextlib.suppress(Exception):
                child.ask("stop")
            with contextlib.suppress(Exception):
                child.process.wait(10)
            if child.process.poll() is None:
                child.process.kill()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=40000)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--generators", type=int, default=4, help="load generator processes, one source address each")
    parser.add_argument("--big", type=int, default=1000, help="members of the room the messages go to")
    parser.add_argument("--room-size", type=int, default=10, help="members of every other room")
    parser.add_argument("--in-flight", type=int, default=32, help="handshakes at a time, per generator")
    parser.add_argument("--max-connections-per-worker", type=int, default=19000,
                        help="the workers' --max-connections: under the 20,000-descriptor cap")
    parser.add_argument("--paced", type=int, default=400, help="messages to big while a worker is killed")
    parser.add_argument("--rate", type=float, default=40.0, help="their rate, per second")
    parser.add_argument("--kill-after", type=float, default=3.0, help="seconds into them")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds before RSS is read")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU measured once all are open")
    parser.add_argument("--reconnect-timeout", type=float, default=600.0,
                        help="seconds the killed worker's clients have to reconnect")
    parser.add_argument("--port", type=int, default=18765)
    parser.add_argument("--metrics-port", type=int, default=18766)
    parser.add_argument("--json", action="store_true")
    # a load generator's own flags
    parser.add_argument("--generator", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--source", default="127.0.0.1", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    raise_fd_limit()
    if args.generator:
        async def serve() -> None:
            await Generator(args).serve()

        uvloop.run(serve())
        return 0
    if args.connections // args.generators > 19000:
        parser.error("more than 19,000 connections per generator: add --generators (20,000 descriptors a process)")
    try:
        return controller(args)
    except AssertionError as exc:
        print(f"FAILED: {exc}", flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
