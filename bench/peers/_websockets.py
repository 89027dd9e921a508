"""What the two websockets peers share: the server, the routes, and room membership.

Each peer supplies only its fan-out, ``fan_out(others, text)``; this module runs websockets' asyncio
server (``websockets.asyncio.server.serve``) with keepalive pings and compression off, no incoming size
limit and listen backlog 4096, answers 404 outside the chat routes, and keeps every connection in its room
for as long as it is open.
"""

from __future__ import annotations

import http
from collections import defaultdict
from collections.abc import Awaitable, Callable

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from bench.peers._common import outgoing, route

FanOut = Callable[[set[ServerConnection], str], Awaitable[None]]


def check_path(connection: ServerConnection, request: Request) -> Response | None:
    """404 for anything but ``/chat`` and ``/chat/ROOM``."""
    if route(request.path) is None:
        return connection.respond(http.HTTPStatus.NOT_FOUND, "not found\n")
    return None


def starter(fan_out: FanOut) -> Callable[[str, int], Awaitable[int]]:
    """The peer's ``start(host, port)`` for ``run_asyncio``: serves until cancelled, returns the port."""
    rooms: defaultdict[str, set[ServerConnection]] = defaultdict(set)

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
                    await fan_out(members - {ws}, text)
        except ConnectionClosed:
            pass  # an abrupt disconnect is not an error here
        finally:
            members.discard(ws)
            if not members:
                del rooms[room]

    async def start(host: str, port: int) -> int:
        server = await serve(
            handler, host, port, process_request=check_path, compression=None, ping_interval=None, max_size=None,
            backlog=4096,
        )
        return server.sockets[0].getsockname()[1]

    return start
