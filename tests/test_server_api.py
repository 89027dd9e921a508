"""The server API over real sockets, as a backend uses it: two ``server.py`` processes on a real Redis,
``http.client`` with keep-alive (as requests/httpx pools do), ``websockets`` and raw sockets for bad input."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.servers import RunningServer, spawn_server
from tests.services import REDIS_URL, recv_until, require, unique
from tests.wire import Figure

KEY = "api-test-key-" + "x" * 20
FAST = ("--presence-heartbeat", "0.3", "--presence-ttl", "1.5", "--rate-limit", "0")


@contextmanager
def two_instances(*extra: str) -> Iterator[tuple[RunningServer, RunningServer]]:
    broker = require(REDIS_URL, 6379, "Redis")
    channel = unique("api")
    with ExitStack() as stack:
        a, b = (stack.enter_context(spawn_server("--broker", broker, "--broker-channel", channel, "--api-key",
                                                 f"old-key,{KEY}", *FAST, *extra)) for _ in range(2))
        yield a, b


class Api:
    """One keep-alive HTTP connection to a server's API."""

    def __init__(self, server: RunningServer, key: str = KEY) -> None:
        self.http = http.client.HTTPConnection(server.host, server.port, timeout=10)
        self.key = key

    def __call__(self, method: str, path: str, body: Any = None) -> tuple[int, Any, http.client.HTTPResponse]:
        headers = {"Authorization": f"Bearer {self.key}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        self.http.request(method, path, body=data, headers=headers)
        response = self.http.getresponse()
        payload = response.read()
        return response.status, json.loads(payload), response

    def close(self) -> None:
        self.http.close()


def send(ws: ClientConnection, **event: Any) -> None:
    ws.send(json.dumps(event))


def join(ws: ClientConnection, room: str, **fields: Any) -> None:
    send(ws, event="join", room=room, ref=f"j-{room}", **fields)
    assert recv_until(ws, lambda e: e.get("ref") == f"j-{room}")["event"] == "joined"


def test_publish_reaches_members_of_both_instances_and_answers_after_it_is_stored() -> None:
    room = unique("news")
    with two_instances() as (a, b):
        api = Api(a)
        with connect(f"{b.url}/ws?user=reader") as reader, connect(f"{b.url}/chat/{room}?user=v1") as v1, \
                connect(f"{a.url}/ws?user=local") as local:
            join(reader, room, meta={"device": "phone"})
            join(local, room)
            # v1 has no joined event: its presence on b, seen from a, says it is in the room
            deadline = time.monotonic() + 10
            while "v1" not in Api(a)("GET", f"/api/presence?room={room}")[1]["users"]:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            ids = []
            for i in range(20):
                status, body, response = api("POST", "/api/publish", {"room": room, "data": {"headline": i}})
                assert status == 200 and set(body) == {"id", "ts"}
                assert response.getheader("Content-Type") == "application/json"
                ids.append(body["id"])
                # answered only once stored: the message is in the history already (each instance has its
                # own memory store here: b's holds a's messages once they have crossed the broker)
                if i in (0, 7, 19):
                    status, page, _ = api("GET", f"/api/history?room={room}&limit=100")
                    assert status == 200 and page["messages"][-1]["id"] == body["id"]
            assert ids == sorted(ids)
            for ws in (reader, local):
                got = [recv_until(ws, lambda e: e["event"] == "message")["data"]["headline"] for _ in range(20)]
                assert got == list(range(20))
            v1_got = [recv_until(v1, lambda e: e["event"] == "message") for _ in range(20)]
            assert [m["data"] for m in v1_got] == [{"headline": i} for i in range(20)]
            assert all(m["user"] == "server" and m["room"] == room for m in v1_got)
        api.close()


def test_presence_lists_users_of_both_instances_with_their_metas() -> None:
    room = unique("lobby")
    with two_instances() as (a, b):
        with connect(f"{a.url}/ws?user=ann") as ann, connect(f"{b.url}/ws?user=bob") as bob:
            join(ann, room, meta={"device": "phone"})
            join(bob, room, meta={"device": "laptop"})
            deadline = time.monotonic() + 10
            api = Api(a)
            while True:
                status, body, _ = api("GET", f"/api/presence?room={room}")
                assert status == 200 and body["room"] == room
                if body["users"] == {"ann": [{"device": "phone"}], "bob": [{"device": "laptop"}]}:
                    break
                assert time.monotonic() < deadline, body
                time.sleep(0.1)
            api.close()


def test_disconnect_a_user_everywhere_and_from_one_room() -> None:
    rooms = [unique("r"), unique("r")]
    with two_instances() as (a, b):
        api = Api(a)
        with connect(f"{b.url}/ws?user=mallory") as far, connect(f"{a.url}/ws?user=mallory") as near, \
                connect(f"{b.url}/ws?user=bystander") as bystander:
            for room in rooms:
                join(far, room)
                join(near, room)
            join(bystander, rooms[0])
            status, body, _ = api("POST", "/api/disconnect", {"user": "mallory", "room": rooms[0]})
            assert status == 200 and body == {"disconnected": 1}  # this instance's count
            for ws in (near, far):
                left = recv_until(ws, lambda e: e["event"] == "left")
                assert left == {"event": "left", "room": rooms[0], "reason": "removed"}
            status, body, _ = api("POST", "/api/disconnect", {"user": "mallory"})
            assert body == {"disconnected": 1}
            for ws in (near, far):
                try:
                    while True:
                        ws.recv(timeout=10)
                except ConnectionClosed as closed:
                    assert closed.rcvd is not None and closed.rcvd.code == 4001
            send(bystander, event="presence", room=rooms[0], ref="still")
            assert recv_until(bystander, lambda e: e.get("ref") == "still")["event"] == "presence_state"
        api.close()


def test_keep_alive_pipelining_bad_input_and_metrics(figure: Figure) -> None:
    with spawn_server("--api-key", KEY, "--handshake-timeout", "1.5", "--max-message-size", "4096") as server:
        # pipelined over one socket: every answer, in order, on the same connection
        with socket.create_connection((server.host, server.port)) as sock:
            body = json.dumps({"room": "p", "data": "x"}).encode()
            one = (f"POST /api/publish HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer {KEY}\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
            sock.sendall(one * 50)
            received = b""
            deadline = time.monotonic() + 10
            while received.count(b"HTTP/1.1 200 OK") < 50 and time.monotonic() < deadline:
                received += sock.recv(65536)
            assert received.count(b"HTTP/1.1 200 OK") == 50 and b"Connection: close" not in received
        # a body that never completes: 408 at the handshake timeout, then the socket closes
        with socket.create_connection((server.host, server.port)) as sock:
            sock.sendall((f"POST /api/publish HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer {KEY}\r\n"
                          "Content-Length: 100\r\n\r\n{").encode())
            sock.settimeout(10)
            started = time.monotonic()
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 408 ") and b'"error":"timeout"' in answer
            assert 1.0 < time.monotonic() - started < 8
        api = Api(server)
        status, body, _ = api("POST", "/api/publish", {"room": "p", "data": "x" * 5000})
        assert status == 413 and body["error"] == "too_large"
        api = Api(server, key="wrong")
        status, body, response = api("GET", "/api/presence?room=p")
        assert status == 401 and response.getheader("WWW-Authenticate", "").startswith("Bearer")
        metrics = http.client.HTTPConnection(server.host, server.port, timeout=10)
        metrics.request("GET", "/metrics")
        text = metrics.getresponse().read().decode()
        assert 'hubbub_api_requests_total{endpoint="publish",status="200"} 50.0' in text
        assert 'hubbub_api_requests_total{endpoint="publish",status="408"} 1.0' in text
        assert 'hubbub_api_requests_total{endpoint="presence",status="401"} 1.0' in text
        assert KEY not in text and KEY not in "".join(server.output)
    figure("API: 50 pipelined publishes on one keep-alive socket answered in order; 408 on a stalled body")


def test_api_is_off_without_a_key() -> None:
    with spawn_server() as server:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
        conn.request("POST", "/api/publish", body=b"{}", headers={"Authorization": f"Bearer {KEY}"})
        assert conn.getresponse().status == 404
