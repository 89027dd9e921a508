"""Clients that vanish, stall or churn, and shutdown under load: bounded memory, nothing lost
for everyone else. Long variants run with ``pytest -m slow``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
import urllib.request
from collections.abc import Callable

import pytest

from tests.servers import RunningServer, spawn_server
from tests.wire import RawClient, frame, rss_kib

CHURN_CYCLES = int(os.environ.get("HUBBUB_CHURN_CYCLES", "2000"))


def healthz(server: RunningServer) -> dict:
    with urllib.request.urlopen(server.http + "/healthz", timeout=5) as response:
        return json.loads(response.read())


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_silent_peer_is_closed_by_keepalive_with_1011() -> None:
    with spawn_server("--ping-interval", "0.3", "--ping-timeout", "0.3") as server:
        silent = RawClient(server.port, "/chat?user=silent")  # reads, but never answers a ping
        assert silent.read_until_closed(timeout=5) == 1011
        assert silent.pings >= 1
        assert wait_for(lambda: healthz(server)["connections"] == 0)


def test_keepalive_closes_a_peer_that_stopped_reading_with_a_full_buffer() -> None:
    with spawn_server("--ping-interval", "0.5", "--ping-timeout", "0.5", "--max-buffer", str(64 * 1024 * 1024),
                      "--rate-limit", "0") as server:
        stalled = RawClient(server.port, "/chat/full?user=stalled")
        stalled.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sender = RawClient(server.port, "/chat/full?user=sender")
        payload = json.dumps({"event": "message", "text": "x" * 4000})
        for i in range(2000):  # ~8 MB: far more than the socket buffers hold
            sender.send_text(payload)
            if i % 50 == 0:
                sender.answer_pings()
        deadline = time.monotonic() + 10
        while healthz(server)["connections"] != 1 and time.monotonic() < deadline:
            sender.answer_pings()
            time.sleep(0.05)
        assert healthz(server)["connections"] == 1  # the stalled one is gone, the sender stays
        sender.close()
        stalled.close()


async def _read_json_messages(reader: asyncio.StreamReader, count: int) -> list[str]:
    """Parse unmasked server text frames from a stream; return the texts of chat messages."""
    texts: list[str] = []
    while len(texts) < count:
        head = await reader.readexactly(2)
        n = head[1] & 0x7F
        if n == 126:
            n = int.from_bytes(await reader.readexactly(2), "big")
        elif n == 127:
            n = int.from_bytes(await reader.readexactly(8), "big")
        payload = await reader.readexactly(n)
        if head[0] & 0x0F == 0x1:
            event = json.loads(payload)
            if event.get("event") == "message":
                texts.append(event["text"])
        elif head[0] & 0x0F == 0x8:
            raise ConnectionError(f"closed with {payload[:2].hex()}")
    return texts


async def _open(port: int, target: str, rcvbuf: int = 0) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    from tests.hub import upgrade_request

    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(upgrade_request(target))
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    return reader, writer


def test_client_that_stops_reading_in_a_storm_is_closed_1013_and_others_get_everything() -> None:
    messages, size = 8000, 1000  # 8 MB: more than the stalled client's kernel buffers and its 1 MiB --max-buffer
    with spawn_server("--rate-limit", "0", "--log-level", "debug") as server:
        async def scenario() -> tuple[list[list[str]], int]:
            readers = [await _open(server.port, f"/chat/storm?user=r{i}") for i in range(8)]
            _, stalled_writer = await _open(server.port, "/chat/storm?user=stalled", rcvbuf=4096)
            stalled_writer.transport.pause_reading()  # stops reading: the kernel buffers fill up
            sender = RawClient(server.port, "/chat/storm?user=sender")
            before = rss_kib(server.process.pid)
            reading = asyncio.gather(*(_read_json_messages(r, messages) for r, _ in readers))

            def send_all() -> None:  # paced so that this test's own Python readers keep up
                for i in range(messages):
                    sender.send_text(json.dumps({"event": "message", "text": f"{i:05d}" + "m" * size}))
                    if i % 20 == 19:
                        time.sleep(0.002)

            await asyncio.to_thread(send_all)
            received = await reading
            growth = rss_kib(server.process.pid) - before
            sender.close()
            for _, writer in readers:
                writer.close()
            stalled_writer.close()
            return received, growth

        received, growth_kib = asyncio.run(asyncio.wait_for(scenario(), 60))
        expected = [f"{i:05d}" for i in range(messages)]
        for texts in received:
            assert [t[:5] for t in texts] == expected  # every message, in order, for every other reader
        assert growth_kib < 50 * 1024, f"RSS grew by {growth_kib} KiB"
        assert wait_for(lambda: healthz(server)["connections"] == 0)
        closes = [line for line in server.output if "disconnected (1013" in line]
        assert len(closes) == 1  # the stalled client, and only it


async def _churn(port: int, cycles: int, batch: int) -> None:
    from tests.hub import upgrade_request

    async def one(i: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(upgrade_request(f"/presence?user=c{i % 50}"))
        await reader.readuntil(b"\r\n\r\n")
        writer.write(frame(b"\x03\xe8", opcode=0x8))
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass
        writer.close()

    for start in range(0, cycles, batch):
        await asyncio.gather(*(one(i) for i in range(start, min(cycles, start + batch))))


def _churn_test(cycles: int) -> None:
    with spawn_server("--max-connections", "20000") as server:
        asyncio.run(_churn(server.port, 300, 100))  # warm up allocator pools
        assert wait_for(lambda: healthz(server)["sockets"] == 1)
        before = rss_kib(server.process.pid)
        asyncio.run(asyncio.wait_for(_churn(server.port, cycles, 250), 300))

        def settled() -> bool:
            stats = healthz(server)
            return (stats["sockets"], stats["connections"], stats["rooms"], stats["presence_users"]) == (1, 0, 0, 0)

        assert wait_for(settled), healthz(server)
        growth = rss_kib(server.process.pid) - before
        assert growth < 8 * 1024, f"RSS grew by {growth} KiB after {cycles} cycles"


def test_connect_disconnect_churn_leaks_nothing() -> None:
    _churn_test(CHURN_CYCLES)


@pytest.mark.slow
def test_ten_thousand_churn_cycles_leak_nothing() -> None:
    _churn_test(10_000)


def test_sigterm_under_load_gives_every_client_1001() -> None:
    with spawn_server("--rate-limit", "0") as server:
        async def scenario() -> list[bytes]:
            clients = [await _open(server.port, f"/chat/busy?user=u{i}") for i in range(30)]
            sender = RawClient(server.port, "/chat/busy?user=sender")
            for i in range(200):
                sender.send_text(json.dumps({"event": "message", "text": str(i)}))
            server.process.send_signal(signal.SIGTERM)
            for i in range(200):  # still sending while it shuts down
                try:
                    sender.send_text(json.dumps({"event": "message", "text": str(i)}))
                except OSError:
                    break

            async def close_code(reader: asyncio.StreamReader) -> bytes:
                while True:
                    head = await reader.readexactly(2)
                    n = head[1] & 0x7F
                    if n == 126:
                        n = int.from_bytes(await reader.readexactly(2), "big")
                    payload = await reader.readexactly(n)
                    if head[0] & 0x0F == 0x8:
                        return payload[:2]

            return await asyncio.gather(*(close_code(r) for r, _ in clients))

        codes = asyncio.run(asyncio.wait_for(scenario(), 30))
        assert codes == [(1001).to_bytes(2, "big")] * 30
        assert server.process.wait(10) == 0
