"""A raw WebSocket client over a plain socket, for sending what no polite library would."""

from __future__ import annotations

import os
import socket
import struct
import time

from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, Message, Ping

from tests.hub import upgrade_request


def frame(payload: bytes, opcode: int = 0x1, fin: bool = True, rsv: int = 0, masked: bool = True) -> bytes:
    """One client frame, as malformed as asked."""
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
    key = os.urandom(4)
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
            except (ConnectionResetError, BrokenPipeError):
                break
            except TimeoutError:
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
                elif isinstance(event, CloseConnection):
                    self.close_code = event.code
        return self.close_code

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


def rss_kib(pid: int) -> int:
    """Resident set size of a process, in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")
