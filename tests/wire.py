"""Raw WebSocket clients over plain sockets, for sending what no polite library would, and the
probes the hardening tests share: /healthz counts, the server's RSS, "does it still serve?"."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import time
import urllib.request
from collections.abc import Callable

from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, Message, Ping, Pong

from tests.hub import upgrade_request
from tests.servers import RunningServer

Figure = Callable[[str], None]  # the ``figure`` fixture (tests/conftest.py): records one measured figure


def frame(payload: bytes, opcode: int = 0x1, fin: bool = True, rsv: int = 0, masked: bool = True,
          key: bytes | None = None) -> bytes:
    """One client frame, as malformed as asked; masked with ``key`` (4 bytes; random when not given)."""
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    if n < 126:
        header = bytes((first, mask_bit | n))
    elif n < 65536:
        header = bytes((first, mask_bit | 126)) + struct.pack("!H", n)
    else:
        header = bytes((first, mask_bit | 127)) + struct.pack("!Q", n)
    if not masked:
        return header + payload
    key = os.urandom(4) if key is None else key
    return header + key + _mask(payload, key)


def _mask(payload: bytes, key: bytes) -> bytes:
    repeated = (key * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(len(payload), "big")


class RawClient:
    """A connected, upgraded socket plus a wsproto parser for what the server sends back."""

    def __init__(self, port: int, target: str = "/chat", headers: dict[str, str] | None = None,
                 timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.sendall(upgrade_request(target, **(headers or {})))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"closed during handshake: {head!r}")
            head += chunk
        self.response, rest = head.split(b"\r\n\r\n", 1)
        assert self.response.startswith(b"HTTP/1.1 101 "), self.response
        self.parser = Connection(ConnectionType.CLIENT)
        self.parser.receive_data(rest)
        self.messages: list[str | bytes] = []
        self.pings = 0
        self.pongs = 0
        self.close_code: int | None = None

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_text(self, text: str) -> None:
        self.send(frame(text.encode()))

    def read_until_closed(self, timeout: float = 10.0) -> int | None:
        """Read and parse until the server closes the socket; returns the close code it sent."""
        deadline = time.monotonic() + timeout
        partial: list[str | bytes] = []
        while time.monotonic() < deadline:
            try:
                self.sock.settimeout(max(0.01, deadline - time.monotonic()))
                data = self.sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError, TimeoutError):
                break
            if not data:
                break
            self.parser.receive_data(data)
            for event in self.parser.events():
                if isinstance(event, Message):
                    partial.append(event.data)
                    if event.message_finished:
                        self.messages.append(partial[0] if len(partial) == 1 else type(partial[0])().join(partial))
                        partial = []
                elif isinstance(event, Ping):
                    self.pings += 1
                elif isinstance(event, Pong):
                    self.pongs += 1
                elif isinstance(event, CloseConnection):
                    self.close_code = event.code
                    self._answer_close(event.code)
        return self.close_code

    def _answer_close(self, code: int) -> None:
        """Echo the server's close frame, as a real client does, so a clean close (1003, 1008, ...)
        ends at once instead of after the server's --close-timeout."""
        payload = b"" if code in (1005, 1006) else struct.pack("!H", code)
        try:
            self.send(frame(payload, opcode=0x8))
        except OSError:
            pass  # the server failed the connection and is already gone

    def answer_pings(self) -> None:
        """Read what is there without waiting and answer any ping, as a live client would."""
        self.sock.setblocking(False)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    break
                self.parser.receive_data(data)
        except BlockingIOError:
            pass
        finally:
            self.sock.setblocking(True)
        for event in self.parser.events():
            if isinstance(event, Ping):
                self.pings += 1
                self.send(frame(event.payload, opcode=0xA))
            elif isinstance(event, Message) and event.message_finished:
                self.messages.append(event.data)

    def read_messages(self, count: int, timeout: float = 10.0) -> list[str | bytes]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                break
            if not data:
                break
            self.parser.receive_data(data)
            for event in self.parser.events():
                if isinstance(event, Message) and event.message_finished:
                    self.messages.append(event.data)
                elif isinstance(event, CloseConnection):
                    self.close_code = event.code
        return self.messages

    def close(self) -> None:
        self.sock.close()


