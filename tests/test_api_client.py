"""``hubbub.api.Client`` against real ``server.py`` processes with ``--api-key``: every endpoint, the
error answers mapped to ``ApiError``, keep-alive (one socket for many requests, a new one when the
server closed it), threads sharing one client, https, and the key kept out of logs and ``repr``."""

from __future__ import annotations

import json
import logging
import ssl
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
from websockets.sync.client import connect

from hubbub.api import ApiError, Client
from tests.conftest import start_in_process
from tests.servers import spawn_server
from tests.services import free_port, recv_until, unique

KEY = "api-client-key-" + "y" * 20


def join(ws: object, room: str, **fields: object) -> None:
    ws.send(json.dumps({"event": "join", "room": room, "ref": "j", **fields}))  # type: ignore[attr-defined]
    assert recv_until(ws, lambda e: e.get("ref") == "j")["event"] == "joined"


def test_every_endpoint_against_a_real_server() -> None:
    room = unique("room")
    with spawn_server("--api-key", f"other,{KEY}", "--rate-limit", "0") as server, Client(server.http, KEY) as api:
        with connect(f"{server.url}/ws?user=ann") as ann, connect(f"{server.url}/ws?user=bob") as bob:
            join(ann, room, meta={"device": "phone"})
            join(bob, room)
            assert api.presence(room) == {"ann": [{"device": "phone"}], "bob": [{}]}
            acks = [api.publish(room, {"n": i}) for i in range(3)]
            acks.append(api.publish(room, "as carol", user="carol", key="k-1"))
            assert all(set(a) == {"id", "ts"} for a in acks)
            assert [a["id"] for a in acks] == sorted(a["id"] for a in acks)
            got = [recv_until(ann, lambda e: e["event"] == "message") for _ in range(4)]
            assert [m["data"] for m in got] == [{"n": 0}, {"n": 1}, {"n": 2}, "as carol"]
            assert [m["user"] for m in got] == ["server"] * 3 + ["carol"]
            # history: all, a page after, a page before, between
            page = api.history(room)
            assert [m["id"] for m in page] == [a["id"] for a in acks]
            assert [m["id"] for m in api.history(room, limit=2, after=acks[0]["id"])] == [acks[1]["id"], acks[2]["id"]]
            assert [m["id"] for m in api.history(room, limit=1, before=acks[3]["id"])] == [acks[2]["id"]]
            assert [m["id"] for m in api.history(room, before=acks[3]["id"], after=acks[0]["id"])] == \
                [acks[1]["id"], acks[2]["id"]]
            # disconnect from one room, then everywhere
            assert api.disconnect("bob", room=room) == 1
            assert recv_until(bob, lambda e: e["event"] == "left") == {"event": "left", "room": room,
                                                                        "reason": "removed"}
            assert api.disconnect("ann") == 1
            with pytest.raises(Exception) as closed:
                while True:
                    ann.recv(timeout=10)
            assert getattr(closed.value, "rcvd", None) is not None and closed.value.rcvd.code == 4001  # type: ignore[attr-defined]
            assert api.disconnect("nobody") == 0
        assert KEY not in "".join(server.output)


def test_errors_are_api_errors_with_status_and_code() -> None:
    with spawn_server("--api-key", KEY, "--max-message-size", "4096") as server, Client(server.http, KEY) as api:
        with pytest.raises(ApiError) as error:
            Client(server.http, "wrong-key").presence("r")
        assert (error.value.status, error.value.code) == (401, "unauthorized")
        assert "wrong-key" not in str(error.value)
        with pytest.raises(ApiError) as error:
            api.publish("", "x")
        assert (error.value.status, error.value.code) == (400, "bad_room")
        with pytest.raises(ApiError) as error:
            api.publish("r", 1, user="bad\nname")
        assert (error.value.status, error.value.code) == (400, "bad_field")
        with pytest.raises(ApiError) as error:
            api.history("r", limit=0)
        assert (error.value.status, error.value.code) == (400, "bad_field")
        with pytest.raises(ApiError) as error:
            api.publish("r", "x" * 5000)
        assert (error.value.status, error.value.code) == (413, "too_large")
        with pytest.raises(ApiError) as error:
            api.disconnect("")
        assert error.value.status == 400
        # still usable after every error (the connection was kept or replaced)
        assert set(api.publish("r", "fine")) == {"id", "ts"}
    with spawn_server() as server:  # the API is off without --api-key: every /api/ path is 404
        with pytest.raises(ApiError) as error:
            Client(server.http, KEY).publish("r", 1)
        assert error.value.status == 404


def test_keep_alive_one_socket_and_a_new_one_after_the_server_closed_it(tmp_path: Path) -> None:
    port = free_port()
    store = f"sqlite:///{tmp_path / 'api.db'}"
    args = ("--api-key", KEY, "--port", str(port), "--store", store)
    api = Client(f"http://127.0.0.1:{port}", KEY)
    with spawn_server(*args):
        first = [api.publish("k", i) for i in range(20)]
        assert len(api._idle) == 1  # twenty requests, one kept-alive connection
        sock = api._idle[0].sock
        api.history("k")
        assert api._idle[0].sock is sock
    # the server went away (closing the kept-alive socket) and is back on the same port
    with spawn_server(*args):
        after = api.publish("k", "after the restart")
        assert after["id"] > first[-1]["id"]
        assert [m["data"] for m in api.history("k", limit=100)] == [*range(20), "after the restart"]
    with pytest.raises(OSError):  # nobody there: a fresh connection's failure is raised, not retried forever
        api.publish("k", "nobody home")
    api.close()


def test_threads_share_one_client() -> None:
    room = unique("threads")
    with spawn_server("--api-key", KEY) as server, Client(server.http, KEY, pool_size=4) as api:
        ids: list[str] = []
        errors: list[BaseException] = []
        lock = threading.Lock()

        def work(n: int) -> None:
            try:
                for i in range(25):
                    ack = api.publish(room, {"thread": n, "i": i})
                    with lock:
                        ids.append(ack["id"])
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors and len(set(ids)) == 200
        assert len(api._idle) <= 4
        stored = api.history(room, limit=100)
        assert len(stored) == 100 and {m["id"] for m in stored} <= set(ids)


def test_https_with_an_ssl_context(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    # in this process (tests.servers reads only a ws:// listening line)
    with contextmanager(start_in_process)("asyncio", "--api-key", KEY, "--tls-cert", str(cert_file),
                                          "--tls-key", str(key_file)) as server:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        with Client(f"https://127.0.0.1:{server.port}", KEY, ssl_context=context) as api:
            assert set(api.publish("tls", "secure")) == {"id", "ts"}
            assert api.history("tls")[-1]["data"] == "secure"
        with pytest.raises(ssl.SSLError), Client(f"https://127.0.0.1:{server.port}", KEY) as untrusted:
            untrusted.presence("tls")  # the default context verifies: a private CA is refused


def test_the_key_is_never_logged_nor_shown(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    api = Client("http://127.0.0.1:1", KEY)
    assert KEY not in repr(api) and KEY not in str(vars(api).get("prefix"))
    with pytest.raises(OSError):
        api.publish("r", 1)
    assert KEY not in caplog.text
