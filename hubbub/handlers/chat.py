"""Chat rooms: ``/chat`` (room ``lobby``) and ``/chat/{room}``.

A message goes to every *other* member of the room at once, on this instance
and (through the broker, ``Publish``) on the others, with a server-assigned id
and timestamp (``Connection.publish`` does all of it, from one encode). The
sender gets an ``ack`` when it passed a ``ref``, but only once the store has
kept the message: the ``Stored`` effect carries the ``Ack`` and the shell hands
it back through ``Server.ack`` after its batch commits (or
``Server.unavailable`` when it cannot). While the store is known to be down,
messages are refused with ``unavailable`` instead of being sent unkept.
History is read by the shell's store, which answers through
``Server.history_reply``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hubbub.core import Connection, Endpoint, EventError, History

DEFAULT_ROOM = "lobby"
DEFAULT_HISTORY = 50


def room_of(conn: Connection) -> str:
    return conn.params.get("room", DEFAULT_ROOM)


def rooms_of(params: Mapping[str, str]) -> tuple[str]:
    """The room a connection joins, for a token's ``rooms`` claim."""
    return (params.get("room", DEFAULT_ROOM),)


def on_open(conn: Connection) -> None:
    conn.join(room_of(conn))


def on_message(conn: Connection, event: dict[str, Any]) -> None:
    text = event.get("text")
    if not isinstance(text, str):
        raise EventError("bad_field", '"text" must be a string')
    ref = event.get("ref")
    # the common refs pass on their exact type (an int, a str: bool is neither), before the isinstance checks
    if ref is not None and type(ref) not in (int, str) and (
        isinstance(ref, bool) or not isinstance(ref, (str, int, float))
    ):
        raise EventError("bad_field", '"ref" must be a string or a number')
    room = conn.params.get("room", DEFAULT_ROOM)
    # publish adds "id" and "ts", refuses with "unavailable" while the store is down, and acks once stored
    conn.publish(room, {"event": "message", "room": room, "user": conn.user, "text": text}, ref)


def on_history(conn: Connection, event: dict[str, Any]) -> None:
    limit = event.get("limit", DEFAULT_HISTORY)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise EventError("bad_field", '"limit" must be a positive integer')
    before = event.get("before")
    if before is not None and not isinstance(before, str):
        raise EventError("bad_field", '"before" must be a message id (a string)')
    limit = min(limit, conn.config.history_max)
    conn.emit(History(conn.id, room_of(conn), limit, before))


endpoint = Endpoint(
    name="chat",
    rooms=rooms_of,
    on_open=on_open,
    events={"message": on_message, "history": on_history},
)
