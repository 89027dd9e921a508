"""hubbub's thin anyio shell: sockets, timers, signals and the CLI around ``core.Server``.

It does and never decides: bytes from each socket go to the core, the core's
output goes back out, its effects go to the backends. Runs on anyio's asyncio
backend (with uvloop when installed) or on trio (``--backend trio``).

Connections: on asyncio (uvloop when installed) each one is a ``TransportLink``, an
asyncio Protocol whose ``data_received`` feeds the core directly (no task, no await per
read); on trio each one is a ``SocketLink``, a task reading a non-blocking socket.

Write path: after each input the shell wakes one flusher, which runs once per loop pass:
each connection's own output first, with one write each however many messages it gained,
then each room's broadcasts of the pass as one bytes object, the very same object written
to every member (``core.Server.take_shared``). Nothing awaits per recipient: a socket the
kernel will not take more from is left to its transport (or drain task), and what follows
stays in the core, counted against ``--max-buffer``.

Effects go to ``Backends``: ``Stored`` and ``History`` to a ``StoreWorker``
(batched, in a worker thread; acks go back to the core once a batch commits),
``Publish`` and ``PresenceChanged`` to the broker, whose messages come back
through ``Server.deliver`` and ``Server.remote_presence``.

Who owns what: ``TransportLink`` / ``SocketLink`` one socket each (reads into the core,
writes out of it, the closing linger); ``Backends`` the store worker, the broker and their
probes; ``Shell`` the pump (one flush per loop pass, the timer loop, held backlogged links)
and the start and stop of it all; the command line at the bottom builds them.

    python server.py --port 8765
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import faulthandler
import gc
import importlib.util
import json
import logging
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import anyio
import orjson
from anyio.abc import TaskGroup

from hubbub import core
from hubbub.backends.broker import MemoryBroker, PubSubBroker, open_broker
from hubbub.backends.store import (
    DEFAULT_RETENTION,
    MemoryStore,
    SQLiteStore,
    Store,
    StoreWorker,
    open_store,
    parse_retention,
)
from hubbub.handlers import api, build_router, page

log = logging.getLogger("hubbub")

ORJSON = core.Codec("orjson", orjson.loads, orjson.dumps)
"""The JSON the server runs with: orjson is strict by itself (it refuses NaN, Infinity, numbers that
overflow and lone surrogates, and never writes NaN) and, measured on the receive path of a room of 3,
takes 65,000 instructions per message against the standard library's 104,000
(``python -m bench.instructions``)."""

try:
    from websockets.speedups import apply_mask as UNMASK
except ImportError:  # websockets built without its C speedup (a platform with no wheel): the core's own XOR
    UNMASK = None
"""How the receive fast path unmasks a client frame (``core.Server(unmask=...)``): websockets' C loop
takes about 2,400 instructions for a 100-byte chat message where the core's integer XOR takes 10,000
(``python -m bench.instructions``: 73,200 -> 65,400 per message in a room of 3)."""

RECV_SIZE = 256 * 1024
LINGER = 2.0  # seconds we keep reading after our FIN, so the peer sees our close frame, not a reset
HIGH_WATER = 64 * 1024  # bytes a transport buffers before the core keeps the rest (counted against --max-buffer)
SEND_BUFFER = 64 * 1024
"""SO_SNDBUF of each client socket. Left to itself the kernel grows a socket's send buffer up to 4 MiB
(net.ipv4.tcp_wmem), so a client that stops reading would hold that much of our memory before
``--max-buffer`` ever counted a byte; the kernel doubles what is set here for its bookkeeping.
Measured (a reader that stops, 4 KB messages): 4.1-4.6 MB reached it before its 1013 close with the
kernel's own sizing, 0.35 MB with this (and ``HIGH_WATER``); the server holds at most
``--max-buffer`` plus about 200 KiB for it."""


def _size_send_buffer(sock: Any) -> None:
    if sock is not None and SEND_BUFFER:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        except OSError:  # not a TCP socket (a Unix socket in a test, say): leave it as it is
            pass


def _on_asyncio() -> bool:
    """True when anyio runs on asyncio (uvloop included), where connections take the Protocol fast path."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def log_end(conn: core.Connection) -> None:
    """One debug (or, for a refusal, info) line when a connection's socket is done."""
    if conn.status is not None and conn.status >= 400:
        log.info("conn %d %s: refused with HTTP %d", conn.id, conn.peer, conn.status)
    elif conn.status == 101:
        log.debug(
            "conn %d %s: disconnected (%s %s)", conn.id, conn.peer, conn.close_code, core.printable(conn.close_reason)
        )
    else:
        log.debug("conn %d %s: closed", conn.id, conn.peer)


# -- TLS: one layer for both backends ---------------------------------------------------


PLAIN_HTTP_ANSWER = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 49\r\n"
    b"Connection: close\r\n\r\nThis port speaks TLS: use https:// or wss:// here.\n"
)
"""What a plain HTTP request on the TLS port gets (as nginx does): a real answer, not a reset."""


class TLSError(Exception):
    """A TLS handshake failed; ``reason`` is the counter it goes to (see ``TLS.failures``)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _load_context(cert: str, key: str) -> ssl.SSLContext:
    """A server context with the ssl module's secure defaults, TLS 1.2 at least, no renegotiation, ALPN
    ``http/1.1`` (WebSocket upgrades and the plain HTTP routes speak HTTP/1.1). ValueError says which
    file is wrong and how."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols(["http/1.1"])
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        if not os.path.isfile(path):
            raise ValueError(f"{flag} {path}: no such file")
        if not os.access(path, os.R_OK):
            raise ValueError(f"{flag} {path}: not readable by this user")
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        why = {"KEY_VALUES_MISMATCH": "the key does not belong to the certificate"}.get(
            exc.reason or "", "not a PEM certificate chain and private key"
        )
        raise ValueError(f"--tls-cert {cert} / --tls-key {key}: {why} ({exc.reason or exc})") from None
    except OSError as exc:
        raise ValueError(f"--tls-cert {cert} / --tls-key {key}: {exc}") from None
    return context


def _not_after(cert: str) -> float | None:
    """When the first certificate of ``cert`` expires (Unix seconds), or None if it cannot be read."""
    try:
        from cryptography import x509

        with open(cert, "rb") as f:
            return x509.load_pem_x509_certificate(f.read()).not_valid_after_utc.timestamp()
    except Exception:  # the context loaded it: this figure is only for the log and /metrics
        return None


