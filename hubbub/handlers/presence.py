"""Who is online: ``/presence``.

Joins and leaves coalesce over ``Config.presence_window``: when the window ends,
the connections that joined during it receive the full ``presence_state`` and
everyone else one ``presence_diff`` (see ``core.Rooms.end_window``). A user with
several connections stays present until the last one closes (the core's
presence rooms count connections per user).
"""

from __future__ import annotations

from typing import Any

from hubbub.core import Connection, Endpoint

ROOM = "presence"


def on_open(conn: Connection) -> None:
    conn.join(ROOM, presence=True)


def on_list(conn: Connection, event: dict[str, Any]) -> None:
    conn.reply({"event": "presence_state", "users": conn.presence(ROOM)})


endpoint = Endpoint(name="presence", on_open=on_open, events={"list": on_list})
