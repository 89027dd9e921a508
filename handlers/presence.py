"""Who is online: ``/presence``.

A newcomer receives the full ``presence_state``; everyone else receives
``presence_diff`` events coalesced over ``Config.presence_window``. A user with
several connections stays present until the last one closes (the core's
presence rooms count connections per user).
"""

from __future__ import annotations

from typing import Any

from core import Connection, Endpoint

ROOM = "presence"


def on_open(conn: Connection) -> None:
    conn.join(ROOM, presence=True)


def on_list(conn: Connection, event: dict[str, Any]) -> None:
    conn.send({"event": "presence_state", "users": conn.server.presence(ROOM)})


endpoint = Endpoint(name="presence", on_open=on_open, events={"list": on_list})
