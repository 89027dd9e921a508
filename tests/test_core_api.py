"""The server API (PROTOCOL.md section 2) byte for byte, no sockets: keys, bodies and their limits,
keep-alive and pipelining, answers that wait for the store, disconnects across instances, and every
bad request answered with its status and a JSON error."""

from __future__ import annotations

import json
from typing import Any

import pytest

from hubbub import core
from hubbub.handlers import api
from tests.hub import Hub

KEY = "k-test-0123456789"
OLD_KEY = "k-old-9876543210"


class HttpPeer:
    """A raw HTTP/1.1 client on one server connection: what it sent, and h11 parsing what came back."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.conn = hub.server.connect(peer=("10.9.9.9", 5000), now=hub.now)
        hub.peers[self.conn] = self  # type: ignore[assignment]
        self.raw = b""

    def take(self, data: bytes) -> None:
        self.raw += data

    def feed(self, data: bytes) -> None:
        self.hub.server.receive(self.conn, data, self.hub.now)
        self.hub.pump()

    def responses(self) -> list[tuple[int, dict[bytes, bytes], Any]]:
        """Every whole response received since the last call: (status, headers, JSON body). Each has
        a Content-Length (h11's client would want to have sent the requests itself)."""
        out = []
        while b"\r\n\r\n" in self.raw:
            head, _, rest = self.raw.partition(b"\r\n\r\n")
            status_line, *lines = head.split(b"\r\n")
            headers = {}
            for line in lines:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers[b"content-length"])
            if len(rest) < length:
                break
            body, self.raw = rest[:length], rest[length:]
            out.append((int(status_line.split()[1]), headers, json.loads(body) if body else None))
        return out


def request(method: str, target: str, body: Any = None, key: str | None = KEY, **headers: str) -> bytes:
    """One request's bytes; a dict body is sent as JSON, bytes as they are; ``client`` marks it sent."""
    data = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
    fields = {"Host": "localhost", **({"Authorization": f"Bearer {key}"} if key else {}), **headers}
    if method == "POST" and "Transfer-Encoding" not in fields:
        fields["Content-Length"] = str(len(data))
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n"
    return head.encode() + data


def call(hub: Hub, method: str, target: str, body: Any = None, **kw: Any) -> tuple[int, dict[bytes, bytes], Any]:
    peer = HttpPeer(hub)
    peer.feed(request(method, target, body, **kw))
    [response] = peer.responses()
    return response


def api_hub(**config: Any) -> Hub:
    return Hub(http_routes=api.build([OLD_KEY, KEY]), presence_window=0.05, **config)


def test_publish_is_answered_once_stored_and_reaches_v2_and_v1_members() -> None:
    hub = api_hub()
    hub.carry_out = False  # the test plays the store, to see the answer wait for the ack
    ws = hub.join("/ws?user=w")
    ws.send_json({"event": "join", "room": "news"})
    chat = hub.join("/chat/news?user=c")
    hub.advance(0.06)
    ws.json(), chat.json()
    client = HttpPeer(hub)
    client.feed(request("POST", "/api/publish", {"room": "news", "data": {"headline": "x"}}))
    assert client.responses() == []  # not before the store has it
    [message] = [e for e in ws.json() if e["event"] == "message"]
    assert message["data"] == {"headline": "x"} and message["user"] == "server" and message["room"] == "news"
    [v1] = [e for e in chat.json() if e["event"] == "message"]
    assert v1 == message  # a v1 member sees the message as it is, with data
    effects = hub.server.effects()
    [stored] = [e for e in effects if isinstance(e, core.Stored)]
    [published] = [e for e in effects if isinstance(e, core.Publish)]
    assert published.message is stored.message and stored.message["id"] == message["id"]
    assert stored.ack is not None
    hub.server.ack([stored.ack])
    hub.pump()
    [(status, headers, body)] = client.responses()
    assert status == 200 and body == {"id": message["id"], "ts": message["ts"]}
    assert headers[b"content-type"] == b"application/json" and b"connection" not in headers  # kept alive
    assert client.conn.state is core.State.HANDSHAKE  # waiting for the next request
    assert hub.server.metrics.http[("publish", 200)] == 1


