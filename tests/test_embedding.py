"""README's "Embedding the core" example, run as written: a plain asyncio Protocol drives the core."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import types

import websockets

from tests.servers import ROOT


def readme_example() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Embedding the core", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README lost its embedding example"
    return match.group(1)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_readme_embedding_example_serves_chat() -> None:
    module = types.ModuleType("embedded_example")
    exec(compile(readme_example(), "README.md", "exec"), module.__dict__)
    port = free_port()

    async def scenario() -> None:
        server = asyncio.create_task(module.serve(port))
        for _ in range(100):
            try:
                alice = await websockets.connect(f"ws://127.0.0.1:{port}/chat?user=alice")
                break
            except OSError:
                await asyncio.sleep(0.02)
        async with alice, websockets.connect(f"ws://127.0.0.1:{port}/chat?user=bob") as bob:
            await alice.send(json.dumps({"event": "message", "text": "embedded", "ref": 7}))
            assert json.loads(await bob.recv())["text"] == "embedded"
            assert json.loads(await alice.recv())["event"] == "ack"
        server.cancel()

    asyncio.run(asyncio.wait_for(scenario(), 20))
