"""README's "Embedding the core" example, run as written: a plain asyncio Protocol drives the core."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import types

import websockets

from tests.hub import upgrade_request
from tests.servers import ROOT
from tests.wire import frame


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


def test_readme_embedding_example_handles_a_burst_over_one_budget() -> None:
    """100 messages in one write (the core's budget is 64 frames a pass): the example's shell
    resumes the backlogged connection, so every one is delivered, in order."""
    module = types.ModuleType("embedded_example")
    exec(compile(readme_example(), "README.md", "exec"), module.__dict__)
    port = free_port()

    async def scenario() -> None:
        server = asyncio.create_task(module.serve(port))
        for _ in range(100):
            try:
                reader = await websockets.connect(f"ws://127.0.0.1:{port}/chat/burst?user=r")
                break
            except OSError:
                await asyncio.sleep(0.02)
        async with reader:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(upgrade_request("/chat/burst?user=s"))
            writer.write(b"".join(frame(json.dumps({"event": "message", "text": str(i)}).encode()) for i in range(100)))
            texts = [json.loads(await reader.recv())["text"] for _ in range(100)]
            assert texts == [str(i) for i in range(100)]
            writer.close()
        server.cancel()

    asyncio.run(asyncio.wait_for(scenario(), 20))