class TLS:
    """The server's TLS: its context, reloaded from the same files on SIGHUP (connections already open
    keep theirs), and what happened at handshakes, for ``/metrics``.

    ``failures`` counts handshakes that never completed, by reason: ``plain_http`` (an HTTP request on
    the TLS port, answered 400), ``protocol`` (garbage, an unsupported version or cipher, a bad
    certificate on the client's side), ``timeout`` (no complete handshake and request within
    ``--handshake-timeout``: the core's handshake timer starts at the TCP accept, so it bounds the TLS
    handshake too), ``eof`` (the client closed mid-handshake, or before sending anything).
    """

    def __init__(self, cert: str, key: str) -> None:
        self.cert, self.key = cert, key
        self.context = _load_context(cert, key)
        self.not_after = _not_after(cert)
        self.handshakes = 0  # completed
        self.failures = {"plain_http": 0, "protocol": 0, "timeout": 0, "eof": 0}
        self.record_errors = 0  # connections whose TLS broke after the handshake (a bad record, say)
        self.reloads = 0
        self.reload_failures = 0
        self.loaded_at = time.time()
        self._warn_expiry()

    def session(self) -> TLSSession:
        return TLSSession(self.context)

    def reload(self) -> bool:
        """Load the files again (SIGHUP); on failure keep serving with the old context."""
        try:
            context = _load_context(self.cert, self.key)
        except ValueError as exc:
            self.reload_failures += 1
            log.error("TLS: reload failed, still serving the previous certificate: %s", exc)
            return False
        self.context = context
        self.not_after = _not_after(self.cert)
        self.reloads += 1
        self.loaded_at = time.time()
        log.warning("TLS: reloaded %s and %s; connections already open keep their session", self.cert, self.key)
        self._warn_expiry()
        return True

    def failed(self, exc: TLSError, peer: Any) -> None:
        self.failures[exc.reason] += 1
        log.info("TLS handshake with %s failed (%s): %s", peer, exc.reason, exc)

    def _warn_expiry(self) -> None:
        if self.not_after is None:
            return
        days = (self.not_after - time.time()) / 86400
        if days < 0:
            log.error("TLS: the certificate %s expired %.0f days ago", self.cert, -days)
        elif days < 14:
            log.warning("TLS: the certificate %s expires in %.1f days", self.cert, days)


