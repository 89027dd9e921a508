"""``/ws``: protocol v2 (PROTOCOL.md section 1): one socket, many rooms, presence per room with metadata.

A client joins and leaves rooms at run time (``join``, ``leave``), publishes any JSON ``data`` to a
room it is in (``publish``: acked once stored, as v1's messages), pages a room's history
(``history``: ``limit``, ``before``, ``after``), asks for a room's presence (``presence``) and changes
its own metadata there (``presence_update``), and renews its token (``refresh``). Every reply to a
request, success or error, carries the request's ``ref``; errors also name its ``room``.

This module is the route's policy, written against ``core.Connection``'s API only: what a field
must be, who may join or publish where (a token's ``rooms`` and ``publish`` claims, glob patterns;
``--read-only-rooms``), how many rooms one connection may be in. The core does the rest: membership,
presence windows (``joined`` with everyone's presence, ``presence_diff``), fan-out, acks.

v1 and v2 share rooms: a ``/chat/{room}`` member is in the room of that name, present with the
metadata ``{}``, and sees ``/ws`` messages as they are (with ``data``); ``/ws`` members see v1's
messages as they are (with ``text``).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from typing import Any

from hubbub.core import MAX_NAME_BYTES, NO_META, Connection, Endpoint, EventError, History, compact

MAX_META_BYTES = 1024
"""A connection's presence metadata in a room, as encoded JSON (PROTOCOL.md: at most 1 KiB)."""
MAX_KEY_BYTES = 64
"""An idempotency ``key`` on a publish (PROTOCOL.md)."""
DEFAULT_HISTORY = 50


def _ref(event: Mapping[str, Any]) -> Any:
    """The request's ``ref``: a string or a number, or absent."""
    ref = event.get("ref")
    # the common refs pass on their exact type (an int, a str: bool is neither), before the isinstance checks
    if ref is not None and type(ref) not in (int, str) and (
        isinstance(ref, bool) or not isinstance(ref, (str, int, float))
    ):
        raise EventError("bad_field", '"ref" must be a string or a number')
    return ref


def _room(event: Mapping[str, Any], ref: Any) -> str:
    """The request's room (``check_room``)."""
    return check_room(event.get("room"), ref)


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def check_room(room: Any, ref: Any = None) -> str:
    """A room name: 1 to 200 bytes of UTF-8 without control characters (``EventError`` ``bad_room``)."""
    if not isinstance(room, str):
        raise EventError("bad_room", '"room" must be a string', ref)
    if not 0 < len(room.encode()) <= MAX_NAME_BYTES or _CONTROL.search(room):
        raise EventError("bad_room", f"a room name is 1 to {MAX_NAME_BYTES} bytes without control characters", ref)
    return room


def _patterns(conn: Connection, claim: str, ref: Any, room: str) -> list[str] | None:
    """A token claim of room patterns (a glob or a list of them); None: the token has no such claim."""
    value = conn.claims.get(claim)
    if value is None:
        return None
    patterns = [value] if isinstance(value, str) else value
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise EventError("forbidden", f"the token's {claim!r} claim is not a list of room patterns", ref, room)
    return patterns


def may_join(conn: Connection, room: str, ref: Any = None) -> bool:
    """The token's ``rooms`` claim (if any) covers ``room``."""
    patterns = _patterns(conn, "rooms", ref, room)
    return patterns is None or any(fnmatch.fnmatchcase(room, p) for p in patterns)


def may_publish(conn: Connection, room: str, ref: Any = None) -> bool:
    """The token's ``publish`` claim (default: its ``rooms`` claim) covers ``room``, and ``--read-only-rooms``
    does not."""
    read_only = conn.config.read_only_rooms
    if read_only and any(fnmatch.fnmatchcase(room, p) for p in read_only):
        return False
    patterns = _patterns(conn, "publish", ref, room)
    if patterns is None:
        return may_join(conn, room, ref)
    return any(fnmatch.fnmatchcase(room, p) for p in patterns)


def _meta(conn: Connection, event: Mapping[str, Any], ref: Any, room: str) -> bytes:
    """The request's ``meta`` as encoded JSON: an object of at most ``MAX_META_BYTES`` (default ``{}``)."""
    meta = event.get("meta", None)
    if meta is None:
        return NO_META
    if not isinstance(meta, dict):
        raise EventError("bad_field", '"meta" must be a JSON object', ref, room)
    encoded = conn.config.codec.dumps(meta)
    if len(encoded) > MAX_META_BYTES:
        raise EventError("bad_field", f'"meta" is over {MAX_META_BYTES} bytes as JSON', ref, room)
    return compact(encoded)  # kept for as long as the membership lasts


def _joined_room(conn: Connection, ref: Any, room: str) -> None:
    if not conn.in_room(room):
        raise EventError("not_joined", "join the room first", ref, room)


