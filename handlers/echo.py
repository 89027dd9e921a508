"""``/echo``: every text or binary message comes back as it was (up to 16 MiB).

This is the route the Autobahn TestSuite runs against, and a quick way to
check a client library or a proxy in front of hubbub.
"""

from __future__ import annotations

from core import Connection, Endpoint


def on_raw(conn: Connection, message: str | bytes) -> None:
    conn.send_message(message)


def build(max_message_size: int) -> Endpoint:
    return Endpoint(name="echo", on_raw=on_raw, max_message_size=max_message_size)
