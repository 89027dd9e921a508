"""hubbub's thin anyio shell: sockets, timers, signals and the CLI around ``core.Server``.

It does and never decides: bytes from each socket go to the core, the core's
output goes back out, its effects go to the backends. Runs on anyio's asyncio
backend (with uvloop when installed) or on trio (``--backend trio``).

Write path: after each input the shell wakes one flusher, which runs once per
loop pass and writes every connection that gained output with one non-blocking
``send`` each, however many messages it gained; only a socket whose kernel
buffer is full gets a task that waits for writability. No broadcast ever
awaits per recipient.

    python server.py --port 8765
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

import anyio
from anyio.abc import TaskGroup

import core
from backends.store import MemoryStore
from handlers import build_router, page

log = logging.getLogger("hubbub")

RECV_SIZE = 256 * 1024
LINGER = 2.0  # seconds we keep reading after our FIN, so the peer sees our close frame, not a reset


class Socket:
    """The shell's side of one connection: its socket and what the kernel would not take yet."""

    __slots__ = ("drain", "scope", "sock", "unsent")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.unsent = b""
        self.scope = anyio.CancelScope()  # the connection's task; cancelled when the core closes it
        self.drain: anyio.CancelScope | None = None  # the drain task, while the kernel buffer is full


class Shell:
    """Drives one ``core.Server`` over real sockets."""

    def __init__(self, server: core.Server, store: MemoryStore) -> None:
        self.server = server
        self.store = store
        self.sockets: dict[core.Connection, Socket] = {}
        self._flush_needed = anyio.Event()
        self._timer_wake = anyio.Event()
        self._timer_at = float("inf")
        self._tg: TaskGroup | None = None
        self.listener: socket.socket | None = None

    # -- tasks --------------------------------------------------------------

    async def run(self, listener: socket.socket, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; SIGINT/SIGTERM close every client with 1001 first."""
        self.listener = listener
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._accept_loop, listener)
            tg.start_soon(self._flusher)
            tg.start_soon(self._timers)
            task_status.started()

    async def shutdown(self, grace: float = 2.0) -> None:
        """Stop accepting, close every client with 1001, give them ``grace`` seconds to answer."""
        if self.listener is not None:
            anyio.notify_closing(self.listener)
            self.listener.close()
        self.server.close_all(1001, "server shutting down")
        self._flush()
        with anyio.move_on_after(grace):
            while self.sockets:
                await anyio.sleep(0.02)
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    async def _accept_loop(self, listener: socket.socket) -> None:
        assert self._tg is not None
        while True:
            try:
                await anyio.wait_readable(listener)
            except (anyio.ClosedResourceError, OSError):
                return
            for _ in range(256):
                try:
                    sock, peer = listener.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:  # e.g. EMFILE: log it and let the loop breathe
                    log.warning("accept failed: %s", exc)
                    await anyio.sleep(0.1)
                    break
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._tg.start_soon(self._connection, sock, peer)

    async def _connection(self, sock: socket.socket, peer: Any) -> None:
        server = self.server
        conn = server.connect(peer, time.time())
        io = self.sockets[conn] = Socket(sock)
        log.debug("conn %d %s: connected", conn.id, peer)
        try:
            with io.scope:
                while not conn.closed:
                    await anyio.wait_readable(sock)
                    try:
                        data = sock.recv(RECV_SIZE)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        data = b""
                    server.receive(conn, data, time.time())
                    self._after_input()
            await self._close_socket(conn, io)
        finally:
            self.sockets.pop(conn, None)
            if not conn.closed:  # cancelled from outside (shutdown): the socket is gone
                server.receive(conn, b"", time.time())
                self._after_input()
            sock.close()
            self._log_end(conn, peer)

    async def _close_socket(self, conn: core.Connection, io: Socket) -> None:
        """Write what is left, send FIN, and read until the peer closes too (or LINGER passes)."""
        sock = io.sock
        if io.drain is not None:  # one writer per socket: stop the drain task and take over
            io.drain.cancel()
            while io.drain is not None:
                await anyio.sleep(0)
        data = io.unsent + conn.data_to_send()
        io.unsent = b""
        with anyio.move_on_after(LINGER):
            while data:
                try:
                    sent = sock.send(data)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:
                    return
                data = data[sent:]
                if data:
                    await anyio.wait_writable(sock)
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                return
            while True:
                await anyio.wait_readable(sock)
                try:
                    if not sock.recv(RECV_SIZE):
                        return
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    return

    def _log_end(self, conn: core.Connection, peer: Any) -> None:
        if conn.status is not None and conn.status >= 400:
            log.info("conn %d %s: refused with HTTP %d", conn.id, peer, conn.status)
        elif conn.status == 101:
            log.debug("conn %d %s: disconnected (%s %s)", conn.id, peer, conn.close_code, conn.close_reason)
        else:
            log.debug("conn %d %s: closed", conn.id, peer)

    def _after_input(self) -> None:
        """Once per input: queue a flush for this loop pass and re-arm the timer if it moved closer."""
        if not self._flush_needed.is_set():
            self._flush_needed.set()
        deadline = self.server.next_deadline
        if deadline is not None and deadline < self._timer_at:
            self._timer_wake.set()

    async def _flusher(self) -> None:
        while True:
            await self._flush_needed.wait()
            self._flush_needed = anyio.Event()
            self._flush()

    async def _timers(self) -> None:
        server = self.server
        while True:
            deadline = server.tick(time.time())
            self._flush()
            self._timer_at = deadline if deadline is not None else time.time() + 1.0
            self._timer_wake = anyio.Event()
            with anyio.move_on_after(max(0.0, self._timer_at - time.time())):
                await self._timer_wake.wait()

    # -- the write path ---------------------------------------------------------

    def _flush(self) -> None:
        """Carry out effects, then write every connection that gained output: one send each."""
        server = self.server
        if server._effects:
            self._run_effects(server.effects())
        sockets = self.sockets
        for conn in server.pending():
            io = sockets.get(conn)
            if io is None:
                continue
            if conn.closed:
                io.scope.cancel()  # its task writes the rest and closes
                continue
            if io.drain is not None:
                continue  # the kernel is full; the drain task pulls from the core when it can
            data = conn.data_to_send()
            if not data:
                continue
            try:
                sent = io.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                continue  # the reader sees the error and closes the connection
            if sent < len(data):
                io.unsent = data[sent:]
                io.drain = anyio.CancelScope()
                assert self._tg is not None
                self._tg.start_soon(self._drain, conn, io)

    async def _drain(self, conn: core.Connection, io: Socket) -> None:
        """A slow reader: wait for room in its socket, then keep pulling from the core."""
        sock = io.sock
        assert io.drain is not None
        try:
            with io.drain:
                while io.unsent and not conn.closed:
                    await anyio.wait_writable(sock)
                    try:
                        sent = sock.send(io.unsent)
                    except (BlockingIOError, InterruptedError):
                        continue
                    io.unsent = io.unsent[sent:]
                    if not io.unsent:
                        io.unsent = conn.data_to_send()
        except (OSError, anyio.ClosedResourceError):
            pass  # the connection's own task sees the socket fail and closes it
        finally:
            io.drain = None

    def _run_effects(self, effects: list[core.Effect]) -> None:
        for effect in effects:
            if isinstance(effect, core.Stored):
                self.store.add(effect.room, effect.message)
            elif isinstance(effect, core.History):
                messages = self.store.history(effect.room, effect.limit, effect.before)
                self.server.history_reply(effect.conn_id, effect.room, messages)
            elif isinstance(effect, core.HandlerFailed):
                log.error("conn %d: handler failed", effect.conn_id, exc_info=effect.error)


# -- the command line -----------------------------------------------------------


def listen(host: str, port: int, backlog: int = 4096) -> socket.socket:
    """A non-blocking listening socket (IPv6 when the host says so)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def _env(name: str) -> str | None:
    return os.environ.get("HUBBUB_" + name.upper().replace("-", "_"))


def build_parser() -> argparse.ArgumentParser:
    """Shell flags plus one flag per ``core.Config`` field; each also from ``HUBBUB_<FLAG>``."""
    parser = argparse.ArgumentParser(
        prog="python server.py",
        description="hubbub: a real-time WebSocket server (chat rooms, presence, echo).",
        epilog="Every flag can also be set from the environment: --max-buffer as HUBBUB_MAX_BUFFER, etc.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--host", default=_env("host") or "127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=int(_env("port") or 8765), help="TCP port (0: any free port)")
    parser.add_argument(
        "--backend", choices=("asyncio", "trio"), default=_env("backend") or "asyncio",
        help="event loop (asyncio uses uvloop when it is installed)",
    )
    parser.add_argument(
        "--log-level", default=_env("log_level") or "info",
        choices=("debug", "info", "warning", "error"), help="logging level of the 'hubbub' logger",
    )
    parser.add_argument(
        "--no-compression", action="store_true", default=_truthy(_env("no_compression")),
        help="never negotiate permessage-deflate",
    )
    parser.add_argument(
        "--allowed-origins", default=_env("allowed_origins"),
        help="comma-separated Origins allowed to connect ('*' for any); "
        "default: the server's own host, plus clients that send no Origin",
    )
    skip = {"compression", "allowed_origins", "node"}
    for f in dataclasses.fields(core.Config):
        if f.name in skip:
            continue
        flag = f.name.replace("_", "-")
        kind = type(f.default)
        env = _env(f.name)
        parser.add_argument(
            f"--{flag}", type=kind, default=kind(env) if env is not None else f.default,
            help=f.metadata.get("help", ""),
        )
    return parser


def _truthy(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes", "on")


def config_from(args: argparse.Namespace) -> core.Config:
    values = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(core.Config)
        if f.name not in ("compression", "allowed_origins", "node")
    }
    origins = None
    if args.allowed_origins:
        origins = tuple(o.strip().lower() for o in args.allowed_origins.split(",") if o.strip())
    return core.Config(
        **values,
        compression=not args.no_compression,
        allowed_origins=origins,
        node=os.urandom(2).hex(),
    )


async def serve(
    args: argparse.Namespace, *, handle_signals: bool = True, task_status: Any = anyio.TASK_STATUS_IGNORED
) -> None:
    """Listen and serve; with ``handle_signals``, SIGINT/SIGTERM shut down cleanly (main thread only)."""
    config = config_from(args)
    server = core.Server(build_router(config), config, http_routes={"/": page.index})
    shell = Shell(server, MemoryStore())
    listener = listen(args.host, args.port)
    host, port = listener.getsockname()[:2]
    async with anyio.create_task_group() as tg:
        await tg.start(shell.run, listener)
        if handle_signals:
            await tg.start(_on_signals, shell)
        task_status.started((shell, port))
        log.info("serving on %s:%d with the %s backend", host, port, args.backend)
        print(f"hubbub listening on ws://{host}:{port}", flush=True)
    log.info("hubbub stopped")


async def _on_signals(shell: Shell, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            log.info("received %s: closing every connection with 1001", signal.Signals(signum).name)
            await shell.shutdown()
            return


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    backend_options: dict[str, Any] = {}
    if args.backend == "asyncio":
        try:
            import uvloop  # noqa: F401  (optional: a faster event loop when installed)
        except ImportError:
            pass
        else:
            backend_options["use_uvloop"] = True
    try:
        anyio.run(serve, args, backend=args.backend, backend_options=backend_options)
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