def test_keep_alive_pipelined_requests_are_answered_in_order() -> None:
    hub = api_hub()
    client = HttpPeer(hub)
    client.feed(
        request("POST", "/api/publish", {"room": "r", "data": 1, "user": "cron"})
        + request("POST", "/api/publish", {"room": "r", "data": 2})
        + request("GET", "/api/history?room=r&limit=10")
        + request("GET", "/api/presence?room=r")
    )
    got = client.responses()
    assert [status for status, _, _ in got] == [200, 200, 200, 200]
    history = got[2][2]
    assert history["room"] == "r" and [m["data"] for m in history["messages"]] == [1, 2]
    assert [m["user"] for m in history["messages"]] == ["cron", "server"]
    assert history["messages"][0]["id"] == got[0][2]["id"]
    assert got[3][2] == {"room": "r", "users": {}}
    # the same connection goes on, byte by byte
    for byte in request("POST", "/api/publish", {"room": "r", "data": 3}):
        client.feed(bytes([byte]))
    [(status, _, body)] = client.responses()
    assert status == 200 and set(body) == {"id", "ts"}


def test_pipelining_takes_a_budget_per_pass_like_frames() -> None:
    hub = api_hub(frames_per_pass=2)
    client = HttpPeer(hub)
    client.feed(b"".join(request("GET", f"/api/presence?room=r{i}") for i in range(5)))
    assert len(client.responses()) == 2 and client.conn.backlogged
    while client.conn.backlogged:
        hub.server.resume(client.conn, hub.now)
        hub.pump()
    assert [body["room"] for _, _, body in client.responses()] == ["r2", "r3", "r4"]


def test_presence_lists_users_with_their_metas_here_and_on_other_instances() -> None:
    hub = api_hub()
    ws = hub.join("/ws?user=ann")
    ws.send_json({"event": "join", "room": "lobby", "meta": {"device": "phone"}})
    hub.join("/chat/lobby?user=v1")
    hub.advance(0.06)
    hub.server.remote_presence("other-node", {"lobby": {"bob": [{"device": "laptop"}]}}, hub.now)
    status, _, body = call(hub, "GET", "/api/presence?room=lobby")
    assert status == 200 and body == {
        "room": "lobby", "users": {"ann": [{"device": "phone"}], "bob": [{"device": "laptop"}], "v1": [{}]}}


def test_history_pages_with_limit_before_and_after() -> None:
    hub = api_hub()
    ids = [call(hub, "POST", "/api/publish", {"room": "h", "data": i})[2]["id"] for i in range(5)]
    assert [m["data"] for m in call(hub, "GET", "/api/history?room=h&limit=2")[2]["messages"]] == [3, 4]
    assert [m["data"] for m in call(hub, "GET", f"/api/history?room=h&before={ids[3]}")[2]["messages"]] == [0, 1, 2]
    assert [m["data"] for m in call(hub, "GET", f"/api/history?room=h&after={ids[3]}")[2]["messages"]] == [4]


def test_keys_rotate_and_a_missing_or_wrong_key_is_401() -> None:
    hub = api_hub()
    assert call(hub, "GET", "/api/presence?room=r", key=OLD_KEY)[0] == 200
    for key in (None, "wrong", KEY + "x", KEY[:-1], ""):
        status, headers, body = call(hub, "GET", "/api/presence?room=r", key=key)
        assert status == 401 and headers[b"www-authenticate"].startswith(b"Bearer")
        assert body["error"] == "unauthorized" and KEY not in json.dumps(body)
    status, _, _ = call(hub, "GET", "/api/presence?room=r", key=None, Authorization=f"Basic {KEY}")
    assert status == 401
    counts = hub.server.metrics.http
    assert counts[("presence", 401)] == 6 and counts[("presence", 200)] == 1


