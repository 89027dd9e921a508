"""Race peer ``websockets_broadcast``: websockets' asyncio server, fanning out with ``broadcast()``.

``websockets.asyncio.server.serve`` on uvloop; each message goes to the room's other members through
``websockets.asyncio.server.broadcast(others, text)``, which encodes the text once and writes the frame to every
open member synchronously, waiting for none of them (no backpressure): the websockets docs' recommended way to
broadcast. Server and rooms: ``bench.peers._websockets``.
"""

from __future__ import annotations

from websockets.asyncio.server import ServerConnection, broadcast

from bench.peers._common import run_asyncio
from bench.peers._websockets import starter


async def fan_out(others: set[ServerConnection], text: str) -> None:
    broadcast(others, text)


if __name__ == "__main__":
    run_asyncio(starter(fan_out), __doc__.splitlines()[0])
