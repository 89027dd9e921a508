"""Race peer ``websockets_loop``: websockets' asyncio server, fanning out with ``await ws.send(text)`` per member.

``websockets.asyncio.server.serve`` on uvloop, the classic loop of the websockets tutorial: each message is sent to
the room's other members one after the other with ``ServerConnection.send``, which encodes the text for each of
them and waits whenever that member's write buffer is over its high-water mark (backpressure per member), or, for a
member in its closing handshake, until that connection is closed. The members are snapshotted first, since the
room may change while a send waits. Server and rooms: ``bench.peers._websockets``.
"""

from __future__ import annotations

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from bench.peers._common import run_asyncio
from bench.peers._websockets import starter


async def fan_out(others: set[ServerConnection], text: str) -> None:
    for other in others:  # a snapshot: the room may change while a send waits
        try:
            await other.send(text)
        except ConnectionClosed:
            pass  # that member is leaving: its own handler takes it out of the room


if __name__ == "__main__":
    run_asyncio(starter(fan_out), __doc__.splitlines()[0])