def healthz(server: RunningServer) -> dict:
    """The server's /healthz counts (connections, sockets, rooms, presence_users, ...)."""
    with urllib.request.urlopen(server.http + "/healthz", timeout=5) as response:
        return json.loads(response.read())


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll until ``predicate`` holds or ``timeout`` seconds pass; returns its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def assert_still_serves(server: RunningServer, room: str = "after", query: str = "") -> None:
    """A fresh pair of clients can still join a room and talk: the case before left the server healthy.
    ``query`` is added to both URLs (``&token=...`` on a server with JWT on)."""
    a = RawClient(server.port, f"/chat/{room}?user=a{query}")
    b = RawClient(server.port, f"/chat/{room}?user=b{query}")
    try:
        a.send_text(json.dumps({"event": "message", "text": "still alive"}))
        received = b.read_messages(1)
        assert received and json.loads(received[0])["text"] == "still alive", received
    finally:
        a.close()
        b.close()


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} for process {pid}")


def rss_kib(pid: int) -> int:
    """Resident set size of a process, in KiB."""
    return _status_kib(pid, "VmRSS")


class RssWatch:
    """A server's RSS over one scenario, in KiB: where it started, its peak and where it ended.

    The peak is the kernel's high-water mark (VmHWM), reset at the start (``clear_refs``), so a
    buffer that grew and was freed again before we looked still counts."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        with open(f"/proc/{pid}/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # 5: reset the peak RSS to the current RSS
        self.start = self.peak = self.end = rss_kib(pid)

    def stop(self) -> RssWatch:
        """Take the peak and the end; returns self."""
        self.end = rss_kib(self.pid)
        self.peak = _status_kib(self.pid, "VmHWM")
        return self

    @property
    def growth(self) -> int:
        return self.end - self.start

    @property
    def peak_growth(self) -> int:
        return self.peak - self.start

    def __str__(self) -> str:
        return f"RSS growth {self.growth} KiB (peak +{self.peak_growth} KiB)"


async def open_stream(port: int, target: str, rcvbuf: int = 0) -> tuple[FrameReader, asyncio.StreamWriter]:
    """An upgraded asyncio connection; ``rcvbuf`` shrinks the socket's receive buffer first (a client
    that stops reading then fills the server's side sooner)."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(upgrade_request(target))
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 "), head
    return FrameReader(reader), writer


class FrameReader:
    """Parses the server's (unmasked, unfragmented) frames from an asyncio stream, a chunk at a time:
    cheap enough that a test's readers keep up with a broadcast storm."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.buffer = bytearray()
        self.pos = 0

    async def _need(self, n: int) -> None:
        while len(self.buffer) - self.pos < n:
            chunk = await self.reader.read(262144)
            if not chunk:
                raise ConnectionError("the server closed the socket without a close frame")
            del self.buffer[: self.pos]
            self.pos = 0
            self.buffer += chunk

    async def next(self) -> tuple[int, bytes]:
        """The next frame's opcode and payload."""
        await self._need(2)
        first, second = self.buffer[self.pos], self.buffer[self.pos + 1] & 0x7F
        header = 2 + (2 if second == 126 else 8 if second == 127 else 0)
        await self._need(header)
        if second == 126:
            n = int.from_bytes(self.buffer[self.pos + 2 : self.pos + 4], "big")
        elif second == 127:
            n = int.from_bytes(self.buffer[self.pos + 2 : self.pos + 10], "big")
        else:
            n = second
        await self._need(header + n)
        start = self.pos + header
        payload = bytes(self.buffer[start : start + n])
        self.pos = start + n
        return first & 0x0F, payload

    async def until_close(self, on_text: Callable[[bytes], None] | None = None) -> int:
        """Read to the server's close frame, handing each text payload to ``on_text``; its close code."""
        while True:
            opcode, payload = await self.next()
            if opcode == 0x1 and on_text is not None:
                on_text(payload)
            elif opcode == 0x8:
                return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
