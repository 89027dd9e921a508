"""Race peer ``limit``: no WebSocket library, the per-message-write limit every Python server is measured against.

An ``asyncio.Protocol`` on uvloop with a minimal RFC 6455 server: the opening handshake
(``Sec-WebSocket-Accept`` = base64(SHA-1(key + GUID))), a parser for masked client frames (split across reads or
several per read, 7/16/64-bit lengths, fragmented messages), pong for ping, close echoed then the transport
closed. Each message is parsed, rebuilt and serialised once into one pre-encoded server frame, then written to
every other member with ``transport.write(frame)``: one write per recipient per message, nothing else.
No keepalive pings, no compression, no size limit, listen backlog 4096.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections import defaultdict
from typing import cast

from bench.peers._common import outgoing, route, run_asyncio

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HEAD = 16 * 1024  # request line and headers

OP_CONTINUATION, OP_TEXT, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x8, 0x9, 0xA
FIN = 0x80

rooms: defaultdict[str, set[asyncio.Transport]] = defaultdict(set)


def server_frame(opcode: int, payload: bytes) -> bytes:
    """One unmasked, unfragmented server frame."""
    n = len(payload)
    if n < 126:
        return bytes((FIN | opcode, n)) + payload
    if n < 1 << 16:
        return bytes((FIN | opcode, 126)) + n.to_bytes(2, "big") + payload
    return bytes((FIN | opcode, 127)) + n.to_bytes(8, "big") + payload


def unmask(payload: bytes, mask: bytes) -> bytes:
    """XOR the payload with the repeated 4-byte mask, as one big integer."""
    n = len(payload)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def http_error(status: str) -> bytes:
    """A bodiless HTTP error response that closes the connection."""
    return f"HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()


class ChatProtocol(asyncio.Protocol):
    """One connection: the handshake, then one member of one room."""

    transport: asyncio.Transport

    def __init__(self) -> None:
        self.buffer = b""  # unparsed bytes carried to the next read
        self.upgraded = False
        self.room = ""
        self.user = ""
        self.members: set[asyncio.Transport] = set()
        self.fragments: list[bytes] = []  # a fragmented text message so far

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports don't subclass it

    def connection_lost(self, exc: Exception | None) -> None:
        self.members.discard(self.transport)
        if not self.members and rooms.get(self.room) is self.members:
            del rooms[self.room]

    def data_received(self, data: bytes) -> None:
        if self.buffer:
            data = self.buffer + data
            self.buffer = b""
        if not self.upgraded:
            data = self.handshake(data)
            if not data:
                return
        self.frames(data)

    def handshake(self, data: bytes) -> bytes:
        """Answer the upgrade request once it is complete; return the bytes after it."""
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            if len(data) > MAX_HEAD:
                self.refuse("431 Request Header Fields Too Large")
            else:
                self.buffer = data
            return b""
        request_line, *lines = head.decode("latin-1").split("\r\n")
        method, _, target = request_line.partition(" ")
        target = target.rpartition(" ")[0]
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        key = headers.get("sec-websocket-key")
        if method != "GET" or headers.get("upgrade", "").lower() != "websocket" or not key:
            self.refuse("400 Bad Request")
            return b""
        chat = route(target)
        if chat is None:
            self.refuse("404 Not Found")
            return b""
        accept = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()
        self.transport.write(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept}\r\n\r\n".encode()
        )
        self.upgraded = True
        self.room, self.user = chat
        self.members = rooms[self.room]
        self.members.add(self.transport)
        return rest

    def refuse(self, status: str) -> None:
        self.transport.write(http_error(status))
        self.transport.close()

    def frames(self, data: bytes) -> None:
        """Handle every complete client frame in ``data``; keep an incomplete one for the next read."""
        transport = self.transport
        pos, end = 0, len(data)
        while end - pos >= 2:
            first, second = data[pos], data[pos + 1]
            if not second & 0x80:  # clients must mask their frames
                self.close(b"\x03\xea")  # 1002 protocol error
                return
            length = second & 0x7F
            start = pos + 2
            if length == 126:
                length = int.from_bytes(data[start : start + 2], "big")
                start += 2
            elif length == 127:
                length = int.from_bytes(data[start : start + 8], "big")
                start += 8
            stop = start + 4 + length
            if stop > end:  # incomplete: wait for more
                break
            payload = unmask(data[start + 4 : stop], data[start : start + 4])
            pos = stop
            opcode = first & 0x0F
            if opcode == OP_TEXT:
                if first & FIN:
                    self.broadcast(payload)
                else:
                    self.fragments = [payload]
            elif opcode == OP_CONTINUATION and self.fragments:
                self.fragments.append(payload)
                if first & FIN:
                    self.broadcast(b"".join(self.fragments))
                    self.fragments = []
            elif opcode == OP_CLOSE:
                self.close(payload[:2])
                return
            elif opcode == OP_PING:
                transport.write(server_frame(OP_PONG, payload))
        if pos < end:
            self.buffer = data[pos:]

    def broadcast(self, payload: bytes) -> None:
        text = outgoing(self.room, self.user, payload)
        if text is None:
            return
        frame = server_frame(OP_TEXT, text.encode())
        me = self.transport
        for other in self.members:
            if other is not me:
                other.write(frame)

    def close(self, code: bytes) -> None:
        """Send a close frame with ``code`` (echoing the client's) and close the transport."""
        self.transport.write(server_frame(OP_CLOSE, code))
        self.transport.close()


async def start(host: str, port: int) -> int:
    server = await asyncio.get_running_loop().create_server(ChatProtocol, host, port, backlog=4096)
    return server.sockets[0].getsockname()[1]


if __name__ == "__main__":
    run_asyncio(start, __doc__.splitlines()[0])