class TLSSession:
    """One connection's TLS, on memory buffers (``ssl.SSLObject``): ciphertext from the socket in,
    plaintext for the core out, and back. No socket of its own, so both backends' links use it the
    same way, and their write paths (high-water marks, ``SO_SNDBUF``, drain tasks) see ciphertext only."""

    __slots__ = ("_in", "_out", "closed", "obj", "ready")

    def __init__(self, context: ssl.SSLContext) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self._in, self._out, server_side=True)
        self.ready = False  # the handshake is done
        self.closed = False  # the peer sent close_notify, or the session broke

    def receive(self, data: bytes) -> bytes:
        """Ciphertext in; the plaintext it completes out (b"" while the handshake runs, or when the
        peer closed: ``closed`` says which). TLSError when the handshake fails; ssl.SSLError when an
        established session breaks. Call ``pending`` after: the handshake has answers to send."""
        self._in.write(data)
        obj = self.obj
        if not self.ready:
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                return b""
            except ssl.SSLError as exc:
                if exc.reason == "HTTP_REQUEST":
                    raise TLSError("plain_http", "a plain HTTP request on the TLS port") from None
                if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
                    raise TLSError("eof", "closed during the handshake") from None
                raise TLSError("protocol", exc.reason or str(exc)) from None
            self.ready = True
        chunks = []
        while True:
            try:
                chunk = obj.read(RECV_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.closed = True
                break
            if not chunk:
                break
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def pending(self) -> bytes:
        """Ciphertext the session wants sent (handshake messages, session tickets, alerts)."""
        return self._out.read()

    def encrypt(self, data: bytes) -> bytes:
        """Plaintext from the core as ciphertext for the socket."""
        try:
            self.obj.write(data)
        except ssl.SSLError:  # the session broke (or was closed): nothing more can go out
            self.closed = True
        return self._out.read()

    def close_notify(self) -> bytes:
        """Our side's close_notify alert (after the close frame), if the session is up."""
        if self.ready and not self.closed:
            try:
                self.obj.unwrap()
            except ssl.SSLError:  # SSLWantReadError: the peer's alert has not come; ours is written all the same
                pass
        return self._out.read()


# -- connections: one link per socket, asyncio or trio ---------------------------------


class TransportLink(asyncio.Protocol):
    """One connection on the asyncio backend: a Protocol on its transport, no task of its own.

    Bytes go straight from ``data_received`` into the core, and out through ``transport.write``
    (uvloop's, when installed, writes at once and buffers only what the kernel refuses). Past
    ``HIGH_WATER`` buffered bytes the transport pauses us: the core keeps what follows, counted
    against ``--max-buffer``, until ``resume_writing``.
    """

    __slots__ = ("_linger", "blocked", "conn", "send", "shell", "transport")

    def __init__(self, shell: Shell) -> None:
        self.shell = shell
        self.blocked = False
        self._linger: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        self.send = transport.write
        transport.set_write_buffer_limits(high=HIGH_WATER)
        _size_send_buffer(transport.get_extra_info("socket"))
        shell = self.shell
        self.conn = conn = shell.server.connect(transport.get_extra_info("peername"), time.time())
        conn.shell = self
        shell.links[conn] = self
        shell.rearm()  # its handshake deadline may come before the timer's (a client that never sends)
        log.debug("conn %d %s: connected", conn.id, conn.peer)

    def data_received(self, data: bytes) -> None:
        shell = self.shell
        shell.server.receive(self.conn, data, time.time())
        if self.conn.backlogged:
            shell.hold(self)
        shell.after_input()

    def eof_received(self) -> bool:
        if not self.conn.closed:
            self.shell.server.receive(self.conn, b"", time.time())
            self.shell.after_input()
        return False  # the transport closes once what it buffered is written

    def connection_lost(self, exc: Exception | None) -> None:
        shell = self.shell
        conn = self.conn
        shell.links.pop(conn, None)
        if self._linger is not None:
            self._linger.cancel()
        if not conn.closed:
            shell.server.receive(conn, b"", time.time())
            shell.after_input()
        log_end(conn)

    def pause_writing(self) -> None:
        self.blocked = True

    def resume_writing(self) -> None:
        self.blocked = False
        data = self.conn.data_to_send()
        if data:
            self.send(data)
        if self.conn.closed:
            self.finish()

    def pause_reading(self) -> None:
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def abort(self) -> None:
        self.transport.abort()

    def finish(self) -> None:
        """The core closed the connection: write the rest, send FIN, and keep reading until the
        peer closes too (or ``LINGER`` passes), so it sees our close frame rather than a reset."""
        transport = self.transport
        if transport.is_closing() or self._linger is not None:
            return
        data = self.conn.data_to_send()
        if data:
            transport.write(data)
        if transport.can_write_eof():
            self._half_close()
        else:
            transport.close()

    def _half_close(self) -> None:
        """FIN after what is written, then linger; a peer already gone (reset) is simply dropped."""
        transport = self.transport
        try:
            transport.write_eof()
        except OSError:  # ENOTCONN: the peer reset the connection before our FIN
            transport.abort()
            return
        self._linger = asyncio.get_running_loop().call_later(LINGER, transport.abort)


class TLSTransportLink(TransportLink):
    """A ``TransportLink`` for a TLS port: the same Protocol on the raw TCP transport, with a
    ``TLSSession`` between it and the core. The transport's high-water mark and ``SO_SNDBUF`` count
    ciphertext; ``--max-buffer`` counts what the core queued, as without TLS. The core is told of the
    connection at the TCP accept, so its handshake timer bounds the TLS handshake and the HTTP request
    together (``finish`` counts the ones that never finished the TLS part)."""

    __slots__ = ("_counted", "stats", "tls")

    def __init__(self, shell: Shell, tls: TLS) -> None:
        super().__init__(shell)
        self.stats = tls
        self.tls = tls.session()
        self._counted = False  # this connection's handshake outcome is counted

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.send = self._send_encrypted

    def _send_encrypted(self, data: bytes) -> None:
        self.transport.write(self.tls.encrypt(data))

    def data_received(self, data: bytes) -> None:
        tls = self.tls
        ready = tls.ready
        try:
            plain = tls.receive(data)
        except TLSError as exc:
            self._handshake_failed(exc)
            return
        except ssl.SSLError:  # an established session broke: the peer is gone for us
            self.stats.record_errors += 1
            tls.closed, plain = True, b""
        out = tls.pending()
        if out:
            self.transport.write(out)
        if tls.ready and not ready:
            self._counted = True
            self.stats.handshakes += 1
        if plain:
            TransportLink.data_received(self, plain)
        if tls.closed and not self.conn.closed:
            TransportLink.eof_received(self)

    def _handshake_failed(self, exc: TLSError) -> None:
        """Count it, answer a plain HTTP request with a 400, and drop the socket."""
        self._counted = True
        self.stats.failed(exc, self.conn.peer)
        transport = self.transport
        if exc.reason == "plain_http":
            transport.write(PLAIN_HTTP_ANSWER)
        transport.close()  # what is buffered (the answer) goes out first
        TransportLink.eof_received(self)  # the core forgets the connection

    def eof_received(self) -> bool:
        if not self.tls.ready and not self._counted:
            self._counted = True
            self.stats.failures["eof"] += 1
        return TransportLink.eof_received(self)

    def finish(self) -> None:
        transport = self.transport
        if transport.is_closing() or self._linger is not None:
            return
        if not self.tls.ready:  # never got past TLS: the core gave up on it (the handshake timeout)
            if not self._counted and not self.shell.stopping:
                self._counted = True
                self.stats.failures["timeout"] += 1
            transport.abort()
            return
        data = self.conn.data_to_send()
        transport.write((self.tls.encrypt(data) if data else b"") + self.tls.close_notify())
        self._half_close()


class SocketLink:
    """One connection on any anyio backend (trio included): a task that reads its non-blocking
    socket (``run``) and non-blocking sends; only while the kernel buffer is full does a drain task
    wait to write. It mirrors ``TransportLink``: the same core calls, in a task of its own."""

    __slots__ = ("_counted", "conn", "drain", "scope", "shell", "sock", "stats", "tls", "unsent")

    def __init__(self, shell: Shell, sock: socket.socket, peer: Any, tls: TLS | None = None) -> None:
        self.shell = shell
        self.sock = sock
        # on a TLS port, a TLSSession between the socket and the core (as in TLSTransportLink)
        self.stats = tls
        self.tls = tls.session() if tls is not None else None
        self._counted = False  # this connection's TLS handshake outcome is counted
        self.conn = conn = shell.server.connect(peer, time.time())
        conn.shell = self
        shell.links[conn] = self
        shell.rearm()  # its handshake deadline may come before the timer's (a client that never sends)
        self.unsent = b""
        self.scope = anyio.CancelScope()  # the connection's task; cancelled when the core closes it
        self.drain: anyio.CancelScope | None = None  # the drain task, which owns the socket's writes
        log.debug("conn %d %s: connected", conn.id, peer)

    @property
    def blocked(self) -> bool:
        """The kernel buffer is full: the drain task pulls from the core when it takes more."""
        return self.drain is not None

    async def run(self) -> None:
        """Read the socket into the core until the core closes the connection, then close it well."""
        shell, server, conn, sock = self.shell, self.shell.server, self.conn, self.sock
        try:
            with self.scope:
                while not conn.closed:
                    await anyio.wait_readable(sock)
                    try:
                        data = sock.recv(RECV_SIZE)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        data = b""
                    if self.tls is not None:
                        data = self._decrypt(data)
                        if data is None:
                            continue  # the TLS handshake goes on (or failed, and the core was told)
                    server.receive(conn, data, time.time())
                    shell.after_input()
                    while conn.backlogged:  # its budget is spent: let every other task run first
                        await anyio.sleep(0)
                        server.resume(conn, time.time())
                        shell.after_input()
            await self._close_socket()
        finally:
            shell.links.pop(conn, None)
            if not conn.closed:  # cancelled from outside (shutdown): the socket is gone
                server.receive(conn, b"", time.time())
                shell.after_input()
            sock.close()
            log_end(conn)

    def _decrypt(self, data: bytes) -> bytes | None:
        """Ciphertext (b"": the peer closed TCP) as plaintext for the core (b"": the connection is over),
        or None when there is nothing for the core yet."""
        tls, stats = self.tls, self.stats
        assert tls is not None and stats is not None
        if not data:
            if not tls.ready and not self._counted:
                self._counted = True
                stats.failures["eof"] += 1
            return b""
        ready = tls.ready
        try:
            plain = tls.receive(data)
        except TLSError as exc:
            self._counted = True
            stats.failed(exc, self.conn.peer)
            if exc.reason == "plain_http":
                self._send_raw(PLAIN_HTTP_ANSWER)
            return b""
        except ssl.SSLError:
            stats.record_errors += 1
            return b""
        out = tls.pending()
        if out:
            self._send_raw(out)
        if tls.ready and not ready:
            self._counted = True
            stats.handshakes += 1
        if tls.closed:
            return b""
        return plain or None

    def send(self, data: bytes) -> None:
        self._send_raw(self.tls.encrypt(data) if self.tls is not None else data)

    def _send_raw(self, data: bytes) -> None:
        if self.drain is not None:  # the drain task owns the socket's writes: behind what it holds
            self.unsent += data
            return
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            return  # the reader sees the error and closes the connection
        if sent < len(data):
            self.unsent = data[sent:]
            self.drain = anyio.CancelScope()
            self.shell.start_soon(self._drain)

    def finish(self) -> None:
        tls = self.tls
        if tls is not None and not tls.ready and not self._counted and not self.shell.stopping:
            self._counted = True  # never got past TLS: the core gave up on it (the handshake timeout)
            self.stats.failures["timeout"] += 1
        self.scope.cancel()  # the connection's task writes the rest and closes

    def _wire(self, data: bytes) -> bytes:
        """What the core queued, as it goes on the socket (encrypted on a TLS port)."""
        return self.tls.encrypt(data) if self.tls is not None and data else data

    async def _drain(self) -> None:
        """A slow reader: wait for room in its socket, then keep pulling from the core."""
        sock = self.sock
        conn = self.conn
        assert self.drain is not None
        try:
            with self.drain:
                while self.unsent and not conn.closed:
                    await anyio.wait_writable(sock)
                    try:
                        sent = sock.send(self.unsent)
                    except (BlockingIOError, InterruptedError):
                        continue
                    self.unsent = self.unsent[sent:]
                    if not self.unsent:
                        self.unsent = self._wire(conn.data_to_send())
        except (OSError, anyio.ClosedResourceError):
            pass  # the connection's own task sees the socket fail and closes it
        finally:
            self.drain = None

    async def _close_socket(self) -> None:
        """Write what is left, send FIN, and read until the peer closes too (or LINGER passes)."""
        sock = self.sock
        if self.drain is not None:  # one writer per socket: stop the drain task and take over
            self.drain.cancel()
            while self.drain is not None:
                await anyio.sleep(0)
        data = self.unsent + self._wire(self.conn.data_to_send())
        if self.tls is not None:
            data += self.tls.close_notify() if self.tls.ready else b""
        self.unsent = b""
        with anyio.move_on_after(LINGER):
            async with anyio.create_task_group() as tg:
                peer_done = anyio.Event()
                # Read (and discard) while we write: a peer that floods us without reading would
                # otherwise block our close frame behind full buffers on both sides until LINGER.
                tg.start_soon(_read_until_eof, sock, peer_done)
                while data:
                    try:
                        sent = sock.send(data)
                    except (BlockingIOError, InterruptedError):
                        sent = 0
                    except OSError:
                        tg.cancel_scope.cancel()
                        return
                    data = data[sent:]
                    if data:
                        await anyio.wait_writable(sock)
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    tg.cancel_scope.cancel()
                    return
                await peer_done.wait()
                tg.cancel_scope.cancel()


async def _read_until_eof(sock: socket.socket, done: anyio.Event) -> None:
    """Discard what a closing peer still sends until it closes its side (or the socket fails)."""
    try:
        while True:
            await anyio.wait_readable(sock)
            try:
                if not sock.recv(RECV_SIZE):
                    return
            except (BlockingIOError, InterruptedError):
                continue
    except (OSError, anyio.ClosedResourceError):
        return
    finally:
        done.set()


# -- the backends: effects out, answers in ------------------------------------------


class Backends:
    """The store (through its ``StoreWorker``), the broker and the probes that watch them, for one
    core. It carries out the core's effects, and hands every answer back to the core as one input,
    followed by ``wake()`` (the shell then flushes what the input produced). It is the broker's
    ``Sink`` and the store worker's callbacks."""

    def __init__(
        self, server: core.Server, store: Store, broker: MemoryBroker | PubSubBroker, wake: Callable[[], None],
        observe_store: Callable[[str, float], None] | None = None,
    ) -> None:
        self.server = server
        self.store = store
        self.broker = broker
        self.failures = 0  # effects whose execution raised (contained, logged)
        self._wake = wake
        self._remote: list[tuple[str, Any, None]] = []  # other instances' messages of this pass, for our store
        self.writer = StoreWorker(
            store,
            on_stored=self._on_stored,
            on_lost=self._on_lost,
            on_history=self._on_history,
            on_history_failed=self._on_history_failed,
            on_status=self._on_store_status,
            observe=observe_store,
        )

    async def run(self, tg: TaskGroup) -> None:
        """Start the store worker, the store probe, the broker and (with a real broker) the heartbeats."""
        tg.start_soon(self.writer.run)
        tg.start_soon(self._store_probe)
        self.server.set_available("broker", self.broker.up)
        await tg.start(self.broker.run, self)
        if not isinstance(self.broker, MemoryBroker):
            tg.start_soon(self._heartbeats)

    async def close(self) -> None:
        """On shutdown: let queued writes commit, say goodbye through the broker, close the store."""
        with anyio.move_on_after(self.writer.retry_for + 1.0):
            await self.writer.drain()  # what was acked or is being written gets its chance
        await self.broker.close()  # presence goodbye: our users leave the others' lists now
        await anyio.to_thread.run_sync(self.store.close)

    def carry_out(self, effects: list[core.Effect]) -> None:
        """Carry out a pass's effects, in order: its messages go to the store as one batch (and, with
        a broker, out to the other instances); one effect that raises is logged and counted, the
        rest go on."""
        stored: list[tuple[str, Any, core.Ack | None]] = []
        publish = None if isinstance(self.broker, MemoryBroker) else self.broker.publish  # nobody else to tell
        presence_changed = False
        Stored, Publish = core.Stored, core.Publish  # the two of nearly every message: looked up once a pass
        for effect in effects:
            kind = type(effect)
            try:
                if kind is Stored:
                    stored.append(effect)  # type: ignore[arg-type]
                elif kind is Publish:
                    if publish is not None:
                        publish(effect.room, effect.message)  # type: ignore[union-attr]
                elif kind is core.PublishOrdered:  # only a sequencing broker makes the core emit these
                    self.broker.sequence(effect.room, effect.message)  # type: ignore[union-attr]
                elif kind is core.History:
                    if stored:  # a read sees every message stored before it was asked for
                        self._store(stored)
                        stored = []
                    # the effect itself comes back with the answer: who asked, and the request's ref
                    self.writer.read(effect, effect.room, effect.limit, effect.before, effect.after)  # type: ignore[union-attr]
                elif kind is core.PresenceChanged:
                    presence_changed = True
                elif kind is core.Failure:
                    log.error("conn %s: %s failed (contained)", effect.conn_id, effect.where,  # type: ignore[union-attr]
                              exc_info=effect.error)  # type: ignore[union-attr]
            except Exception:
                self.failures += 1
                log.exception("effect %s failed (contained)", kind.__name__)
        if stored:
            self._store(stored)
        if presence_changed:
            self.broker.publish_presence(self.server.local_presence())

    def _store(self, items: list[tuple[str, Any, core.Ack | None]]) -> None:
        try:
            self.writer.write_many(items)
        except Exception:
            self.failures += 1
            log.exception("storing %d messages failed (contained)", len(items))

    # -- what the store worker reports (each is one input to the core) --------------------

    def _on_stored(self, acks: list[core.Ack]) -> None:
        self.server.ack(acks)
        self._wake()

    def _on_lost(self, acks: list[core.Ack], detail: str) -> None:
        self.server.unavailable(acks, detail)
        self._wake()

    def _on_history(self, request: core.History, room: str, messages: list[Any]) -> None:
        self.server.history_reply(request.conn_id, room, messages, request.ref)
        self._wake()

    def _on_history_failed(self, request: core.History, detail: str) -> None:
        self.server.history_failed(request.conn_id, detail, request.ref, request.room)
        self._wake()

    def _on_store_status(self, up: bool) -> None:
        self.server.set_available("store", up)

    # -- the broker's Sink ----------------------------------------------------------------

    def on_message(self, room: str, message: Any, node: str) -> None:
        """A chat message another instance published: delivered now (into its room's batch of this pass,
        encoded once), kept with the pass's others (``store_remote``)."""
        if self.server.deliver(room, message, node) is not None and not self.store.shared:
            self._remote.append((room, message, None))  # our own history holds the other instances' messages too
        self._wake()

    def on_sequenced(self, room: str, message: Any, node: str, position: str) -> None:
        """A message the broker ordered (ours too), at its place: delivered now; another instance's kept
        with the pass's others (``store_remote``); ours the core stores itself (its ack waits for it)."""
        if self.server.deliver_sequenced(room, message, node, position) is not None and not self.store.shared \
                and node != self.server.config.node:
            self._remote.append((room, message, None))
        self._wake()

    def on_sequencing(self, on: bool) -> None:
        self.server.order_through_broker(on)
        self._wake()

    def store_remote(self) -> None:
        """Once per loop pass, before its effects: the other instances' messages it delivered go to the
        store as one batch (a history read of the same pass sees them)."""
        if self._remote:
            items, self._remote = self._remote, []
            self._store(items)

    def on_presence(self, node: str, rooms: Any) -> None:
        self.server.remote_presence(node, rooms, time.time())
        self._wake()

    def on_sync(self) -> None:
        self.broker.publish_presence(self.server.local_presence())

    def on_broker_status(self, up: bool) -> None:
        self.server.set_available("broker", up)

    # -- probes -----------------------------------------------------------------------------

    async def _heartbeats(self) -> None:
        """Tell the other instances who is here, every ``presence_heartbeat`` seconds."""
        while True:
            self.broker.publish_presence(self.server.local_presence())
            await anyio.sleep(self.server.config.presence_heartbeat)

    async def _store_probe(self, interval: float = 1.0) -> None:
        """Ping the store: at once (it opens and migrates), then every second while it is down,
        every ten while it is up. Chat refuses messages while it is down."""
        self.server.set_available("store", await self.writer.check())
        while True:
            await anyio.sleep(interval if not self.writer.up else 10 * interval)
            await self.writer.check()


# -- the shell: the pump between sockets, the core and its backends --------------------


class Shell:
    """Drives one ``core.Server`` over real sockets: accepts connections (a link each), pumps each
    loop pass's output out (``_flush``), runs the core's timers, and starts and stops the backends."""

    def __init__(
        self,
        server: core.Server,
        store: Store | None = None,
        broker: MemoryBroker | PubSubBroker | None = None,
        metrics: Any = None,
        tls: TLS | None = None,
    ) -> None:
        self.server = server
        self.tls = tls  # the main listener's TLS (None: plain); SIGHUP reloads its certificate
        self.stopping = False
        self.backends = Backends(
            server,
            store if store is not None else MemoryStore(),
            broker if broker is not None else MemoryBroker(server.config.node),
            self.after_input,
            metrics.observer("store") if metrics is not None else None,
        )
        self.links: dict[core.Connection, TransportLink | SocketLink] = {}
        self._flush_needed = anyio.Event()
        self._flush_soon: Any = None  # on asyncio: loop.call_soon, so a pass's flush costs no task switch
        self._flush_queued = False
        self._held: dict[TransportLink, None] = {}  # backlogged links whose reading is paused
        self._resume_queued = False
        self._timer_wake = anyio.Event()
        self._timer_at = float("inf")
        self._tg: TaskGroup | None = None
        self.listeners: list[socket.socket] = []
        self._asyncio_servers: list[asyncio.AbstractServer] = []

    # -- tasks --------------------------------------------------------------

    async def run(
        self, listener: socket.socket, *, plain: Sequence[socket.socket] = (),
        task_status: Any = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled; SIGINT/SIGTERM close every client with 1001 first. ``listener`` speaks
        TLS when the shell has it; ``plain`` listeners never do (a private port for metrics, say)."""
        self.listeners = [listener, *plain]
        async with anyio.create_task_group() as tg:
            self._tg = tg
            on_asyncio = _on_asyncio()
            if on_asyncio:
                self._flush_soon = asyncio.get_running_loop().call_soon
            else:
                tg.start_soon(self._flusher)
            for sock in self.listeners:
                tls = self.tls if sock is listener else None
                if not on_asyncio:
                    tg.start_soon(self._accept_loop, sock, tls)
                    continue
                factory: Callable[[], asyncio.Protocol]
                if tls is None:
                    factory = partial(TransportLink, self)
                else:
                    factory = partial(TLSTransportLink, self, tls)
                # asyncio listens again on the socket it is given, with its own backlog (100) unless told
                self._asyncio_servers.append(
                    await asyncio.get_running_loop().create_server(factory, sock=sock, backlog=LISTEN_BACKLOG)
                )
            tg.start_soon(self._timers)
            await self.backends.run(tg)
            task_status.started()

    async def shutdown(self, grace: float = 2.0) -> None:
        """Stop accepting, close every client with 1001, give them ``grace`` seconds to answer."""
        self.stopping = True
        for asyncio_server in self._asyncio_servers:
            asyncio_server.close()
        if not self._asyncio_servers:
            for sock in self.listeners:
                anyio.notify_closing(sock)
                sock.close()
        self.server.close_all(core.CloseReason.GOING_AWAY, "server shutting down")
        self._flush()
        with anyio.move_on_after(grace):
            while self.links:
                await anyio.sleep(0.02)
        for link in list(self.links.values()):
            if isinstance(link, TransportLink):
                link.abort()
        await self.backends.close()
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run ``fn(*args)`` as a task of the shell's (a link's drain task, say)."""
        assert self._tg is not None
        self._tg.start_soon(fn, *args)

    async def _accept_loop(self, listener: socket.socket, tls: TLS | None) -> None:
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
                _size_send_buffer(sock)
                self.start_soon(SocketLink(self, sock, peer, tls).run)

    def after_input(self) -> None:
        """Once per input: queue a flush for this loop pass and re-arm the timer if it moved closer."""
        if self._flush_soon is not None:
            if not self._flush_queued:
                self._flush_queued = True
                self._flush_soon(self._queued_flush)
        elif not self._flush_needed.is_set():
            self._flush_needed.set()
        self.rearm()

    def rearm(self) -> None:
        """Wake the timer task if the core's next deadline moved before the one it sleeps until."""
        deadline = self.server.next_deadline
        if deadline is not None and deadline < self._timer_at:
            self._timer_wake.set()

    def hold(self, link: TransportLink) -> None:
        """``link``'s connection has input its budget did not cover: stop reading its socket and
        let the core take the next budget in a later loop pass, after everyone else's input."""
        if link not in self._held:
            link.pause_reading()
            self._held[link] = None
        if not self._resume_queued:
            self._resume_queued = True
            asyncio.get_running_loop().call_soon(self._resume_held)

    def _resume_held(self) -> None:
        self._resume_queued = False
        held, self._held = self._held, {}
        server = self.server
        now = time.time()
        for link in held:
            conn = link.conn
            server.resume(conn, now)
            if conn.backlogged:
                self._held[link] = None
            else:
                link.resume_reading()
        self.after_input()
        if self._held and not self._resume_queued:
            self._resume_queued = True
            asyncio.get_running_loop().call_soon(self._resume_held)

    def _queued_flush(self) -> None:
        self._flush_queued = False
        self._flush()

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
        """Once per loop pass: carry out effects, then write. Each connection's own output first
        (it was queued before its rooms' broadcasts of this pass), then each room's broadcasts
        as one bytes object, the same for every member: one write per connection per room."""
        server = self.server
        backends = self.backends
        backends.store_remote()
        effects = server.effects()
        if effects:
            backends.carry_out(effects)
        shared = server.take_shared()
        self._write_pending()
        for data, members in shared:
            for conn in members:
                link = conn.shell
                if link.blocked:
                    server.enqueue(conn, data)  # behind what it is still draining
                else:
                    link.send(data)
        if shared:
            self._write_pending()  # what enqueue kept, and the slow consumers it closed

    def _write_pending(self) -> None:
        for conn in self.server.pending():
            link = conn.shell
            if link is None or (link.blocked and not conn.closed):
                continue  # gone, or its drain pulls from the core when the kernel takes more
            if conn.closed:
                link.finish()
                continue
            data = conn.data_to_send()
            if data:
                link.send(data)


# -- the command line -----------------------------------------------------------


LISTEN_BACKLOG = 4096  # connections the kernel queues before we accept them: a reconnect storm after a restart


def listen(host: str, port: int, backlog: int = LISTEN_BACKLOG, reuse_port: bool = False) -> socket.socket:
    """A non-blocking listening socket (IPv6 when the host says so). With ``reuse_port`` (the workers
    of ``--workers``) every process listens on the same port and the kernel spreads new connections
    over them by their addresses' hash (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def _env(name: str) -> str | None:
    return os.environ.get("HUBBUB_" + name.upper().replace("-", "_"))


def build_parser() -> argparse.ArgumentParser:
    """Shell flags plus one flag per ``core.Config`` field; each also from ``HUBBUB_<FLAG>``."""
    parser = argparse.ArgumentParser(
        prog="hubbub",
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
        "--workers", type=_workers, default=_workers(_env("workers") or "1"), metavar="N",
        help="worker processes on the port (SO_REUSEPORT), 'auto' for one per core. Above 1, a parent process "
        "starts them, restarts one that dies (with backoff) and forwards SIGTERM/SIGINT/SIGHUP; they share rooms, "
        "presence and history through --broker, or, with none given, through a NATS server the parent runs on "
        "a private loopback port (pip install 'hubbub[workers]')",
    )
    parser.add_argument(
        "--metrics-port", type=int, default=int(_env("metrics_port")) if _env("metrics_port") else None,
        metavar="PORT",
        help="also serve /metrics and /healthz, plain HTTP, on --metrics-host:PORT. With --workers the parent "
        "serves it: every worker's metrics summed (/metrics?worker=N: one worker's), and /healthz 200 only "
        "while every worker and the broker are up",
    )
    parser.add_argument(
        "--metrics-host", default=_env("metrics_host") or "127.0.0.1", help="address of --metrics-port",
    )
    # what a --workers parent tells each worker (not for people): its number, and the socket to the parent
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-socket", type=int, default=None, help=argparse.SUPPRESS)
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
    parser.add_argument(
        "--allowed-hosts", default=_env("allowed_hosts"),
        help="comma-separated Host header values to serve ('*.example.com' for subdomains); others get HTTP 400. "
        "Default: any. Set it in deployments: it is the defence against DNS rebinding",
    )
    parser.add_argument(
        "--read-only-rooms", default=_env("read_only_rooms"), metavar="GLOBS",
        help="comma-separated room name patterns (e.g. 'feed-*,announcements') where no client may publish; "
        "only the server API can",
    )
    parser.add_argument(
        "--store", default=_env("store") or "sqlite:///hubbub.db",
        help="where chat history is kept: sqlite:///PATH (a file; sqlite:////abs/path), "
        "postgresql://USER@HOST:PORT/DB, or memory (gone on restart)",
    )
    parser.add_argument(
        "--history-retention", default=_env("history_retention") or DEFAULT_RETENTION, metavar="COUNT,AGE",
        help="history kept per room, in every store: a count of messages, an age (30d, 12h, 90m, 3600s), both "
        "(the first limit reached wins), or 'off'. Older messages are deleted off the event loop",
    )
    parser.add_argument(
        "--broker", default=_env("broker") or "memory",
        help="how instances share rooms and presence: memory (one instance), "
        "redis://HOST:PORT/DB or nats://HOST:PORT (asyncio backend only). Redis puts every room's messages in "
        "one order on every instance (ids follow it); NATS does not: each instance's own messages keep their "
        "order, two instances' may arrive in either (recovery answers recovered false around them)",
    )
    parser.add_argument(
        "--broker-channel", default=_env("broker_channel") or "hubbub",
        help="Redis channel / NATS subject (and Redis key prefix) the instances of one deployment share",
    )
    parser.add_argument(
        "--jwt-secret", default=_env("jwt_secret"),
        help="require a JWT signed with this HS256 secret at every WebSocket handshake (sub = the user)",
    )
    parser.add_argument(
        "--jwt-public-key", default=_env("jwt_public_key"), metavar="FILE",
        help="require a JWT signed for this PEM public key (RS256 for RSA, ES256 for EC)",
    )
    parser.add_argument(
        "--tls-cert", default=_env("tls_cert"), metavar="FILE",
        help="serve wss:// and https:// with this PEM certificate chain (the server's certificate first, then "
        "its intermediates); needs --tls-key. SIGHUP reloads both files without dropping connections",
    )
    parser.add_argument("--tls-key", default=_env("tls_key"), metavar="FILE", help="the PEM private key of --tls-cert")
    parser.add_argument(
        "--api-key", default=_env("api_key"), metavar="KEY",
        help="turns on the server API (/api/publish, /api/history, /api/presence, /api/disconnect) for requests "
        "with 'Authorization: Bearer KEY'; several keys separated by commas, to rotate one (also HUBBUB_API_KEY)",
    )
    parser.add_argument("--jwt-audience", default=_env("jwt_audience"), help="required 'aud' claim of tokens")
    parser.add_argument("--jwt-issuer", default=_env("jwt_issuer"), help="required 'iss' claim of tokens")
    skip = {"compression", "allowed_origins", "allowed_hosts", "node", "codec", "read_only_rooms"}
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


def _workers(value: str) -> int:
    """``--workers``: a positive count, or 'auto' (the cores this process may run on)."""
    if value.strip().lower() == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        count = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of workers, nor 'auto': {value!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError("--workers must be at least 1")
    return count


def _truthy(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes", "on")


def config_from(args: argparse.Namespace) -> core.Config:
    values = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(core.Config)
        if f.name not in ("compression", "allowed_origins", "allowed_hosts", "node", "codec", "read_only_rooms")
    }
    return core.Config(
        **values,
        codec=ORJSON,
        compression=not args.no_compression,
        allowed_origins=_names(args.allowed_origins),
        allowed_hosts=_names(args.allowed_hosts),
        read_only_rooms=_patterns(args.read_only_rooms),
        node=os.urandom(4).hex(),  # 32 bits: instances of one deployment must not share a tag
    )


def _patterns(text: str | None) -> tuple[str, ...] | None:
    """A comma-separated flag of glob patterns, as given (None when not given)."""
    if not text:
        return None
    return tuple(pattern.strip() for pattern in text.split(",") if pattern.strip())


def _names(text: str | None) -> tuple[str, ...] | None:
    """A comma-separated flag as lower-case names (None when not given)."""
    if not text:
        return None
    return tuple(name.strip().lower() for name in text.split(",") if name.strip())


def tls_from(args: argparse.Namespace) -> TLS | None:
    """The TLS the flags ask for, or None (plain ws:// and http://); ValueError says what is wrong."""
    if args.tls_cert is None and args.tls_key is None:
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise ValueError("--tls-cert and --tls-key go together")
    return TLS(args.tls_cert, args.tls_key)


def verifier_from(args: argparse.Namespace) -> Any:
    """The JWT verifier the flags ask for, or None (authentication off: ``?user=`` names the user)."""
    if args.jwt_secret is None and args.jwt_public_key is None:
        return None
    from hubbub.backends.auth import jwt_verifier

    public_key = None
    if args.jwt_public_key is not None:
        with open(args.jwt_public_key) as f:
            public_key = f.read()
    return jwt_verifier(
        secret=args.jwt_secret, public_key=public_key, audience=args.jwt_audience, issuer=args.jwt_issuer
    )


async def serve(
    args: argparse.Namespace, *, handle_signals: bool = True, task_status: Any = anyio.TASK_STATUS_IGNORED
) -> None:
    """Listen and serve; with ``handle_signals``, SIGINT/SIGTERM shut down cleanly (main thread only)."""
    from hubbub.backends.metrics import PrometheusMetrics

    config = config_from(args)
    metrics = PrometheusMetrics()
    store = open_store(args.store, parse_retention(args.history_retention))
    broker = open_broker(
        args.broker, config.node, channel=args.broker_channel, presence_ttl=config.presence_ttl,
        observe=metrics.observer("broker"), sequence=True,  # with Redis: one order per room (PROTOCOL.md §3)
    )
    server = core.Server(
        build_router(config), config,
        http_routes={
            "/": page.index, "/hubbub.js": page.client_js, "/metrics": metrics.render,
            **api.build(api.parse_keys(args.api_key)),
        },
        verifier=verifier_from(args),
        unmask=UNMASK,
    )
    try:  # a publish re-sent with its key after a restart is acked with the original id, not delivered twice
        server.remember_keys(await anyio.to_thread.run_sync(store.recent_keys, config.idempotency_keys))
    except Exception as exc:  # the store may be down at start: the server starts anyway
        log.warning("store: could not read the recent publish keys: %r", exc)
    if args.worker is not None and isinstance(store, SQLiteStore):
        # One file for all the workers (WAL: one writer at a time, readers never wait): each keeps
        # its own clients' messages, and every history read sees everyone's.
        store.shared = True
    shell = Shell(server, store, broker, metrics, tls=tls_from(args))
    metrics.attach(shell.backends)
    listener = listen(args.host, args.port, reuse_port=args.worker is not None)
    host, port = listener.getsockname()[:2]
    plain = []
    if args.worker is not None:  # the parent reads this worker's /metrics and /healthz here
        plain.append(listen("127.0.0.1", 0))
    elif args.metrics_port is not None:
        plain.append(listen(args.metrics_host, args.metrics_port))
    async with anyio.create_task_group() as tg:

        async def run_shell(*, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
            await shell.run(listener, plain=plain, task_status=task_status)
            tg.cancel_scope.cancel()  # the shell stopped: so do the signal and parent watchers

        await tg.start(run_shell)
        if handle_signals:
            await tg.start(_on_signals, shell)
        task_status.started((shell, port))
        scheme = "wss" if shell.tls is not None else "ws"
        log.info(
            "serving %s on %s:%d with the %s backend; node %s, store %s, broker %s",
            scheme, host, port, args.backend, config.node, _redact(args.store), _redact(args.broker),
        )
        if args.worker is not None:
            print(f"hubbub worker {args.worker} listening on {scheme}://{host}:{port}", flush=True)
            if args.worker_socket is not None:
                tg.start_soon(_report_to_parent, args.worker_socket, shell, {
                    "worker": args.worker, "pid": os.getpid(), "node": config.node, "port": port,
                    "control": plain[0].getsockname()[1],
                })
        else:
            print(f"hubbub listening on {scheme}://{host}:{port}", flush=True)
            if plain:
                print(f"hubbub metrics on http://{args.metrics_host}:{plain[0].getsockname()[1]}/metrics", flush=True)
    log.info("hubbub stopped")


async def _report_to_parent(fd: int, shell: Shell, ready: dict[str, Any]) -> None:
    """A worker's line to its parent: say it is ready (one JSON line), then wait; the parent gone (the
    socket's end: it was killed, say) means this worker goes too, closing its clients with 1001."""
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    try:
        sock.sendall(json.dumps(ready).encode() + b"\n")
        while True:
            await anyio.wait_readable(sock)
            try:
                if not sock.recv(4096):
                    break
            except (BlockingIOError, InterruptedError):
                continue
    except OSError:
        pass
    finally:
        sock.close()
    if not shell.stopping:
        log.warning("the --workers parent is gone: shutting down")
        await shell.shutdown()


def _tune_gc() -> None:
    """Fewer, cheaper garbage collections: what exists at startup (modules, config, routes) is frozen
    out of every later collection, and young collections run every 10,000 net allocations instead of
    700. Per message the server allocates a few dozen short-lived objects that refcounting frees;
    per connection a few dozen that live as long as it does, which full collections would rescan.
    Measured: 5,000 handshakes 0.75 s -> 0.63 s (bench.race, handshake workload)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


async def _on_signals(shell: Shell, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
    """SIGINT/SIGTERM: close every connection with 1001 and stop (a second one during the shutdown is
    logged, not obeyed: the clients still get their close). SIGHUP: reload the TLS certificate."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        task_status.started()
        async with anyio.create_task_group() as tg:

            async def stop() -> None:
                await shell.shutdown()
                tg.cancel_scope.cancel()  # and stop listening for signals: serve() returns

            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    if shell.tls is None:
                        log.info("received SIGHUP: no TLS certificate to reload")
                    else:
                        shell.tls.reload()
                elif shell.stopping:
                    log.info("received %s: already shutting down", name)
                else:
                    log.info("received %s: closing every connection with 1001", name)
                    tg.start_soon(stop)


def _redact(url: str) -> str:
    """A URL for the log, without its password."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@")
    return url


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        open_store(args.store, parse_retention(args.history_retention))
        open_broker(args.broker, "check")
        verifier_from(args)
        tls_from(args)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    for url, prefixes, module, extra in (
        (args.store, ("postgresql://", "postgres://"), "psycopg", "postgresql"),
        (args.broker, ("nats://", "tls://"), "nats", "nats"),
    ):
        if url.startswith(prefixes) and importlib.util.find_spec(module) is None:
            parser.error(f"{url.split(':')[0]} needs {module}: pip install 'hubbub[{extra}]'")
    if args.backend == "trio" and (args.broker != "memory" or args.workers > 1):
        parser.error("--broker redis:// and nats:// (and so --workers, whose workers share a broker) need the "
                     "asyncio backend: the broker clients are asyncio-only")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.workers > 1 and args.worker is None:
        from hubbub.supervisor import supervise

        try:
            sys.exit(supervise(args, list(sys.argv[1:] if argv is None else argv)))
        except ValueError as exc:
            parser.error(str(exc))
    backend_options: dict[str, Any] = {}
    if args.backend == "asyncio":
        try:
            import uvloop  # noqa: F401  (optional: a faster event loop when installed)
        except ImportError:
            pass
        else:
            backend_options["use_uvloop"] = True
    _tune_gc()  # process-wide, so here and not in serve(), which tests and embedders call too
    faulthandler.enable()  # a crash in C code (a segfault) leaves every thread's traceback in the log
    try:
        anyio.run(serve, args, backend=args.backend, backend_options=backend_options)
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
