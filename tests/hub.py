"""An in-memory hub for core tests: a ``core.Server`` and wsproto clients, no sockets.

Each ``Peer`` owns both ends of one connection, the way h11's tests pair a
client and a server in memory, so a test reads as a short conversation.
"""

from __future__ import annotations

import json
from typing import Any

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    Request,
)
from wsproto.extensions import PerMessageDeflate

from hubbub import core
from hubbub.backends.store import MemoryStore
from hubbub.handlers import build_router


class Peer:
    """One wsproto client wired to one server connection."""

    def __init__(self, hub: Hub, target: str, headers: list[tuple[bytes, bytes]] | None = None,
                 deflate: bool = False) -> None:
        self.hub = hub
        self.client = WSConnection(ConnectionType.CLIENT)
        n = len(hub.peers)  # each peer its own address, as real clients have (the per-address limit)
        self.conn = hub.server.connect(peer=(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", 40000), now=hub.now)
        hub.peers[self.conn] = self
        self.inbox: list[Any] = []
        self.accepted = False
        self.rejected: int | None = None
        self.closed_with: int | None = None
        self.pings = 0
        self.answer_pings = True
        extensions = [PerMessageDeflate()] if deflate else []
        request = Request(host="localhost", target=target, extra_headers=headers or [], extensions=extensions)
        self.feed(self.client.send(request))

    def feed(self, data: bytes) -> None:
        self.hub.server.receive(self.conn, data, self.hub.now)
        self.hub.pump()

    def take(self, data: bytes) -> None:
        """Bytes from the server arrive at the client."""
        self.client.receive_data(data)
        for event in self.client.events():
            if isinstance(event, AcceptConnection):
                self.accepted = True
            elif isinstance(event, RejectConnection):
                self.rejected = event.status_code
            elif isinstance(event, Message):
                self.inbox.append(event.data)
            elif isinstance(event, CloseConnection):
                self.closed_with = event.code
            elif isinstance(event, Ping):
                self.pings += 1
                if self.answer_pings:
                    self.feed(self.client.send(event.response()))

    def send_json(self, payload: Any) -> None:
        self.send_text(json.dumps(payload))

    def send_text(self, text: str) -> None:
        self.feed(self.client.send(Message(data=text)))

    def send_bytes(self, data: bytes) -> None:
        self.feed(self.client.send(Message(data=data)))

    def close(self, code: int = 1000) -> None:
        """Start the closing handshake from the client side."""
        self.feed(self.client.send(CloseConnection(code)))

    def json(self) -> list[dict[str, Any]]:
        """The JSON events received since the last call."""
        out = [json.loads(m) for m in self.inbox if isinstance(m, str)]
        self.inbox.clear()
        return out

    def events(self) -> list[str]:
        return [e["event"] for e in self.json()]


class Hub:
    """A ``core.Server`` with the real routes, a settable clock and in-memory peers.

    Like a shell, ``pump`` carries out the core's effects: ``Stored`` goes to a
    ``MemoryStore`` and is acked at once (an ack means stored), ``History`` is
    answered from it, and every effect is kept in ``effects``. With
    ``carry_out=False`` the effects stay in the core for the test to take with
    ``server.effects()`` and answer itself.
    """

    def __init__(self, verifier: Any = None, carry_out: bool = True, http_routes: Any = None, **config: Any) -> None:
        self.config = core.Config(**config)
        self.server = core.Server(build_router(self.config), self.config, http_routes=http_routes, verifier=verifier)
        self.now = 1_700_000_000.0
        self.peers: dict[core.Connection, Peer] = {}
        self.store = MemoryStore()
        self.carry_out = carry_out
        self.effects: list[core.Effect] = []

    def join(self, target: str, **kwargs: Any) -> Peer:
        return Peer(self, target, **kwargs)

    def pump(self) -> None:
        server = self.server
        # an answer may make more effects (a pipelined API request behind the one it answered): until none
        while self.carry_out and (effects := server.effects()):
            for effect in effects:
                self.effects.append(effect)
                if isinstance(effect, core.Stored):
                    self.store.add(effect.room, effect.message)
                    if effect.ack is not None:
                        server.ack([effect.ack])
                elif isinstance(effect, core.History):
                    page = self.store.history(effect.room, effect.limit, effect.before, effect.after)
                    server.history_reply(effect.conn_id, effect.room, page, effect.ref)
        for conn in self.server.pending():
            data = conn.data_to_send()
            if data:
                self.peers[conn].take(data)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.server.tick(self.now)
        self.pump()


def raw_exchange(hub: Hub, data: bytes) -> tuple[core.Connection, bytes]:
    """Send raw bytes on a fresh connection; return it and everything the server answered."""
    conn = hub.server.connect(peer=("127.0.0.1", 9), now=hub.now)
    hub.server.receive(conn, data, hub.now)
    return conn, conn.data_to_send()


def upgrade_request(target: str = "/chat", **headers: str) -> bytes:
    """A valid WebSocket upgrade request; keyword headers are added or replace the defaults."""
    fields = {
        "Host": "localhost:8765",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    for name, value in headers.items():
        fields[name.replace("_", "-")] = value
    lines = [f"GET {target} HTTP/1.1"] + [f"{k}: {v}" for k, v in fields.items() if v is not None]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()
