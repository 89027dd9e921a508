"""The server API (PROTOCOL.md section 2): how an application backend talks to the clients.

``POST /api/publish``, ``GET /api/history``, ``GET /api/presence`` and ``POST /api/disconnect``, on
the server's own port, on only when ``--api-key`` gives at least one key (``build`` returns no
routes otherwise, so every ``/api/`` path is 404). Every request carries ``Authorization: Bearer
KEY``; keys are compared in constant time, each against every configured key (several keys let
one be rotated out while the next is in use), and a key is never logged or counted.

These are ``core.HttpEndpoint`` handlers, written against ``core.Connection``'s API like the
WebSocket routes: the core reads the body (bounded by ``--max-message-size``, within
``--handshake-timeout``), keeps the connection alive between requests, and answers a publish once
the store has it (the ack) and a history request once the store has read it.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from hubbub.core import (
    Connection,
    EventError,
    History,
    HttpEndpoint,
    HttpError,
    HttpReply,
    HttpRequest,
)
from hubbub.handlers.ws import MAX_KEY_BYTES, check_room

_BEARER = (("WWW-Authenticate", 'Bearer realm="hubbub"'),)
SERVER_USER = "server"
"""The ``user`` of a message published through the API without one."""

ApiHandler = Callable[[Connection, HttpRequest], HttpReply | None]


def _authorized(keys: tuple[bytes, ...]) -> Callable[[ApiHandler], ApiHandler]:
    """Wrap a handler: 401 without a configured key, and ``EventError`` (a bad field) as 400."""

    def wrap(handler: ApiHandler) -> ApiHandler:
        def checked(conn: Connection, request: HttpRequest) -> HttpReply | None:
            scheme, _, given = request.headers.get(b"authorization", b"").partition(b" ")
            given = given.strip()
            matched = False
            for key in keys:  # every key compared, in constant time: neither which nor how much matched leaks
                matched |= hmac.compare_digest(given, key)
            if scheme.lower() != b"bearer" or not given or not matched:
                raise HttpError(401, "unauthorized", "a valid API key is required (Authorization: Bearer KEY)",
                                _BEARER)
            try:
                return handler(conn, request)
            except EventError as exc:
                raise HttpError(400, exc.code, exc.detail) from None

        checked.__doc__ = handler.__doc__
        return checked

    return wrap


def _json_body(conn: Connection, request: HttpRequest) -> dict[str, Any]:
    """The request's body: a strict JSON object (400 ``bad_json`` or ``not_object`` otherwise)."""
    try:
        value = conn.config.codec.loads(request.body.decode("utf-8"))
    except UnicodeDecodeError:
        raise HttpError(400, "bad_json", "the body is not UTF-8") from None
    except RecursionError:
        raise HttpError(400, "bad_json", "JSON nested too deeply") from None
    except ValueError as exc:
        raise HttpError(400, "bad_json", f"invalid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise HttpError(400, "not_object", "the body must be a JSON object")
    return value


def _user(conn: Connection, value: Any, default: str | None) -> str:
    """A ``user`` field: a name as a token's ``sub`` could be (``bad_field``)."""
    if value is None and default is not None:
        return default
    limit = conn.config.max_user_bytes
    if (
        not isinstance(value, str)
        or not 0 < len(value.encode("utf-8", "surrogatepass")) <= limit
        or any(c < " " or "\x7f" <= c <= "\x9f" or "\ud800" <= c <= "\udfff" for c in value)
    ):
        raise HttpError(400, "bad_field", f'"user" must be a name of 1 to {limit} bytes without control characters')
    return value


def _json(conn: Connection, value: Any) -> HttpReply:
    return 200, conn.config.codec.dumps(value), "application/json"


def publish(conn: Connection, request: HttpRequest) -> HttpReply | None:
    """``POST /api/publish {"room", "data", "user"?, "key"?}``: answered ``{"id", "ts"}`` once stored."""
    body = _json_body(conn, request)
    room = check_room(body.get("room"))
    if "data" not in body:
        raise HttpError(400, "bad_field", '"data" is missing (any JSON value)')
    user = _user(conn, body.get("user"), SERVER_USER)
    key = body.get("key")
    if key is not None and (not isinstance(key, str) or len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES):
        raise HttpError(400, "bad_field", f'"key" must be a string of at most {MAX_KEY_BYTES} bytes')
    if not conn.available("store"):
        raise HttpError(503, "unavailable", "the message store is unreachable: not sent")
    if key is not None and (seen := conn.repeat(room, user, key)) is not None:
        return 200, conn.config.codec.dumps({"id": seen[0], "ts": seen[1]}), "application/json"
    message = {"event": "message", "room": room, "user": user, "data": body["data"]}
    try:
        conn.publish(room, message, ref="api", v2=True, key=key)  # the ack answers the request
    except EventError as exc:
        raise HttpError(413, "too_large", exc.detail) from None
    return None


def history(conn: Connection, request: HttpRequest) -> HttpReply | None:
    """``GET /api/history?room=R&limit=N&before=ID&after=ID``: ``{"room", "messages"}``, oldest first."""
    query = request.query
    room = check_room(query.get("room"))
    limit_text = query.get("limit", "50")
    if not (limit_text.isascii() and limit_text.isdigit()) or int(limit_text) < 1:
        raise HttpError(400, "bad_field", '"limit" must be a positive integer')
    limit = min(int(limit_text), conn.config.history_max)
    conn.emit(History(conn.id, room, limit, query.get("before"), query.get("after")))
    return None


def presence(conn: Connection, request: HttpRequest) -> HttpReply:
    """``GET /api/presence?room=R``: ``{"room", "users": {USER: [META, ...]}}`` on every instance."""
    room = check_room(request.query.get("room"))
    return 200, b'{"room":' + conn.config.codec.dumps(room) + b',"users":' + conn.presence_json(room) + b"}", \
        "application/json"


def disconnect(conn: Connection, request: HttpRequest) -> HttpReply:
    """``POST /api/disconnect {"user", "room"?}``: ``{"disconnected": N}``, this instance's count."""
    body = _json_body(conn, request)
    user = _user(conn, body.get("user"), None)
    room = body.get("room")
    if room is not None:
        room = check_room(room)
    return _json(conn, {"disconnected": conn.disconnect(user, room)})


def build(keys: Iterable[str]) -> Mapping[str, HttpEndpoint]:
    """The API's routes for ``Server(http_routes=...)``: none without a key (the API is off)."""
    encoded = tuple(key.encode() for key in keys if key)
    if not encoded:
        return {}
    guard = _authorized(encoded)
    return {
        "/api/publish": HttpEndpoint(guard(publish), ("POST",), "publish"),
        "/api/history": HttpEndpoint(guard(history), ("GET",), "history"),
        "/api/presence": HttpEndpoint(guard(presence), ("GET",), "presence"),
        "/api/disconnect": HttpEndpoint(guard(disconnect), ("POST",), "disconnect"),
    }


def parse_keys(text: str | None) -> list[str]:
    """``--api-key`` (or ``HUBBUB_API_KEY``): keys separated by commas, blanks ignored."""
    return [key.strip() for key in (text or "").split(",") if key.strip()]