def on_join(conn: Connection, event: dict[str, Any]) -> None:
    ref = _ref(event)
    room = _room(event, ref)
    if not may_join(conn, room, ref):
        raise EventError("forbidden", "this token may not join this room", ref, room)
    meta = _meta(conn, event, ref, room)
    watch = event.get("presence", True)
    if not isinstance(watch, bool):
        raise EventError("bad_field", '"presence" must be true or false', ref, room)
    since = event.get("since")
    if since is not None and not isinstance(since, str):
        raise EventError("bad_field", '"since" must be a message id (a string)', ref, room)
    limit = conn.config.max_rooms_per_connection
    if not conn.in_room(room) and len(conn.rooms) + conn.joining() >= limit:
        raise EventError("too_many_rooms", f"a connection may be in at most {limit} rooms", ref, room)
    conn.enter(room, meta, watch, ref, since)


def on_leave(conn: Connection, event: dict[str, Any]) -> None:
    ref = _ref(event)
    room = _room(event, ref)
    if not conn.leave(room):
        raise EventError("not_joined", "not in this room", ref, room)
    reply: dict[str, Any] = {"event": "left", "room": room}
    if ref is not None:
        reply["ref"] = ref
    conn.send(reply)


def on_publish(conn: Connection, event: dict[str, Any]) -> None:
    ref = _ref(event)
    room = _room(event, ref)
    if "data" not in event:
        raise EventError("bad_field", '"data" is missing (any JSON value)', ref, room)
    key = event.get("key")
    if key is not None and (not isinstance(key, str) or len(key.encode()) > MAX_KEY_BYTES):
        raise EventError("bad_field", f'"key" must be a string of at most {MAX_KEY_BYTES} bytes', ref, room)
    _joined_room(conn, ref, room)
    if not may_publish(conn, room, ref):
        raise EventError("forbidden", "publishing to this room is not allowed", ref, room)
    # publish adds "id" and "ts", refuses while the store is down, and acks (with ts) once stored
    message = {"event": "message", "room": room, "user": conn.user, "data": event["data"]}
    conn.publish(room, message, ref, v2=True, key=key)


def on_history(conn: Connection, event: dict[str, Any]) -> None:
    ref = _ref(event)
    room = _room(event, ref)
    if not may_join(conn, room, ref):
        raise EventError("forbidden", "this token may not read this room", ref, room)
    limit = event.get("limit", DEFAULT_HISTORY)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise EventError("bad_field", '"limit" must be a positive integer', ref, room)
    bounds = []
    for name in ("before", "after"):
        bound = event.get(name)
        if bound is not None and not isinstance(bound, str):
            raise EventError("bad_field", f'"{name}" must be a message id (a string)', ref, room)
        bounds.append(bound)
    conn.emit(History(conn.id, room, min(limit, conn.config.history_max), bounds[0], bounds[1], ref))


def on_presence(conn: Connection, event: dict[str, Any]) -> None:
    ref = _ref(event)
    room = _room(event, ref)
    if not may_join(conn, room, ref):
        raise EventError("forbidden", "this token may not see this room", ref, room)
    dumps = conn.config.codec.dumps
    head = b'{"event":"presence_state","room":' + dumps(room) + (b',"ref":' + dumps(ref) if ref is not None else b"")
    conn.reply_raw(head + b',"users":' + conn.presence_json(room) + b"}")


def on_presence_update(conn: Connection, event: dict[str, Any]) -> None:
    ref = _ref(event)
    room = _room(event, ref)
    if "meta" not in event:
        raise EventError("bad_field", '"meta" is missing (a JSON object)', ref, room)
    if not conn.update_meta(room, _meta(conn, event, ref, room)):
        raise EventError("not_joined", "not in this room", ref, room)


def on_refresh(conn: Connection, event: dict[str, Any]) -> None:
    ref = _ref(event)
    token = event.get("token")
    if not isinstance(token, str) or not token:
        raise EventError("bad_field", '"token" must be a string', ref)
    try:
        user, claims, expires = conn.verify(token)
    except EventError as exc:
        raise EventError(exc.code, exc.detail, ref) from None
    if user != conn.user:
        raise EventError("forbidden", "the token is for another user", ref)
    conn.renew(claims, expires)
    for room in [each.name for each in conn.rooms]:
        if not may_join(conn, room):
            conn.leave(room)
            conn.send({"event": "left", "room": room, "reason": "forbidden"})
    reply: dict[str, Any] = {"event": "refreshed", "exp": None if expires is None else int(expires)}
    if ref is not None:
        reply["ref"] = ref
    conn.send(reply)


endpoint = Endpoint(
    name="ws",
    events={
        "join": on_join,
        "leave": on_leave,
        "publish": on_publish,
        "history": on_history,
        "presence": on_presence,
        "presence_update": on_presence_update,
        "refresh": on_refresh,
    },
    warns_expiry=True,
    refs=True,
    joins=True,
)
