"""Security at the handshake over real sockets: cross-site WebSocket hijacking is refused."""

from __future__ import annotations

import asyncio

import pytest
import websockets
from websockets.exceptions import InvalidStatus

from tests.servers import spawn_server


async def status_for(url: str, origin: str | None) -> int:
    try:
        async with websockets.connect(url, origin=origin):  # type: ignore[arg-type]
            return 101
    except InvalidStatus as refused:
        return refused.response.status_code


@pytest.mark.parametrize(
    ("flags", "origin", "status"),
    [
        ((), None, 101),
        ((), "http://evil.example", 403),
        ((), "http://127.0.0.1:{port}", 101),
        (("--allowed-origins", "https://app.example"), "https://app.example", 101),
        (("--allowed-origins", "https://app.example"), "http://127.0.0.1:{port}", 403),
        (("--allowed-origins", "https://app.example"), "https://evil.example", 403),
    ],
)
def test_origin_policy_over_the_wire(flags: tuple[str, ...], origin: str | None, status: int) -> None:
    with spawn_server(*flags) as server:
        origin = origin.format(port=server.port) if origin else None
        assert asyncio.run(status_for(f"{server.url}/chat?user=x", origin)) == status
