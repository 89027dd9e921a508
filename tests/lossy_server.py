"""A test double of hubbub's chat route that loses deliveries on purpose.

It speaks hubbub's wire protocol for ``/chat`` and ``/chat/{room}`` (message to
every other member, ack to the sender when ``ref`` is given) on the
``websockets`` library, and silently drops one delivery in ``--drop-every``. It
exists so the load test's verdict can be shown to fail on loss without a
test-only switch in the real server.

    python tests/lossy_server.py --port 0 --drop-every 50
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import signal
import time

from websockets.asyncio.server import ServerConnection, serve


class LossyChat:
    def __init__(self, drop_every: int) -> None:
        self.drop_every = drop_every
        self.rooms: dict[str, set[ServerConnection]] = {}
        self.deliveries = itertools.count(1)
        self.ids = itertools.count(1)
        self.dropped = 0

    async def handle(self, ws: ServerConnection) -> None:
        path = ws.request.path.split("?", 1)[0] if ws.request else "/"
        query = ws.request.path.partition("?")[2] if ws.request else ""
        user = dict(p.partition("=")[::2] for p in query.split("&") if p).get("user", "anonymous")
        if path == "/chat":
            room = "lobby"
        elif path.startswith("/chat/"):
            room = path[len("/chat/"):]
        else:
            await ws.close(1008, "only /chat here")
            return
        members = self.rooms.setdefault(room, set())
        members.add(ws)
        try:
            async for raw in ws:
                event = json.loads(raw)
                if event.get("event") != "message":
                    await ws.send(json.dumps({"event": "error", "code": "unknown_event", "detail": "chat only"}))
                    continue
                message = json.dumps({
                    "event": "message", "room": room, "user": user, "text": event.get("text"),
                    "id": f"{next(self.ids):012d}", "ts": int(time.time() * 1000),
                })
                for member in list(members):
                    if member is ws:
                        continue
                    if next(self.deliveries) % self.drop_every == 0:
                        self.dropped += 1
                        continue
                    try:
                        await member.send(message)
                    except Exception:
                        pass
                if event.get("ref") is not None:
                    await ws.send(json.dumps({"event": "ack", "ref": event["ref"], "id": "x"}))
        finally:
            members.discard(ws)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--drop-every", type=int, default=50, help="drop one delivery in this many")
    args = parser.parse_args()
    chat = LossyChat(args.drop_every)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with serve(chat.handle, args.host, args.port) as server:
        host, port = next(iter(server.sockets)).getsockname()[:2]
        print(f"hubbub listening on ws://{host}:{port} (lossy test double)", flush=True)
        await stop.wait()
    print(f"dropped {chat.dropped} deliveries", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
