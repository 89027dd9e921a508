"""Race peer ``websockets_broadcast``: websockets' asyncio server, fanning out with ``broadcast()``.

``websockets.asyncio.server.serve`` on uvloop; each message goes to the room's other members through
``websockets.asyncio.server.broadcast(others, text)``, which encodes the text once and writes the frame to every
open member synchronously, waiting for none of them (no backpressure): the websockets docs' recommended way to
broadcast. Keepalive pings and compression are off, incoming messages have no size limit, listen backlog 4096.
"""

from __future__ import annotations

import http
from collections import defaultdict

from websockets.asyncio.server import ServerConnection, broadcast, serve
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
            if text is not None:
                broadcast(members - {ws}, text)
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
