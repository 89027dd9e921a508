"""Race peer ``websockets_loop``: websockets' asyncio server, fanning out with ``await ws.send(text)`` per member.

``websockets.asyncio.server.serve`` on uvloop, the classic loop of the websockets tutorial: each message is sent to
the room's other members one after the other with ``ServerConnection.send``, which encodes the text for each of
them and waits whenever that member's write buffer is over its high-water mark (backpressure per member), or, for a
member in its closing handshake, until that connection is closed. The members are snapshotted first, since the
room may change while a send waits. Keepalive pings and compression are off, incoming messages have no size limit,
listen backlog 4096.
"""

from __future__ import annotations

import http
from collections import defaultdict

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from bench.peers._common import outgoing, route, run_asyncio

rooms: defaultdict[str, set[ServerConnection]] = defaultdict(set)


def check_path(connection: ServerConnection, request: Request) -> Response | None:
    """404 for anything but ``/chat`` and ``/chat/ROOM``."""
    if route(request.path) is None:
        return connection.respond(http.HTTPStatus.NOT_FOUND, "not found\n")
    return None


async def handler(ws: ServerConnection) -> None:
    """Join the room, send each message to the other members, leave the room on disconnect."""
    target = route(ws.request.path) if ws.request else None
    assert target is not None, "check_path lets only the chat routes through"
    room, user = target
    members = rooms[room]
    members.add(ws)
    try:
        async for data in ws:
            text = outgoing(room, user, data)
            if text is None:
                continue
            for other in members - {ws}:
                try:
                    await other.send(text)
                except ConnectionClosed:
                    pass  # that member is leaving: its own handler takes it out of the room
    except ConnectionClosed:
        pass  # an abrupt disconnect is not an error here
    finally:
        members.discard(ws)
        if not members:
            del rooms[room]


async def start(host: str, port: int) -> int:
    server = await serve(
        handler,
        host,
        port,
        process_request=check_path,
        compression=None,
        ping_interval=None,
        max_size=None,
        backlog=4096,
    )
    return server.sockets[0].getsockname()[1]


if __name__ == "__main__":
    run_asyncio(start, __doc__.splitlines()[0])
