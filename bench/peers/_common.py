"""What every race peer shares: the command line, the ready line, the room/user routing, the message builder,
and (for the asyncio peers) running on uvloop until SIGTERM/SIGINT.

The race's contract: ``--host``/``--port`` (0: any free port), one flushed line
``race-server listening on ws://HOST:PORT`` once accepting, ``/chat`` (room ``lobby``) or ``/chat/ROOM`` with
``?user=NAME``, and per client message one JSON text built and serialised once for every other member.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs, unquote

import uvloop

LOBBY = "lobby"
ANONYMOUS = "anonymous"

_ids = itertools.count(1)
# One encoder for every message: json.dumps with these arguments would build a new JSONEncoder per call.
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def parse_args(description: str) -> argparse.Namespace:
    """The race's command line: ``--host`` and ``--port``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port")
    return parser.parse_args()


def announce(host: str, port: int) -> None:
    """Print the ready line the race waits for (once, flushed)."""
    print(f"race-server listening on ws://{host}:{port}", flush=True)


def route(target: str) -> tuple[str, str] | None:
    """``(room, user)`` for a request target such as ``/chat/r1?user=bob``; None for any other path."""
    path, _, query = target.partition("?")
    if path == "/chat":
        room = LOBBY
    elif path.startswith("/chat/") and len(path) > 6:
        room = unquote(path[6:])
    else:
        return None
    return room, parse_qs(query).get("user", [ANONYMOUS])[0]


def outgoing(room: str, user: str, data: str | bytes) -> str | None:
    """The text every other member of ``room`` gets for the client frame ``data``; None if it holds no message.

    The full work per message: parse the client's JSON, build the dict, serialise it once.
    """
    try:
        text = json.loads(data)["text"]
    except (ValueError, KeyError, TypeError):
        return None
    return _encode(
        {
            "event": "message",
            "room": room,
            "user": user,
            "text": text,
            "id": f"{next(_ids):x}",
            "ts": int(time.time() * 1000),
        }
    )


def run_asyncio(start: Callable[[str, int], Awaitable[int]], description: str) -> None:
    """Run an asyncio peer on uvloop: ``await start(host, port)`` (it returns the bound port), announce, serve.

    SIGTERM or SIGINT ends the process at once: a graceful close of up to 20,000 connections could take longer
    than the 2 s the race allows, and the kernel closes every socket anyway.
    """
    args = parse_args(description)

    async def main() -> None:
        port = await start(args.host, args.port)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, os._exit, 0)
        announce(args.host, port)
        await loop.create_future()  # serve until a signal

    uvloop.run(main())
