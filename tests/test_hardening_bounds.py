"""Bounds over real sockets (``server.py`` in a subprocess): big replies that fit, per-address limits,
Host checks, and what a client that stops reading costs."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.hub import upgrade_request
from tests.servers import RunningServer, spawn_server
from tests.wire import Figure, RawClient, assert_still_serves, frame


@pytest.fixture
def sqlite_server(tmp_path: Path) -> Iterator[RunningServer]:
    """The default store, as a user runs it."""
    with spawn_server("--store", f"sqlite:///{tmp_path / 'hubbub.db'}") as running:
        yield running


def test_a_poisoned_history_is_answered_in_pages_that_fit(sqlite_server: RunningServer, figure: Figure) -> None:
    """60 incompressible 60 KB messages (3.6 MB of history) used to make every later history reply larger than
    --max-buffer, so the requester was closed 1013 as a slow consumer, over and over."""
    poisoner = RawClient(sqlite_server.port, "/chat/poisoned?user=mallory")
    try:
        for i in range(60):
            text = os.urandom(30_000).hex()  # 60,000 incompressible characters, within the 64 KiB limit as JSON
            poisoner.send_text(json.dumps({"event": "message", "text": text, "ref": i}))
        acks = [json.loads(m) for m in poisoner.read_messages(60, timeout=20)]
        assert sum(1 for a in acks if a["event"] == "ack") == 60, acks[-3:]
    finally:
        poisoner.close()
    with connect(f"{sqlite_server.url}/chat/poisoned?user=alice", max_size=None) as reader:
        seen: list[str] = []
        before = None
        pages = received = 0
        while True:
            request = {"event": "history", "limit": 100, **({"before": before} if before else {})}
            reader.send(json.dumps(request))
            answer = reader.recv(timeout=10)
            received += len(answer)
            page = json.loads(answer)
            assert page["event"] == "history", page
            pages += 1
            seen = [m["id"] for m in page["messages"]] + seen
            if not page.get("truncated"):
                break
            before = page["messages"][0]["id"]
        assert len(seen) == len(set(seen)) == 60  # every message once, and the reader never closed 1013
        assert seen == sorted(seen)
        figure(f"{received / 1e6:.1f} MB of history read in {pages} pages, each within --max-buffer; "
               "the reader stayed open")


def test_presence_state_larger_than_the_buffer_still_reaches_newcomers(figure: Figure) -> None:
    """Many long user names make a presence list bigger than --max-buffer: it is a reply the client
    asked for (it connected), so it is sent, not counted as a slow consumer; and a handshake with a
    frame in the same write gets its HTTP 101 before anything else."""
    with spawn_server("--max-buffer", "32768", "--presence-window", "0.01") as running:
        names = [f"{i:03d}" + "n" * 250 for i in range(200)]  # ~51 KB of names, over the 32 KiB buffer
        members = [RawClient(running.port, f"/presence?user={name}") for name in names]
        try:
            time.sleep(0.3)
            with socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
                sock.sendall(upgrade_request("/presence?user=late") + frame(b'{"event":"list"}'))
                answer = b""
                deadline = time.monotonic() + 10
                while answer.count(b'"presence_state"') < 2 and time.monotonic() < deadline:
                    chunk = sock.recv(1 << 20)
                    if not chunk:
                        break
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 101 "), answer[:100]
            assert answer.count(b'"presence_state"') == 2  # the list asked for, and the newcomer's state
            assert b"\x88" not in answer[:200]  # no close frame up front
            figure(f"presence list of {len(names) + 1} users, {len(answer) // 1024} KiB received with a 32 KiB buffer")
        finally:
            for member in members:
                member.close()
        assert_still_serves(running)


def status_of(url: str) -> int:
    try:
        with connect(url, open_timeout=5):
            return 101
    except InvalidStatus as refused:
        return refused.response.status_code


def test_one_address_cannot_take_every_connection(figure: Figure) -> None:
    with spawn_server("--max-connections-per-address", "20", "--max-connections", "100") as running:
        clients = [RawClient(running.port, f"/chat?user=u{i}") for i in range(20)]
        try:
            with socket.create_connection(("127.0.0.1", running.port), timeout=5) as sock:
                sock.sendall(upgrade_request("/chat?user=one-too-many"))
                answer = sock.recv(4096)
            assert answer.startswith(b"HTTP/1.1 429 "), answer
            assert b"Retry-After: 5" in answer
            # another address is still served (127.0.0.2 is loopback too)
            other = socket.create_connection(("127.0.0.1", running.port), source_address=("127.0.0.2", 0))
            other.sendall(upgrade_request("/chat?user=elsewhere"))
            assert other.recv(4096).startswith(b"HTTP/1.1 101 ")
            other.close()
            figure("21st connection from one address: HTTP 429 with Retry-After; another address: 101")
        finally:
            for client in clients:
                client.close()
        time.sleep(0.3)
        assert status_of(f"{running.url}/chat?user=again") == 101  # the count went down as they closed


def test_allowed_hosts_refuse_a_dns_rebinding_page(figure: Figure) -> None:
    """A page on evil.example whose name was rebound to our address sends Host and Origin both
    evil.example: the Origin check cannot tell (same host), the Host check does."""
    with spawn_server("--allowed-hosts", "chat.example,*.chat.example,localhost") as running:
        rebinding = status_of_with(running, "evil.example", "http://evil.example")
        assert rebinding == 400
        assert status_of_with(running, "chat.example:8765", "http://chat.example:8765") == 101
        assert status_of_with(running, "eu.chat.example", None) == 101
        assert status_of_with(running, "chat.example.evil", None) == 400
        figure(f"Host evil.example (rebinding): HTTP {rebinding}; listed hosts: 101")
        assert_still_serves(running)
    with spawn_server() as running:  # unset: any Host, as before
        assert status_of_with(running, "evil.example", None) == 101


def status_of_with(running: RunningServer, host: str, origin: str | None) -> int:
    headers = {"Host": host, **({"Origin": origin} if origin else {})}
    with socket.create_connection(("127.0.0.1", running.port), timeout=5) as sock:
        sock.sendall(upgrade_request("/chat?user=x", **headers))
        return int(sock.recv(4096).split(b" ", 2)[1])


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_reader_that_stops_costs_about_max_buffer(backend: str, figure: Figure) -> None:
    """The kernel would grow a stalled socket's send buffer to 4 MiB on its own; hubbub sizes it (and
    the transport's high-water mark) so that little beyond --max-buffer goes to a reader that stopped."""
    with spawn_server("--rate-limit", "0", "--backend", backend) as running:
        stalled = RawClient(running.port, "/chat/stall?user=stalled")
        sender = RawClient(running.port, "/chat/stall?user=sender")
        message = frame(json.dumps({"event": "message", "text": "x" * 4000}).encode())
        for i in range(1000):  # 4 MB
            sender.send(message)
            if i % 50 == 0:
                time.sleep(0.01)
        time.sleep(0.5)
        received = 0
        stalled.sock.settimeout(3)
        tail = b""
        try:
            while chunk := stalled.sock.recv(1 << 20):
                received += len(chunk)
                tail = (tail + chunk)[-64:]
        except (TimeoutError, ConnectionResetError):
            pass
        stalled.close()
        sender.close()
        assert b"\x03\xf5slow consumer" in tail  # the close frame: 1013
        assert received < 1024 * 1024 + 512 * 1024, received  # it was ~4.3 MB with the kernel's sizing
        figure(f"{backend}: {received / 1024:.0f} KiB reached the reader that stopped before its 1013 close")
