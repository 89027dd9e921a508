"""Race peer ``picows``: picows' Cython WebSocket server, fanning out with ``WSTransport.send`` per member.

``picows.ws_create_server`` on uvloop (picows runs its connections on aiofastnet's transports when that package is
installed, as here: its default). The listener factory routes ``/chat`` and ``/chat/ROOM`` (anything else: 404);
each message's payload is encoded once and written to every other member with
``transport.send(WSMsgType.TEXT, payload)``, synchronously, from the ``on_ws_frame`` callback. picows hands over
frames, not messages: the listener joins a fragmented text message itself and answers a close frame (picows
answers pings). No auto-ping, listen backlog 4096.
"""

from __future__ import annotations

from collections import defaultdict

from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server

from bench.peers._common import outgoing, route, run_asyncio

rooms: defaultdict[str, set[WSTransport]] = defaultdict(set)


class ChatListener(WSListener):
    """One member of one room."""

    def __init__(self, room: str, user: str) -> None:
        self.room = room
        self.user = user
        self.members: set[WSTransport] = set()
        self.fragments: list[bytes] = []  # a fragmented text message so far (picows hands over frames)

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.members = rooms[self.room]
        self.members.add(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        if msg_type is WSMsgType.TEXT:
            if frame.fin:
                self.broadcast(transport, frame.get_payload_as_bytes())
            else:
                self.fragments = [frame.get_payload_as_bytes()]
        elif msg_type is WSMsgType.CONTINUATION and self.fragments:
            self.fragments.append(frame.get_payload_as_bytes())
            if frame.fin:
                self.broadcast(transport, b"".join(self.fragments))
                self.fragments = []
        elif msg_type is WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()

    def broadcast(self, transport: WSTransport, data: bytes) -> None:
        text = outgoing(self.room, self.user, data)
        if text is None:
            return
        payload = text.encode()
        for other in self.members:
            if other is not transport:
                other.send(WSMsgType.TEXT, payload)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.members.discard(transport)
        if not self.members and rooms.get(self.room) is self.members:
            del rooms[self.room]


def listener_factory(request: WSUpgradeRequest) -> ChatListener | None:
    """A listener for the chat routes; None (404) for any other path."""
    target = route(request.path.decode("latin-1"))
    return ChatListener(*target) if target else None


async def start(host: str, port: int) -> int:
    server = await ws_create_server(listener_factory, host, port, backlog=4096)
    return server.sockets[0].getsockname()[1]


if __name__ == "__main__":
    run_asyncio(start, __doc__.splitlines()[0])