@pytest.mark.parametrize(
    ("method", "target", "body", "status", "code"),
    [
        ("POST", "/api/publish", b'{"room": "r", "data": 1', 400, "bad_json"),
        ("POST", "/api/publish", b'{"room": "r", "data": NaN}', 400, "bad_json"),
        ("POST", "/api/publish", b'{"room": "r", "data": "\\ud800"}', 400, "bad_json"),
        ("POST", "/api/publish", b"\xff\xfe", 400, "bad_json"),
        ("POST", "/api/publish", b"", 400, "bad_json"),
        ("POST", "/api/publish", b"[1, 2]", 400, "not_object"),
        ("POST", "/api/publish", b"[" * 100_000, 413, "too_large"),
        ("POST", "/api/publish", {"room": "", "data": 1}, 400, "bad_room"),
        ("POST", "/api/publish", {"room": "a\nb", "data": 1}, 400, "bad_room"),
        ("POST", "/api/publish", {"room": "x" * 201, "data": 1}, 400, "bad_room"),
        ("POST", "/api/publish", {"room": 5, "data": 1}, 400, "bad_room"),
        ("POST", "/api/publish", {"room": "r"}, 400, "bad_field"),
        ("POST", "/api/publish", {"room": "r", "data": 1, "user": ""}, 400, "bad_field"),
        ("POST", "/api/publish", {"room": "r", "data": 1, "user": "a\x1b[31m"}, 400, "bad_field"),
        ("POST", "/api/publish", {"room": "r", "data": 1, "user": 7}, 400, "bad_field"),
        ("POST", "/api/publish", {"room": "r", "data": 1, "key": "k" * 65}, 400, "bad_field"),
        ("POST", "/api/publish", {"room": "r", "data": 1, "key": 1}, 400, "bad_field"),
        ("POST", "/api/publish", {"room": "r", "data": "x" * 70_000}, 413, "too_large"),
        ("GET", "/api/publish", None, 405, "method_not_allowed"),
        ("POST", "/api/presence?room=r", {}, 405, "method_not_allowed"),
        ("GET", "/api/history", None, 400, "bad_room"),
        ("GET", "/api/history?room=r&limit=0", None, 400, "bad_field"),
        ("GET", "/api/history?room=r&limit=-3", None, 400, "bad_field"),
        ("GET", "/api/history?room=r&limit=%D9%A3", None, 400, "bad_field"),  # an Arabic-Indic digit
        ("GET", "/api/history?room=%FF", None, 400, "bad_request"),
        ("GET", "/api/presence?room=%00", None, 400, "bad_room"),
        ("GET", "/api/nothing", None, 404, "not_found"),
        ("POST", "/api/disconnect", {}, 400, "bad_field"),
        ("POST", "/api/disconnect", {"user": "u", "room": ["r"]}, 400, "bad_room"),
    ],
)
def test_bad_requests_get_their_status_and_a_json_error(
    method: str, target: str, body: Any, status: int, code: str
) -> None:
    hub = api_hub()
    got_status, headers, got = call(hub, method, target, body)
    assert (got_status, got["error"]) == (status, code), got
    assert headers[b"content-type"] == b"application/json" and isinstance(got["detail"], str)
    if status == 405:
        assert headers[b"allow"] in (b"GET", b"POST")
    assert hub.server.effects() == [] or all(not isinstance(e, core.Stored) for e in hub.effects)


def test_a_chunked_body_past_the_limit_is_413_as_it_arrives() -> None:
    hub = api_hub(max_message_size=1000)
    client = HttpPeer(hub)
    client.feed(request("POST", "/api/publish", None, **{"Transfer-Encoding": "chunked"}))
    chunk = b"200\r\n" + b"x" * 0x200 + b"\r\n"
    client.feed(chunk)
    assert client.responses() == []
    client.feed(chunk)
    [(status, _, body)] = client.responses()
    assert status == 413 and body["error"] == "too_large" and client.conn.closed


def test_a_body_that_never_completes_is_408_at_the_handshake_timeout() -> None:
    hub = api_hub(handshake_timeout=5.0)
    client = HttpPeer(hub)
    client.feed(request("POST", "/api/publish", {"room": "r", "data": 1})[:-3])
    hub.advance(4.9)
    assert client.responses() == [] and not client.conn.closed
    hub.advance(0.2)
    [(status, _, body)] = client.responses()
    assert status == 408 and body["error"] == "timeout" and client.conn.closed
    assert hub.server.metrics.http[("publish", 408)] == 1


