"""Memory per ``/ws`` connection in 10 rooms, against the same connections in none (issue 14 item 5).

Starts one ``server.py --store memory``, opens ``--connections`` sockets on ``/ws`` (raw asyncio,
pipelined handshakes), reads the server's RSS, has every socket join ``--rooms`` rooms (each room
shared by many sockets, ``presence: false``; with ``--watch`` half of them watch presence), waits for
every ``joined`` and reads the RSS again::

    python bench/rooms_memory.py --connections 5000 --rooms 10
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.servers import spawn_server
from tests.wire import frame, rss_kib


async def open_ws(port: int, i: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write((f"GET /ws?user=u{i} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    await reader.readuntil(b"\r\n\r\n")
    return reader, writer


async def joined_all(reader: asyncio.StreamReader, count: int) -> None:
    """Read frames until ``count`` ``joined`` replies came (unmasked server frames)."""
    seen = 0
    while seen < count:
        head = await reader.readexactly(2)
        n = head[1] & 0x7F
        if n == 126:
            n = int.from_bytes(await reader.readexactly(2), "big")
        elif n == 127:
            n = int.from_bytes(await reader.readexactly(8), "big")
        payload = await reader.readexactly(n)
        if b'"joined"' in payload[:20]:
            seen += 1


async def main(connections: int, rooms: int, room_count: int, watch: bool) -> None:
    with spawn_server("--store", "memory", "--rate-limit", "0", "--max-connections", str(connections + 10),
                      "--max-connections-per-address", "0") as server:
        pid = server.process.pid
        empty = rss_kib(pid)
        sockets = []
        for start in range(0, connections, 200):
            batch = range(start, min(start + 200, connections))
            sockets += await asyncio.gather(*(open_ws(server.port, i) for i in batch))
        await asyncio.sleep(1)
        connected = rss_kib(pid)
        for i, (_, writer) in enumerate(sockets):
            for r in range(rooms):
                room = f"room-{(i * 7 + r * 13) % room_count}"
                event = {"event": "join", "room": room, "presence": watch and i % 2 == 0, "meta": {"device": "bench"}}
                writer.write(frame(json.dumps(event).encode()))
        await asyncio.gather(*(joined_all(reader, rooms) for reader, _ in sockets))
        await asyncio.sleep(1)
        in_rooms = rss_kib(pid)
        print(f"{connections} /ws connections: RSS {empty} KiB empty, {connected} KiB connected "
              f"({(connected - empty) / connections:.2f} KiB each), {in_rooms} KiB in {rooms} rooms each of "
              f"{room_count} ({(in_rooms - empty) / connections:.2f} KiB each, "
              f"{(in_rooms - connected) / connections / rooms:.3f} KiB per membership)")
        for _, writer in sockets:
            writer.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--rooms", type=int, default=10)
    parser.add_argument("--room-count", type=int, default=500, help="distinct rooms the joins spread over")
    parser.add_argument("--watch", action="store_true",
                        help="half the joins watch presence (their diffs are queued too, unread: not per membership)")
    args = parser.parse_args()
    asyncio.run(main(args.connections, args.rooms, args.room_count, args.watch))
