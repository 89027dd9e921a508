"""``python server.py`` as a user runs it: signals, exit codes, flags from the environment."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys

import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from tests.servers import ROOT, spawn_server


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_closes_every_client_with_1001_and_exits_0(backend: str, sig: int) -> None:
    with spawn_server("--backend", backend) as server:
        async def scenario() -> list[int | None]:
            clients = [await websockets.connect(f"{server.url}/chat?user=u{i}") for i in range(5)]
            await clients[0].send(json.dumps({"event": "message", "text": "before"}))
            await clients[1].recv()
            server.process.send_signal(sig)
            codes = []
            for client in clients:
                with pytest.raises(ConnectionClosed):
                    while True:
                        await asyncio.wait_for(client.recv(), 5)
                codes.append(client.close_code)
            return codes

        codes = asyncio.run(scenario())
        assert codes == [1001] * 5
        assert server.process.wait(5) == 0


def test_flags_come_from_the_environment_too() -> None:
    with spawn_server(env={"HUBBUB_MAX_CONNECTIONS": "1"}) as server:
        async def scenario() -> int:
            async with websockets.connect(f"{server.url}/chat"):
                try:
                    async with websockets.connect(f"{server.url}/chat"):
                        return 101
                except websockets.exceptions.InvalidStatus as refused:
                    return refused.response.status_code

        assert asyncio.run(scenario()) == 503


def test_help_documents_every_limit() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "server.py"), "--help"], capture_output=True, text=True,
                         check=True).stdout
    for flag in ("--max-buffer", "--max-message-size", "--rate-limit", "--ping-interval", "--ping-timeout",
                 "--handshake-timeout", "--allowed-origins", "--no-compression", "--backend", "--max-connections"):
        assert flag in out
