"""Chat rooms: ``/chat`` (room ``lobby``) and ``/chat/{room}``.

A message goes to every *other* member of the room, with a server-assigned id
and timestamp; the sender gets an ``ack`` when it passed a ``ref``. History is
read by the shell's store, which answers through ``Server.history_reply``.
"""

from __future__ import annotations

from typing import Any

from core import Connection, Endpoint, EventError, History, Stored

DEFAULT_ROOM = "lobby"
DEFAULT_HISTORY = 50


def room_of(conn: Connection) -> str:
    return conn.params.get("room", DEFAULT_ROOM)


def on_open(conn: Connection) -> None:
    conn.join(room_of(conn))


def on_message(conn: Connection, event: dict[str, Any]) -> None:
    text = event.get("text")
    if not isinstance(text, str):
        raise EventError("bad_field", '"text" must be a string')
    ref = event.get("ref")
    if ref is not None and (isinstance(ref, bool) or not isinstance(ref, (str, int, float))):
        raise EventError("bad_field", '"ref" must be a string or a number')
    room = room_of(conn)
    server = conn.server
    message = {
        "event": "message",
        "room": room,
        "user": conn.user,
        "text": text,
        "id": server.new_id(),
        "ts": int(server.now * 1000),
    }
    server.broadcast(room, message, exclude=conn)
    conn.emit(Stored(room, message))
    if ref is not None:
        conn.send({"event": "ack", "ref": ref, "id": message["id"]})


def on_history(conn: Connection, event: dict[str, Any]) -> None:
    limit = event.get("limit", DEFAULT_HISTORY)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise EventError("bad_field", '"limit" must be a positive integer')
    before = event.get("before")
    if before is not None and not isinstance(before, str):
        raise EventError("bad_field", '"before" must be a message id (a string)')
    limit = min(limit, conn.server.config.history_max)
    conn.emit(History(conn.id, room_of(conn), limit, before))


endpoint = Endpoint(
    name="chat",
    on_open=on_open,
    events={"message": on_message, "history": on_history},
)
