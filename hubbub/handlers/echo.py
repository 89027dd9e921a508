"""``/echo``: every text or binary message comes back as it was (up to 16 MiB).

This is the route the Autobahn TestSuite runs against, and a quick way to
check a client library or a proxy in front of hubbub.
"""

from __future__ import annotations

from hubbub.core import Connection, Endpoint


def on_raw(conn: Connection, message: str | bytes) -> None:
    conn.send_message(message)


def build(max_message_size: int, max_buffer: int) -> Endpoint:
    """The echo route: messages up to ``max_message_size``, and an outbound buffer that holds one
    such message on top of the usual ``max_buffer`` backlog (else any echo over max_buffer is 1013)."""
    return Endpoint(
        name="echo", on_raw=on_raw, max_message_size=max_message_size, max_buffer=max_buffer + max_message_size
    )
