"""Race peer ``aiohttp``: an aiohttp web app with ``web.WebSocketResponse``, fanning out with ``send_frame``.

Routes ``/chat`` and ``/chat/{room}`` on an ``AppRunner``/``TCPSite`` on uvloop. Each message's frame payload is
encoded once and written to every other member with ``await WebSocketResponse.send_frame(payload, WSMsgType.TEXT)``,
the cheapest public per-client send (``send_str`` would encode the text again for every member); it waits only
when a member's writer is over its limit and the transport is paused. The members are snapshotted first, since the
room may change while a send waits. No heartbeat, no compression, no message size limit, no access log, listen
backlog 4096.
"""

from __future__ import annotations

from collections import defaultdict

from aiohttp import WSMsgType, web

from bench.peers._common import ANONYMOUS, LOBBY, outgoing, run_asyncio

ROOMS = web.AppKey("rooms", defaultdict[str, set[web.WebSocketResponse]])


async def chat(request: web.Request) -> web.WebSocketResponse:
    """Join the room, send each message to the other members, leave the room on disconnect."""
    ws = web.WebSocketResponse(compress=False, max_msg_size=0)
    await ws.prepare(request)
    room = request.match_info.get("room", LOBBY)
    user = request.query.get("user", ANONYMOUS)
    rooms = request.app[ROOMS]
    members = rooms[room]
    members.add(ws)
    try:
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                continue
            text = outgoing(room, user, msg.data)
            if text is None:
                continue
            payload = text.encode()
            for other in members - {ws}:
                try:
                    await other.send_frame(payload, WSMsgType.TEXT)
                except ConnectionResetError:
                    pass  # that member is leaving: its own handler takes it out of the room
    finally:
        members.discard(ws)
        if not members:
            del rooms[room]
    return ws


async def start(host: str, port: int) -> int:
    app = web.Application()
    app[ROOMS] = defaultdict(set)
    app.add_routes([web.get("/chat", chat), web.get("/chat/{room}", chat)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096)
    await site.start()
    return site.port


if __name__ == "__main__":
    run_asyncio(start, __doc__.splitlines()[0])