def test_an_idle_keep_alive_connection_is_dropped_at_the_handshake_timeout() -> None:
    hub = api_hub(handshake_timeout=5.0)
    client = HttpPeer(hub)
    client.feed(request("GET", "/api/presence?room=r"))
    assert len(client.responses()) == 1
    hub.advance(4.0)
    client.feed(request("GET", "/api/presence?room=r"))  # a request re-arms it
    hub.advance(4.0)
    assert len(client.responses()) == 1 and not client.conn.closed
    hub.advance(1.1)
    assert client.conn.closed and client.responses() == []


def test_connection_close_and_http_1_0_are_answered_and_closed() -> None:
    hub = api_hub()
    status, headers, _ = call(hub, "GET", "/api/presence?room=r", Connection="close")
    assert status == 200 and headers[b"connection"] == b"close"
    client = HttpPeer(hub)
    client.feed(f"GET /api/presence?room=r HTTP/1.0\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode())
    assert b"Connection: close" in client.raw and client.conn.closed


def test_store_down_is_503_and_a_failed_store_write_is_503() -> None:
    hub = api_hub()
    hub.server.set_available("store", False)
    status, _, body = call(hub, "POST", "/api/publish", {"room": "r", "data": 1})
    assert status == 503 and body["error"] == "unavailable"
    hub.server.set_available("store", True)
    hub.carry_out = False
    client = HttpPeer(hub)
    client.feed(request("POST", "/api/publish", {"room": "r", "data": 1}))
    [stored] = [e for e in hub.server.effects() if isinstance(e, core.Stored)]
    assert stored.ack is not None
    hub.server.unavailable([stored.ack], "disk full")
    hub.pump()
    [(status, _, body)] = client.responses()
    assert status == 503 and body == {"error": "unavailable", "detail": "disk full"}
    client.feed(request("GET", "/api/history?room=r"))
    [history] = [e for e in hub.server.effects() if isinstance(e, core.History)]
    hub.server.history_failed(history.conn_id, "store unreachable")
    hub.pump()
    assert client.responses()[0][0] == 503


def test_no_answer_from_the_backend_is_504_and_pipelined_requests_wait_behind_it() -> None:
    hub = api_hub()
    hub.carry_out = False
    client = HttpPeer(hub)
    client.feed(request("POST", "/api/publish", {"room": "r", "data": 1}) + request("GET", "/api/presence?room=r"))
    assert client.responses() == []
    client.feed(request("GET", "/api/presence?room=q")[:10])  # more, half a request, while it waits
    hub.advance(core.BACKEND_TIMEOUT + 0.1)
    got = client.responses()
    assert [status for status, _, _ in got] == [504, 200] and got[1][2]["room"] == "r"
    client.feed(request("GET", "/api/presence?room=q")[10:])
    assert client.responses()[0][2]["room"] == "q"
    [stored] = [e for e in hub.server.effects() if isinstance(e, core.Stored)]
    assert stored.ack is not None
    hub.server.ack([stored.ack])  # the late ack answers nothing: the request had its 504
    hub.pump()
    assert client.responses() == [] and not client.conn.closed


def test_a_client_that_pipelines_without_end_while_waiting_is_dropped() -> None:
    hub = api_hub(max_message_size=1000, max_header_bytes=1000)
    hub.carry_out = False
    client = HttpPeer(hub)
    client.feed(request("POST", "/api/publish", {"room": "r", "data": 1}))
    client.feed(b"G" * 1500)
    assert not client.conn.closed
    client.feed(b"G" * 1000)
    assert client.conn.closed


def test_disconnect_by_room_and_everywhere_and_from_another_instance() -> None:
    hub = api_hub()
    ws = hub.join("/ws?user=eve")
    for room in ("a", "b"):
        ws.send_json({"event": "join", "room": room})
    chat_a = hub.join("/chat/a?user=eve")
    chat_b = hub.join("/chat/b?user=eve")
    bystander = hub.join("/ws?user=frank")
    bystander.send_json({"event": "join", "room": "a"})
    hub.advance(0.06)
    for peer in (ws, chat_a, chat_b, bystander):
        peer.json()
    status, _, body = call(hub, "POST", "/api/disconnect", {"user": "eve", "room": "a"})
    assert status == 200 and body == {"disconnected": 2}
    assert ws.json() == [{"event": "left", "room": "a", "reason": "removed"}]
    assert chat_a.closed_with == core.CLOSE_REMOVED and chat_b.closed_with is None
    assert [r.name for r in ws.conn.rooms] == ["b"] and bystander.conn.state is core.State.OPEN
    [command] = [e for e in hub.effects if isinstance(e, core.Publish) and e.room == core.CONTROL_ROOM]
    assert command.message["user"] == "eve" and command.message["room"] == "a"
    # another instance's command: everything of eve's closed here too, and no command sent back
    hub.effects.clear()
    other = {"event": "disconnect", "user": "eve", "room": None, "id": "0" * 18 + "remote01"}
    assert hub.server.deliver(core.CONTROL_ROOM, other, node="remote01") is None
    hub.pump()
    assert ws.closed_with == core.CLOSE_REMOVED and chat_b.closed_with == core.CLOSE_REMOVED
    assert bystander.conn.state is core.State.OPEN
    assert not [e for e in hub.effects if isinstance(e, core.Publish)]
    # malformed commands are ignored; a replayed one is a duplicate
    for bad in ({"event": "disconnect", "user": 5, "id": "1" * 26}, {"event": "other", "id": "2" * 26}, {}):
        hub.server.deliver(core.CONTROL_ROOM, bad, node="remote02")
    assert bystander.conn.state is core.State.OPEN
    status, _, body = call(hub, "POST", "/api/disconnect", {"user": "frank"})
    assert body == {"disconnected": 1} and bystander.closed_with == core.CLOSE_REMOVED


def test_api_off_is_404_for_every_path_and_upgrades_still_work_after_keep_alive() -> None:
    off = Hub()
    for target in ("/api/publish", "/api/presence?room=r", "/api/x"):
        peer = HttpPeer(off)
        peer.feed(request("GET", target))
        assert peer.raw.startswith(b"HTTP/1.1 404 ") and b"application/json" not in peer.raw
    hub = api_hub()
    client = HttpPeer(hub)
    client.feed(request("GET", "/api/presence?room=r"))
    assert client.responses()[0][0] == 200
    client.feed(request("GET", "/ws?user=late", key=None, Upgrade="websocket", Connection="Upgrade",
                        **{"Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"}))
    assert client.raw.startswith(b"HTTP/1.1 101 ") and client.conn.state is core.State.OPEN


def test_an_endpoint_bug_is_a_500_and_counted_and_the_connection_goes_on() -> None:
    def broken(conn: core.Connection, request: core.HttpRequest) -> core.HttpReply:
        raise RuntimeError("bug")

    hub = Hub(http_routes={"/x/broken": core.HttpEndpoint(broken, ("GET",), "broken")})
    client = HttpPeer(hub)
    client.feed(request("GET", "/x/broken") + request("GET", "/x/nothing"))
    got = client.responses()
    assert [(status, body["error"]) for status, _, body in got] == [(500, "internal"), (404, "not_found")]
    assert hub.server.metrics.failures["http"] == 1
    assert any(isinstance(e, core.Failure) and e.where == "http" for e in hub.effects)


def test_v1_and_v2_member_sees_publish_from_api_once() -> None:
    hub = api_hub()
    both = hub.join("/ws?user=z")
    both.send_json({"event": "join", "room": "one"})
    hub.advance(0.06)
    both.json()
    call(hub, "POST", "/api/publish", {"room": "one", "data": None})
    assert [e["data"] for e in both.json() if e["event"] == "message"] == [None]


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_pipelined_bodies_cut_anywhere_are_read_by_the_fast_path_and_answered_in_order(
    chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = api_hub()
    ws = hub.join("/ws?user=w")
    ws.send_json({"event": "join", "room": "news", "presence": False})
    ws.json()
    client = HttpPeer(hub)

    def no_h11(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("an ordinary API request must not need h11")

    monkeypatch.setattr(core.h11, "Connection", no_h11)
    stream = b"".join(request("POST", "/api/publish", {"room": "news", "data": i}) for i in range(5))
    for start in range(0, len(stream), chunk):
        client.feed(stream[start:start + chunk])
    answers = client.responses()
    assert [status for status, _, _ in answers] == [200] * 5
    got = [e for e in ws.json() if e["event"] == "message"]
    assert [m["data"] for m in got] == list(range(5)) and [m["id"] for m in got] == [b["id"] for _, _, b in answers]
