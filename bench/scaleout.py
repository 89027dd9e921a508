"""Messages per second between two hubbub instances through a broker (Redis by default).

Starts two ``server.py`` processes sharing the broker, puts publishers on A and
subscribers on B in one room, sends as fast as the publishers can, and reports how
many messages per second crossed the broker (each counted once) and how many
deliveries per second B made, after checking that every subscriber got every message
exactly once and in each publisher's order.

    python bench/scaleout.py --broker redis://127.0.0.1:6379/0 --publishers 4 --subscribers 10 --messages 5000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import websockets

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.servers import spawn_server


async def run(args: argparse.Namespace, a_url: str, b_url: str) -> dict[str, float]:
    room = f"bench-{uuid.uuid4().hex[:8]}"
    subs = [await websockets.connect(f"{b_url}/chat/{room}?user=s{i}", max_size=None, compression=None)
            for i in range(args.subscribers)]
    pubs = [await websockets.connect(f"{a_url}/chat/{room}?user=p{i}", compression=None)
            for i in range(args.publishers)]
    # wait until B hears A: a probe message from A must arrive at B
    probe = await websockets.connect(f"{a_url}/chat/{room}?user=probe", compression=None)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        await probe.send(json.dumps({"event": "message", "text": "probe"}))
        try:
            await asyncio.wait_for(subs[0].recv(), 0.2)
            break
        except TimeoutError:
            continue
    await probe.close()
    await asyncio.sleep(0.5)
    for ws in subs + pubs:  # drain probes
        while True:
            try:
                await asyncio.wait_for(ws.recv(), 0.05)
            except TimeoutError:
                break
    total = args.publishers * args.messages
    text = "x" * args.size

    async def publish(i: int, ws: websockets.ClientConnection) -> None:
        for n in range(args.messages):
            await ws.send(f'{{"event":"message","text":"{text}","ref":"{i}:{n}"}}')

    async def drain_acks(ws: websockets.ClientConnection) -> None:
        acks = 0  # publishers are room members too: they also get each other's messages
        while acks < args.messages:
            acks += '"event":"ack"' in await ws.recv()

    async def receive(ws: websockets.ClientConnection) -> list[tuple[str, str]]:
        got = []
        for _ in range(total):
            event = json.loads(await ws.recv())
            got.append((event["user"], event["id"]))
        return got

    receivers = [asyncio.create_task(receive(ws)) for ws in subs]
    ackers = [asyncio.create_task(drain_acks(ws)) for ws in pubs]
    started = time.perf_counter()
    await asyncio.gather(*(publish(i, ws) for i, ws in enumerate(pubs)))
    results = await asyncio.gather(*receivers)
    elapsed = time.perf_counter() - started
    await asyncio.gather(*ackers)
    for got in results:
        assert len(got) == total and len(set(got)) == total, "a message was lost or repeated"
        for p in range(args.publishers):
            ids = [i for user, i in got if user == f"p{p}"]
            assert ids == sorted(ids) and len(ids) == args.messages, "a publisher's order was broken"
    for ws in subs + pubs:
        await ws.close()
    return {"seconds": elapsed, "messages_per_s": total / elapsed, "deliveries_per_s": total * len(subs) / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--store", default="memory", help="the instances' --store (memory isolates the broker)")
    parser.add_argument("--publishers", type=int, default=4)
    parser.add_argument("--subscribers", type=int, default=10)
    parser.add_argument("--messages", type=int, default=5000, help="per publisher")
    parser.add_argument("--size", type=int, default=64, help="characters of text per message")
    args = parser.parse_args()
    channel = f"bench-{uuid.uuid4().hex[:8]}"
    flags = ["--broker", args.broker, "--broker-channel", channel, "--store", args.store, "--rate-limit", "0",
             "--max-buffer", str(256 * 1024 * 1024), "--log-level", "warning"]
    with ExitStack() as stack:
        a = stack.enter_context(spawn_server(*flags))
        b = stack.enter_context(spawn_server(*flags))
        result = asyncio.run(run(args, a.url, b.url))
    print(
        f"{args.publishers} publishers on A -> {args.subscribers} subscribers on B via {args.broker.split(':')[0]}, "
        f"{args.publishers * args.messages} messages of {args.size} chars, store {args.store}: "
        f"{result['messages_per_s']:,.0f} messages/s through the broker, "
        f"{result['deliveries_per_s']:,.0f} deliveries/s on B ({result['seconds']:.2f} s); "
        "every message once and in order"
    )


if __name__ == "__main__":
    main()
