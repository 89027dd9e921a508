"""The race's load client: lean asyncio Protocol WebSocket clients on uvloop, and the race's workloads.

``bench.race`` runs it as a subprocess pinned to a core of its own, one workload per process, against a
server it started (the server's PID lets the client read the server's CPU time and memory from /proc over
exactly the measurement window)::

    python -m bench.loadclient --url ws://127.0.0.1:PORT --pid PID full --n 1000
    python -m bench.loadclient --url ... --pid ... full --rooms 8 --n 3      # small rooms at full speed
    python -m bench.loadclient --url ... --pid ... paced --rooms 100 --members 50 --senders 5 --rate 2
    python -m bench.loadclient --url ... --pid ... multi --rooms 100 --members 50 --per-client 10  # /ws
    python -m bench.loadclient --url ... --pid ... handshake --count 5000
    python -m bench.loadclient --url ... --pid ... memory --count 10000

It prints one JSON object of figures on stdout and exits 1 when the run failed: a lost, duplicated or
reordered delivery, an unexpected close (a close frame, or the connection lost, before the client closed),
a refused handshake, or a timeout.

Why hand-written: in the full-speed workload the client must cost less per delivery than the fastest server
it measures. A library client parses every frame in Python; here a read costs one ``bytes.count`` of a marker
that occurs once per message (each text starts with a 16-byte marker, then the sender's sequence number in a
fixed-width field; the last 15 bytes of a read are carried to the next, for a marker split between two), one
sequence check (the last message of the read must carry the number the count says), and a look for a close
frame among the read's last 127 bytes (a server sends nothing after its close frame, so one always ends a
read). The paced workloads are slow enough to parse every message's number, for latency (one clock:
``time.perf_counter``). The full-speed sender masks a whole burst with one integer XOR (each frame still has a
fresh random key), less than half the CPU of masking frame by frame: in rooms of 3 every message it sends is
only two deliveries, so what sending one costs counts.

Every workload that sends messages reports deliveries (per second, and server CPU per delivery) and inbound
messages: the messages the server received from senders and fanned out, counted by what the receivers got
(deliveries divided by the recipients of each message, every member but its sender), per second and server
CPU per inbound message. In one room of 1000 the second is the first times 999; in rooms of 3, where most
real chats are, it is what decides: the server's cost per message it reads, not per recipient it writes.

Before any workload sends, a join barrier makes sure every member is in its room: the room's first member
sends probe messages (text ``<sync>...``, no marker) until every other member has received one; some servers
answer the upgrade before they have added the connection to its room.
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
import resource
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import uvloop

# Starts every counted chat text. Its bytes are ones JSON never escapes and chat JSON otherwise lacks (none
# shares a bit of CPython's 64-bit search bloom filter with letters, digits or JSON punctuation), so
# ``bytes.count`` skips up to 17 bytes at a time: a third of the cost of counting a two-byte marker.
MARKER = b"<@>^`[]?<@>^`[]?"
CARRY = len(MARKER) - 1  # bytes kept from the end of one read: a marker split across reads is found in them
DIGITS = 9  # the sender's sequence number, zero-padded, right after the marker
FIELD = len(MARKER) + DIGITS
TEXT_SIZE = 64
PAD = "_" * (TEXT_SIZE - FIELD)
# A chat message's client frame, around its text: 93 bytes of payload, so a 2-byte header and a 4-byte key.
CHAT_BEFORE = b'{"event":"message","text":"'
CHAT_AFTER = b'"}'
CHAT_PAYLOAD = len(CHAT_BEFORE) + TEXT_SIZE + len(CHAT_AFTER)
CHAT_HEAD = bytes((0x81, 0x80 | CHAT_PAYLOAD))  # FIN, text; masked, the payload's length
# Message ``seq``'s frame, unmasked: ``CHAT_FRAME % (key, seq)`` is ``chat_frame(chat_text(seq))`` before masking.
CHAT_FRAME = CHAT_HEAD + b"%b" + CHAT_BEFORE + MARKER + b"%%0%dd" % DIGITS + PAD.encode() + CHAT_AFTER
UNMASKED = bytes(len(CHAT_HEAD) + 4)  # a frame's header and key are not masked: XOR them with zeros
SYNC = b"<sync>"  # starts the join barrier's probes
SYNC_TEXT = (SYNC.decode() + "_" * (TEXT_SIZE - len(SYNC))).encode()
CLOSE_TAIL = 127  # the longest unmasked close frame: 2 header bytes and 125 bytes of payload
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SATURATED = 0.9  # client CPU utilisation above which a run measured the client rather than the server
LINGER = 1.0  # seconds we wait for the server to close TCP after its close frame answered ours
LATE = 0.005  # a paced send this many seconds after its slot is late (the client could not keep up)
# The paced sender's shortest sleep: uvloop's timers count whole milliseconds, and one due in under half of one
# fires at once, so a sender with slots 0.5 ms apart (1000 senders at 2 messages/s) would spin its core.
TICK = 0.001


def chat_text(seq: int) -> bytes:
    """The 64-byte text of message ``seq``: the marker, the number in a fixed-width field, padding."""
    return b"%s%0*d%s" % (MARKER, DIGITS, seq, PAD.encode())


def client_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One final client frame of ``payload``, masked with a fresh random key as RFC 6455 requires."""
    size = len(payload)
    if size < 126:
        head = bytes((0x80 | opcode, 0x80 | size))
    elif size < 1 << 16:
        head = bytes((0x80 | opcode, 0xFE)) + size.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0xFF)) + size.to_bytes(8, "big")
    key = random.randbytes(4)
    mask = (key * (size // 4 + 1))[:size]
    return head + key + (int.from_bytes(payload, "big") ^ int.from_bytes(mask, "big")).to_bytes(size, "big")


def chat_frame(text: bytes) -> bytes:
    """The client frame of a chat message holding ``text`` (ASCII, nothing to escape)."""
    return client_frame(CHAT_BEFORE + text + CHAT_AFTER)


def chat_burst(first: int, stop: int) -> bytes:
    """The client frames of messages ``first`` to ``stop - 1``, back to back, each with a fresh random key.

    One XOR masks them all: the frames unmasked, against a mask that is zero over each header and key and the
    frame's key repeated over its payload: about 2 µs a message, against 4.4 frame by frame (``chat_frame``).
    """
    keys = random.randbytes(4 * (stop - first))
    split = [keys[at : at + 4] for at in range(0, len(keys), 4)]
    plain = b"".join([CHAT_FRAME % (key, seq) for key, seq in zip(split, range(first, stop), strict=True)])
    repeat = CHAT_PAYLOAD // 4 + 1
    mask = b"".join([UNMASKED + (key * repeat)[:CHAT_PAYLOAD] for key in split])
    return (int.from_bytes(plain, "big") ^ int.from_bytes(mask, "big")).to_bytes(len(plain), "big")


CLOSE_FRAME = (1000).to_bytes(2, "big")  # the payload of our close frame: normal closure


def close_code_at_end(buf: bytes) -> int | None:
    """The code of the unmasked close frame that ends ``buf``, if one does (1005 when it has none).

    A message frame cannot pass for one: its length bytes may be 0x88, but then what follows is its JSON
    payload, whose first two bytes (``{"``) are no close code.
    """
    end = len(buf)
    at = buf.find(b"\x88", max(0, end - CLOSE_TAIL))
    while at >= 0:
        if at + 1 < end and at + 2 + buf[at + 1] == end:
            size = buf[at + 1]
            if size == 0:
                return 1005
            code = int.from_bytes(buf[at + 2 : at + 4], "big")
            if size >= 2 and 1000 <= code < 5000:
                return code
        at = buf.find(b"\x88", at + 1)
    return None


def percentile(ordered: list[float], q: float) -> float:
    """The nearest-rank ``q`` percentile (0 < q <= 100) of an ascending list."""
    return ordered[max(0, min(len(ordered) - 1, -(-len(ordered) * q // 100) - 1))]


def run_queue_wait(path: str) -> float:
    """The second field of a schedstat file: nanoseconds spent waiting on a run queue, in seconds."""
    with open(path) as f:
        return int(f.read().split()[1]) / 1e9


class ServerProcess:
    """The server's CPU time and memory, read from /proc: the server is another process, maybe another core."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def cpu(self) -> tuple[float, float]:
        """User and system CPU seconds of the whole process (every thread), from /proc/PID/stat."""
        with open(f"/proc/{self.pid}/stat", "rb") as f:
            stat = f.read()
        fields = stat[stat.rindex(b")") + 2 :].split()  # from field 3 (state) on: utime is 14, stime 15
        return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK

    def waited(self) -> float:
        """Seconds the process's main thread spent runnable but waiting for a CPU (/proc/PID/schedstat)."""
        return run_queue_wait(f"/proc/{self.pid}/schedstat")

    def memory_kb(self, key: str) -> int:
        """A line of /proc/PID/status in KiB: ``VmRSS`` (resident now) or ``VmHWM`` (resident at the peak)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise KeyError(key)


@dataclass(frozen=True)
class Sample:
    """Clocks and counters at one edge of a measurement window."""

    wall: float
    client_user: float
    client_sys: float
    server_user: float
    server_sys: float
    server_waited: float
    client_waited: float
    deliveries: int

    @classmethod
    def take(cls, run: Run) -> Sample:
        user, system = run.server.cpu()
        own = resource.getrusage(resource.RUSAGE_SELF)
        return cls(
            time.perf_counter(), own.ru_utime, own.ru_stime, user, system,
            run.server.waited(), run_queue_wait("/proc/thread-self/schedstat"), run.received,
        )


def utilisation(start: Sample, end: Sample) -> dict[str, Any]:
    """Both sides' CPU utilisation (fraction of one core) over the window between two samples."""
    wall = end.wall - start.wall
    server = (end.server_user - start.server_user + end.server_sys - start.server_sys) / wall
    client_user, client_sys = (end.client_user - start.client_user) / wall, (end.client_sys - start.client_sys) / wall
    client = client_user + client_sys
    client_waited = (end.client_waited - start.client_waited) / wall
    return {
        "measure_s": round(wall, 4),
        "server_cpu_util": round(server, 4),
        "client_cpu_util": round(client, 4),
        "client_user_util": round(client_user, 4),
        "client_sys_util": round(client_sys, 4),
        # runnable but not running: another process had the core (a shared machine)
        "server_run_queue_wait": round((end.server_waited - start.server_waited) / wall, 4),
        "client_run_queue_wait": round(client_waited, 4),
        # the client wanted the CPU (ran or waited for it) nearly all the time: it, not the server, set the pace
        "client_saturated": client + client_waited > SATURATED,
    }


def cpu_per(start: Sample, end: Sample, count: float, unit: str) -> dict[str, float | None]:
    """The server's CPU microseconds (user + sys, user, sys) per ``unit`` over the window, ``count`` of them."""
    user, system = end.server_user - start.server_user, end.server_sys - start.server_sys
    per = 1e6 / count if count else None
    return {
        f"server_us_per_{unit}": None if per is None else round((user + system) * per, 4),
        f"server_user_us_per_{unit}": None if per is None else round(user * per, 4),
        f"server_sys_us_per_{unit}": None if per is None else round(system * per, 4),
    }


def window(start: Sample, end: Sample, recipients: int) -> dict[str, Any]:
    """The figures of a measurement window: deliveries and inbound messages (each went to ``recipients``
    members), their rates, the server CPU each cost, both sides' utilisation."""
    count = end.deliveries - start.deliveries
    wall = end.wall - start.wall
    inbound = count / recipients
    return {
        **utilisation(start, end),
        "deliveries": count,
        "deliveries_per_s": round(count / wall, 1),
        **cpu_per(start, end, count, "delivery"),
        "recipients": recipients,
        "inbound_messages": round(inbound, 1),
        "inbound_per_s": round(inbound / wall, 1),
        **cpu_per(start, end, inbound, "inbound"),
    }


C = TypeVar("C", bound="Conn")


class Run:
    """What every connection of one workload shares: the server's address and process, counts, failures."""

    def __init__(self, url: str, pid: int) -> None:
        parts = urlsplit(url)
        if parts.scheme != "ws" or parts.hostname is None or parts.port is None:
            raise ValueError(f"not a ws://HOST:PORT URL: {url}")
        self.host, self.port = parts.hostname, parts.port
        self.loop = asyncio.get_running_loop()
        self.server = ServerProcess(pid)
        self.conns: list[Conn] = []
        self.received = 0
        self.out_of_order = 0
        self.misrouted = 0
        self.unexpected_closes: Counter[str] = Counter()
        self.close_timeouts = 0
        self.errors: list[str] = []
        self.failed = asyncio.Event()

    def unexpected_close(self, why: str) -> None:
        self.unexpected_closes[why] += 1
        self.failed.set()

    def fail(self, why: str) -> None:
        if len(self.errors) < 10:
            self.errors.append(why)
        self.failed.set()

    async def sleep(self, seconds: float) -> None:
        """Sleep, or return early once something failed."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.failed.wait(), seconds)

    async def open(self, make: Callable[[int], C], count: int, in_flight: int, timeout: float = 15.0) -> list[C]:
        """Open ``count`` connections, ``in_flight`` handshakes at a time; ``make(i)`` builds the i-th."""
        conns: list[C] = []
        indices = iter(range(count))

        async def worker() -> None:
            for i in indices:
                conn = make(i)
                self.conns.append(conn)
                await self.loop.create_connection(lambda conn=conn: conn, self.host, self.port)
                await asyncio.wait_for(conn.opened, timeout)
                conns.append(conn)

        async with asyncio.TaskGroup() as group:
            for _ in range(min(in_flight, count)):
                group.create_task(worker())
        conns.sort(key=lambda conn: conn.index)
        return conns

    async def barrier(self, rooms: list[list[Conn]], timeout: float = 15.0) -> None:
        """Return once every member of every room has received a probe from the room's first member."""
        probe = chat_frame(SYNC_TEXT)
        for room in rooms:
            room[0].joined = True  # its probes reaching the others prove it is in the room
        deadline = time.perf_counter() + timeout
        while waiting := [room for room in rooms if not all(member.joined for member in room)]:
            if self.failed.is_set():
                raise RuntimeError("failed during the join barrier")
            if time.perf_counter() > deadline:
                missing = sum(not member.joined for room in waiting for member in room)
                raise TimeoutError(f"join barrier: {missing} members never received a probe in {timeout} s")
            for room in waiting:
                room[0].send(probe)
            await self.sleep(0.05)

    async def drain(self, done: Callable[[], bool], timeout: float) -> float:
        """Wait until ``done()`` (every delivery arrived) or ``timeout``; the seconds it took."""
        start = time.perf_counter()
        while not done():
            waited = time.perf_counter() - start
            if waited > timeout or (self.failed.is_set() and waited > 1.0):
                break
            await asyncio.sleep(0.01)
        return time.perf_counter() - start

    async def close(self, conns: list[Conn], timeout: float = 10.0) -> None:
        """Close cleanly: our close frame, the server's, its FIN; abort (and count) what has not within ``timeout``."""
        for conn in conns:
            conn.close()
        pending = [conn.lost for conn in conns if not conn.lost.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        for conn in conns:
            if not conn.lost.done():
                self.close_timeouts += 1
                conn.abort()

    def abort_all(self) -> None:
        """Drop every connection still open (after an error)."""
        for conn in self.conns:
            conn.abort()

    def report(self) -> dict[str, Any]:
        return {
            "out_of_order": self.out_of_order,
            "misrouted": self.misrouted,
            "unexpected_closes": sum(self.unexpected_closes.values()),
            "unexpected_close_reasons": dict(self.unexpected_closes),
            "close_timeouts": self.close_timeouts,
            "errors": self.errors,
        }


class Conn(asyncio.Protocol):
    """One client connection: a hand-written upgrade (no extension offered), then frames.

    As is, a member that expects nothing but the answer to its own close frame; subclasses read messages.
    """

    def __init__(self, run: Run, index: int, path: str) -> None:
        self.run = run
        self.index = index
        self.path = path
        self.key = base64.b64encode(os.urandom(16))
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = run.loop.create_future()
        self.lost: asyncio.Future[None] = run.loop.create_future()
        self.is_open = False
        self.joined = False
        self.closing = False
        self.head = b""
        self.prev = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport is one in all but name
        transport.write(
            b"GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
            % (self.path.encode(), self.run.host.encode(), self.run.port, self.key)
        )

    def data_received(self, data: bytes) -> None:
        if self.is_open:
            self.frames(data)
        else:
            self.upgrade(data)

    def upgrade(self, data: bytes) -> None:
        """Collect the server's answer to the upgrade request: 101, the right accept key, no extension."""
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            if len(self.head) > 65536:
                self.refused("no end of the response headers in 64 KiB")
            return
        lines = self.head[:end].split(b"\r\n")
        rest = self.head[end + 4 :]
        self.head = b""
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        accept = base64.b64encode(hashlib.sha1(self.key + GUID).digest())
        if not lines[0].startswith(b"HTTP/1.1 101"):
            self.refused(lines[0].decode(errors="replace"))
        elif headers.get(b"sec-websocket-accept") != accept:
            self.refused("wrong Sec-WebSocket-Accept")
        elif headers.get(b"sec-websocket-extensions"):
            self.refused("the server chose an extension the client did not offer")
        else:
            self.is_open = True
            if not self.opened.done():
                self.opened.set_result(None)
            if rest:
                self.data_received(rest)

    def refused(self, why: str) -> None:
        self.closing = True
        self.not_opened(f"handshake refused: {why}")
        self.abort()

    def not_opened(self, why: str) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(why))
            self.opened.exception()  # whoever awaits it still gets it; nobody may, once another handshake failed

    def frames(self, data: bytes) -> None:
        """Bytes after the upgrade: here only a close frame is expected (the answer to ours)."""
        self.watch_close(data)

    def past_barrier(self, data: bytes) -> bytes:
        """Before the join barrier's probe has arrived: what follows it in this read, once it does
        (``joined`` is then set), else nothing."""
        buf = self.prev[1 - len(SYNC) :] + data
        at = buf.find(SYNC)
        if at < 0:
            self.watch_close(data)
            return b""
        self.joined = True
        self.prev = b""
        return buf[at + len(SYNC) :]

    def watch_close(self, data: bytes) -> None:
        """Act on a close frame if one ends this read (one ends a read, maybe two: hence ``prev``)."""
        buf = data if len(data) >= CLOSE_TAIL else self.prev[-CLOSE_TAIL:] + data
        self.prev = data
        code = close_code_at_end(buf)
        if code is None:
            return
        if self.closing:  # the answer to ours: the server closes TCP next, or we do after LINGER
            self.run.loop.call_later(LINGER, self.abort)
        else:
            self.run.unexpected_close(f"close frame {code}")
            self.closing = True
            self.send(client_frame(b"" if code == 1005 else code.to_bytes(2, "big"), 0x8))  # echo it

    def send(self, frame: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame)

    def close(self) -> None:
        """Start the closing handshake (normal closure), unless closed or closing already."""
        if self.closing or self.lost.done():
            self.abort()
            return
        self.closing = True
        self.send(client_frame(CLOSE_FRAME, 0x8))

    def abort(self) -> None:
        if self.transport is not None and not self.lost.done():
            self.transport.abort()

    def eof_received(self) -> bool:
        return False  # the server closed TCP: close our side too (connection_lost follows)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.not_opened(f"connection lost during the handshake ({exc})")
        elif not self.closing:
            self.run.unexpected_close("connection lost" if exc is None else f"connection lost: {exc}")
        self.closing = True
        if not self.lost.done():
            self.lost.set_result(None)


class Pipeline:
    """The full-speed sender's window: message k goes out once every receiver has got message k - window.

    Receivers report checkpoints (every ``step`` messages) into a ring of counters, so nothing ever scans
    the receivers: when a checkpoint's counter reaches the number of receivers, the floor (the count every
    receiver has reached) moves up and the sender tops the window up in one write. The floor moves in steps,
    so between ``window - step + 1`` and ``window`` messages are in flight to the slowest receiver.

    The step is half the window: the sender writes bursts of ``window / 2`` messages while the other half is
    in flight. Smaller bursts penalise servers that cork per read (uWebSockets: socketify measured 302k
    deliveries/s at 3.25 µs each with bursts of 8, and 2.74M at 0.36 µs with bursts of 32, same window).
    """

    def __init__(self, receivers: int, window: int) -> None:
        self.receivers = receivers
        self.window = window
        self.step = max(1, window // 2)
        self.ring = [0] * (window // self.step + 4)  # more slots than checkpoints in flight at once
        self.floor = 0
        self.sent = 0
        self.sending = False
        self.sender: Conn | None = None

    def start(self, sender: Conn) -> None:
        self.sender = sender
        self.sending = True
        self.pump()

    def reached(self, before: int, after: int) -> None:
        """One receiver passed checkpoints ``before + 1`` to ``after``."""
        ring = self.ring
        for point in range(before + 1, after + 1):
            slot = point % len(ring)
            ring[slot] += 1
            if ring[slot] == self.receivers:
                ring[slot] = 0
                self.floor = point * self.step
                self.pump()

    def pump(self) -> None:
        top = self.floor + self.window
        if self.sending and self.sent < top and self.sender is not None:
            self.sender.send(chat_burst(self.sent, top))
            self.sent = top


class FullMember(Conn):
    """A receiver in the full-speed room: per read, one count, one sequence check, one look for a close frame."""

    def __init__(self, run: Run, index: int, path: str, pipeline: Pipeline) -> None:
        super().__init__(run, index, path)
        self.pipeline = pipeline
        self.count = 0
        self.tail = b""  # the last CARRY bytes of the last read
        self.misnumber_reported = False

    def data_received(self, data: bytes) -> None:
        if not self.joined or self.closing:
            Conn.data_received(self, data)  # the upgrade, the join barrier, the closing handshake
            return
        n = data.count(MARKER) + (self.tail + data[:CARRY]).count(MARKER)
        self.tail = data[-CARRY:]
        if n:
            before = self.count
            count = self.count = before + n
            self.run.received += n
            at = data.rfind(MARKER)  # the last message of the read carries number count - 1
            if 0 <= at <= len(data) - FIELD and int(data[at + len(MARKER) : at + FIELD]) != count - 1:
                self.misnumbered(data)
            step = self.pipeline.step
            if count // step != before // step:
                self.pipeline.reached(before // step, count // step)
        if len(data) < CLOSE_TAIL or data.find(b"\x88", -CLOSE_TAIL) >= 0:
            self.watch_close(data)
        else:
            self.prev = data

    def misnumbered(self, data: bytes) -> None:
        """The last message of a read is not the one the count says: one lost, repeated or reordered before it."""
        if not self.misnumber_reported:
            at = data.rfind(MARKER)
            self.run.fail(f"member {self.index}: message {int(data[at + len(MARKER) : at + FIELD])} "
                          f"arrived as number {self.count - 1}")
            self.misnumber_reported = True
        self.run.out_of_order += 1

    def frames(self, data: bytes) -> None:
        if self.joined:
            self.watch_close(data)
            return
        if rest := self.past_barrier(data):
            self.data_received(rest)


class Pacer:
    """The paced workloads' senders on one absolute schedule, and what their receivers make of each message.

    Sender i of S, at R messages/s each, sends at ``start + (k + i / S) / R``: evenly phased, never drifting
    (a late send is sent at once and counted; with slots under ``TICK`` apart, a wake-up sends every slot that
    came due, a millisecond's worth). Each message's text carries a number global to the client, which maps to
    its sender and its send time (the time it was written, so a millisecond's batch adds no latency).
    """

    def __init__(self, run: Run) -> None:
        self.run = run
        self.sent_at: list[float] = []
        self.sender_of: list[int] = []
        self.room_of: list[int] = []
        self.sending = False
        self.late = 0
        self.max_late = 0.0
        self.measure_from = sys.maxsize  # latencies are kept for messages numbered in [measure_from, measure_to)
        self.measure_to = sys.maxsize
        self.latencies: list[float] = []

    async def send(self, senders: list[PacedMember] | list[Publisher], rate: float) -> None:
        self.room_of = [sender.room for sender in senders]
        self.sending = True
        interval = 1.0 / (rate * len(senders))
        start = time.perf_counter()
        slot = 0
        while self.sending:
            now = time.perf_counter()
            while start + slot * interval <= now:
                late = now - (start + slot * interval)
                self.max_late = max(self.max_late, late)
                self.late += late > LATE
                seq = len(self.sent_at)
                sender = slot % len(senders)
                self.sender_of.append(sender)
                self.sent_at.append(time.perf_counter())
                senders[sender].say(seq)
                slot += 1
            await asyncio.sleep(max(TICK, start + slot * interval - time.perf_counter()))

    def delivered(self, member: PacedMember, seq: int, now: float) -> None:
        run = self.run
        run.received += 1
        sender = self.sender_of[seq]
        if self.room_of[sender] not in member.rooms:
            run.misrouted += 1
            run.fail(f"member {member.index} of rooms {sorted(member.rooms)} got message {seq} of room "
                     f"{self.room_of[sender]}")
        elif seq <= member.last.get(sender, -1):
            run.out_of_order += 1
            run.fail(f"member {member.index}: message {seq} after {member.last[sender]} from the same sender")
        member.last[sender] = seq
        if self.measure_from <= seq < self.measure_to:
            self.latencies.append(now - self.sent_at[seq])


class PacedMember(Conn):
    """A member in a paced room: parses every message's number, for order, routing and latency."""

    def __init__(self, run: Run, index: int, path: str, room: int, pacer: Pacer) -> None:
        super().__init__(run, index, path)
        self.room = room
        self.rooms = {room}  # the rooms whose messages it may receive
        self.pacer = pacer
        self.carry = b""  # the end of the last read, where an unfinished marker and number may start
        self.last: dict[int, int] = {}  # sender -> the last number received from it

    def say(self, seq: int) -> None:
        """Send paced message ``seq`` to its room (as a sender, it is in one)."""
        self.send(chat_frame(chat_text(seq)))

    def frames(self, data: bytes) -> None:
        if not self.joined:
            data = self.past_barrier(data)
            if not data:
                return
        now = time.perf_counter()
        buf = self.carry + data
        end = len(buf)
        done = 0
        at = buf.find(MARKER)
        while 0 <= at <= end - FIELD:
            self.pacer.delivered(self, int(buf[at + len(MARKER) : at + FIELD]), now)
            done = at + FIELD
            at = buf.find(MARKER, done)
        self.carry = buf[max(done, end - FIELD + 1) :]
        self.watch_close(data)


JOINED = b'"event":"joined"'  # in the server's reply to each /ws join
ERROR = b'"event":"error"'


def ws_room(room: int) -> bytes:
    """The name of multi-room room ``room`` on /ws."""
    return b"multi%d" % room


class MultiMember(PacedMember):
    """One /ws socket in several rooms (multi): joins them all, then parses every message like a paced member.

    The join barrier is the server's own: a ``joined`` reply for every room (``"presence": false``, so no
    presence events follow, as a v1 member's messages are all chat). Messages of every room it is in arrive on
    this one socket; the sender of each (a (member, room) pair) says which room it was, so a message of a room
    it is not in is misrouted, and order is checked per sender, as in the paced rooms.
    """

    def __init__(self, run: Run, index: int, rooms: list[int], pacer: Pacer) -> None:
        super().__init__(run, index, f"/ws?user=w{index}", rooms[0], pacer)
        self.rooms = set(rooms)
        self.joins = 0
        self.buffer = b""

    def join(self) -> None:
        self.send(b"".join(client_frame(b'{"event":"join","room":"%s","presence":false}' % ws_room(room))
                           for room in sorted(self.rooms)))

    def past_barrier(self, data: bytes) -> bytes:
        buf = self.buffer + data
        self.joins += buf.count(JOINED)
        if ERROR in buf:
            self.run.fail(f"member {self.index}: {buf[buf.find(ERROR) - 1 :][:200]!r}")
        self.buffer = buf[-len(JOINED) + 1 :]
        self.watch_close(data)
        if self.joins < len(self.rooms):
            return b""
        self.joined = True
        self.buffer = b""
        return b""  # nothing is sent before every member has every joined reply

    def frames(self, data: bytes) -> None:
        if self.joined and ERROR in data:  # a refused publish: its ack never comes, nor its deliveries
            self.run.fail(f"member {self.index}: {data[data.find(ERROR) - 1 :][:200]!r}")
        super().frames(data)


@dataclass(frozen=True)
class Publisher:
    """A multi-room sender: one member's socket, publishing to one of its rooms."""

    conn: MultiMember
    room: int

    def say(self, seq: int) -> None:
        self.conn.send(client_frame(b'{"event":"publish","room":"%s","data":"%s"}'
                                    % (ws_room(self.room), chat_text(seq))))


def latency_ms(latencies: list[float]) -> dict[str, Any]:
    ordered = sorted(latencies)
    if not ordered:
        return {"latency_samples": 0}
    return {
        "latency_samples": len(ordered),
        "latency_p50_ms": round(percentile(ordered, 50) * 1e3, 3),
        "latency_p99_ms": round(percentile(ordered, 99) * 1e3, 3),
        "latency_max_ms": round(ordered[-1] * 1e3, 3),
    }


def losses(expected: int, received: int) -> dict[str, int]:
    return {"expected": expected, "received": received,
            "lost": max(0, expected - received), "extra": max(0, received - expected)}


async def full_speed(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    """Rooms of N, one sender in each as fast as its own window allows: deliveries/s, inbound messages/s and
    server CPU per delivery and per inbound message. One room of 1000 measures fan-out; 8 rooms of 3, ingest."""
    if args.n < 2 or args.rooms < 1:
        raise ValueError("--n must be at least 2 (a sender and a receiver), --rooms at least 1")
    pipelines = [Pipeline(args.n - 1, args.window) for _ in range(args.rooms)]

    def member(i: int) -> Conn:
        room = i // args.n
        path = f"/chat/full{room}?user=u{i}"
        return Conn(run, i, path) if i % args.n == 0 else FullMember(run, i, path, pipelines[room])

    started = time.perf_counter()
    conns = await run.open(member, args.rooms * args.n, args.in_flight)
    connect_s = time.perf_counter() - started
    rooms = [conns[r * args.n : (r + 1) * args.n] for r in range(args.rooms)]
    await run.barrier(rooms)
    for pipeline, room in zip(pipelines, rooms, strict=True):
        pipeline.start(room[0])
    await run.sleep(args.warmup)
    first = Sample.take(run)
    await run.sleep(args.measure)
    last = Sample.take(run)
    for pipeline in pipelines:
        pipeline.sending = False
    sent = sum(pipeline.sent for pipeline in pipelines)
    expected = sent * (args.n - 1)
    drain_s = await run.drain(lambda: run.received >= expected, args.drain)
    figures = {
        "connect_s": round(connect_s, 3),
        **window(first, last, args.n - 1),
        "messages_sent": sent,
        **losses(expected, run.received),
        "drain_s": round(drain_s, 3),
        "server_rss_kb": run.server.memory_kb("VmRSS"),
        "server_peak_rss_kb": run.server.memory_kb("VmHWM"),
    }
    await run.close(conns)
    return figures


async def paced(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    """Rooms of members, the first few of each sending at a fixed rate: CPU per delivery and latency."""
    if args.members < 2 or not 1 <= args.senders <= args.members:
        raise ValueError("a room needs at least 2 members, and 1 to --members senders")
    pacer = Pacer(run)

    def member(i: int) -> PacedMember:
        room = i // args.members
        return PacedMember(run, i, f"/chat/paced{room}?user=p{i}", room, pacer)

    started = time.perf_counter()
    conns = await run.open(member, args.rooms * args.members, args.in_flight)
    connect_s = time.perf_counter() - started
    rooms = [conns[r * args.members : (r + 1) * args.members] for r in range(args.rooms)]
    await run.barrier(rooms)
    sending = asyncio.create_task(pacer.send([conn for room in rooms for conn in room[: args.senders]], args.rate))
    await run.sleep(args.warmup)
    pacer.measure_from = len(pacer.sent_at)
    first = Sample.take(run)
    await run.sleep(args.measure)
    last = Sample.take(run)
    pacer.measure_to = len(pacer.sent_at)
    pacer.sending = False
    await sending
    expected = len(pacer.sent_at) * (args.members - 1)
    drain_s = await run.drain(lambda: run.received >= expected, args.drain)
    figures = {
        "connect_s": round(connect_s, 3),
        **window(first, last, args.members - 1),
        "messages_sent": len(pacer.sent_at),
        "late_sends": pacer.late,
        "max_send_lateness_ms": round(pacer.max_late * 1e3, 3),
        **latency_ms(pacer.latencies),
        **losses(expected, run.received),
        "drain_s": round(drain_s, 3),
        "server_peak_rss_kb": run.server.memory_kb("VmHWM"),
    }
    await run.close(conns)
    return figures


def memberships(rooms: int, members: int, per_client: int) -> list[list[int]]:
    """Each multi-room client's rooms: ``rooms * members / per_client`` clients, each in ``per_client`` distinct
    rooms, every room with ``members`` distinct clients, rooms sharing members in varying combinations.

    Client ``c`` (row ``q``, column ``r`` of ``divmod(c, rooms)``) is in rooms ``(r + k * s) % rooms`` for
    ``k < per_client``, with the row's step ``s = 1 + q % (rooms // per_client)``: ``(per_client - 1) * s <
    rooms``, so its rooms are distinct; each row puts one member in every room for each ``k``.
    """
    if rooms % per_client or members % per_client:
        raise ValueError("--rooms and --members must both be multiples of --per-client")
    spread = rooms // per_client
    clients = rooms * members // per_client
    return [[(c % rooms + k * (1 + c // rooms % spread)) % rooms for k in range(per_client)] for c in range(clients)]


async def multi(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    """The paced rooms on /ws, each client one socket in ``per_client`` rooms: CPU per delivery and latency.

    The same rooms, members, senders and rate as ``paced`` (and so the same deliveries per second), with a
    tenth of the sockets at 10 rooms each: what multiplexing costs, or saves, per delivery.
    """
    if args.members < 2 or not 1 <= args.senders <= args.members:
        raise ValueError("a room needs at least 2 members, and 1 to --members senders")
    pacer = Pacer(run)
    rooms_of = memberships(args.rooms, args.members, args.per_client)
    started = time.perf_counter()
    conns = await run.open(lambda i: MultiMember(run, i, rooms_of[i], pacer), len(rooms_of), args.in_flight)
    for conn in conns:
        conn.join()
    deadline = time.perf_counter() + 15.0
    while not all(conn.joined for conn in conns):
        if run.failed.is_set():
            raise RuntimeError("failed while joining")
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{sum(not conn.joined for conn in conns)} members never had every joined reply")
        await run.sleep(0.01)
    connect_s = time.perf_counter() - started
    members_of: list[list[MultiMember]] = [[] for _ in range(args.rooms)]
    for conn in conns:
        for room in rooms_of[conn.index]:
            members_of[room].append(conn)
    publishers = [Publisher(conn, room) for room, members in enumerate(members_of) for conn in members[: args.senders]]
    sending = asyncio.create_task(pacer.send(publishers, args.rate))
    await run.sleep(args.warmup)
    pacer.measure_from = len(pacer.sent_at)
    first = Sample.take(run)
    await run.sleep(args.measure)
    last = Sample.take(run)
    pacer.measure_to = len(pacer.sent_at)
    pacer.sending = False
    await sending
    expected = len(pacer.sent_at) * (args.members - 1)
    drain_s = await run.drain(lambda: run.received >= expected, args.drain)
    figures = {
        "connect_s": round(connect_s, 3),
        "sockets": len(conns),
        "rooms_per_socket": args.per_client,
        **window(first, last, args.members - 1),
        "messages_sent": len(pacer.sent_at),
        "late_sends": pacer.late,
        "max_send_lateness_ms": round(pacer.max_late * 1e3, 3),
        **latency_ms(pacer.latencies),
        **losses(expected, run.received),
        "drain_s": round(drain_s, 3),
        "server_peak_rss_kb": run.server.memory_kb("VmHWM"),
    }
    await run.close(conns)
    return figures


async def handshakes(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    """``count`` upgrades, ``in_flight`` at a time: total seconds and server CPU per handshake."""
    first = Sample.take(run)
    conns = await run.open(lambda i: Conn(run, i, f"/chat/hs{i % 100}?user=h{i}"), args.count, args.in_flight)
    last = Sample.take(run)
    seconds = last.wall - first.wall
    figures = {
        **utilisation(first, last),
        "handshakes": args.count,
        "seconds": round(seconds, 4),
        "handshakes_per_s": round(args.count / seconds, 1),
        **cpu_per(first, last, args.count, "handshake"),
    }
    await run.close(conns)
    return figures


async def memory(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    """Server RSS empty (after one connect and close) and with ``count`` idle connections: KiB per connection."""
    warmup = await run.open(lambda i: Conn(run, -1, "/chat/idle0?user=warmup"), 1, 1)
    await run.close(warmup)
    await run.sleep(args.settle)
    empty = run.server.memory_kb("VmRSS")
    conns = await run.open(lambda i: Conn(run, i, f"/chat/idle{i % 100}?user=m{i}"), args.count, args.in_flight)
    await run.sleep(args.settle)
    full = run.server.memory_kb("VmRSS")
    figures = {
        "connections": args.count,
        "rss_empty_kb": empty,
        "rss_full_kb": full,
        "kb_per_connection": round((full - empty) / args.count, 3),
        "server_peak_rss_kb": run.server.memory_kb("VmHWM"),
    }
    await run.close(conns)
    return figures


WORKLOADS: dict[str, Callable[[Run, argparse.Namespace], Awaitable[dict[str, Any]]]] = {
    "full": full_speed,
    "paced": paced,
    "multi": multi,
    "handshake": handshakes,
    "memory": memory,
}


def describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


async def run_workload(args: argparse.Namespace) -> dict[str, Any]:
    """Run the chosen workload and gather its figures and failures into one dict."""
    run = Run(args.url, args.pid)
    result: dict[str, Any] = {
        "workload": args.workload,
        "params": {key: value for key, value in vars(args).items() if key not in ("url", "pid", "workload")},
    }
    try:
        result |= await WORKLOADS[args.workload](run, args)
    except Exception as exc:
        run.fail(describe(exc))
        run.abort_all()
    result |= run.report()
    result["ok"] = not (
        run.errors or run.unexpected_closes or run.out_of_order or run.misrouted
        or result.get("lost", 0) or result.get("extra", 0)
    )
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.loadclient", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the server, ws://HOST:PORT")
    parser.add_argument("--pid", type=int, required=True, help="the server's process, for its CPU time and memory")
    parser.add_argument("--in-flight", type=int, default=64, help="handshakes at a time while connecting")
    workloads = parser.add_subparsers(dest="workload", required=True)

    def timed(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--warmup", type=float, default=1.0, help="seconds of sending before the window")
        sub.add_argument("--measure", type=float, default=5.0, help="seconds of the measurement window")
        sub.add_argument("--drain", type=float, default=15.0, help="seconds to wait for every delivery at the end")

    full = workloads.add_parser("full", help="rooms of N, one sender each, pipelined with a window")
    full.add_argument("--n", type=int, default=1000, help="members of each room, the sender included")
    full.add_argument("--rooms", type=int, default=1, help="rooms, each with its own sender and window")
    full.add_argument("--window", type=int, default=64, help="messages in flight to the slowest receiver, at most")
    timed(full)
    pace = workloads.add_parser("paced", help="rooms of members, the first few of each sending at a fixed rate")
    pace.add_argument("--rooms", type=int, default=100)
    pace.add_argument("--members", type=int, default=50, help="members per room, senders included")
    pace.add_argument("--senders", type=int, default=5, help="senders per room")
    pace.add_argument("--rate", type=float, default=2.0, help="messages per second per sender")
    timed(pace)
    many = workloads.add_parser("multi", help="paced rooms on /ws (hubbub only), each socket in several rooms")
    many.add_argument("--rooms", type=int, default=100)
    many.add_argument("--members", type=int, default=50, help="members per room, senders included")
    many.add_argument("--per-client", type=int, default=10, help="rooms each socket joins")
    many.add_argument("--senders", type=int, default=5, help="senders per room")
    many.add_argument("--rate", type=float, default=2.0, help="messages per second per sender")
    timed(many)
    shake = workloads.add_parser("handshake", help="many upgrades, a few at a time")
    shake.add_argument("--count", type=int, default=5000)
    mem = workloads.add_parser("memory", help="server RSS per idle connection")
    mem.add_argument("--count", type=int, default=10000)
    mem.add_argument("--settle", type=float, default=1.0, help="seconds before each RSS reading")
    return parser.parse_args(argv)


def raise_fd_limit() -> None:
    """Every connection is a file descriptor: take the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_fd_limit()
    result = uvloop.run(run_workload(args))
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
