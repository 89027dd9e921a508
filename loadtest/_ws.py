"""A Locust ``WebSocketUser`` on websocket-client, with one receive greenlet per user.

websocket-client is plain blocking socket code, which Locust's gevent monkey
patching turns cooperative; of the gevent-friendly clients it spends the least
CPU per received message. Each user owns one connection and one greenlet that
reads it; every frame goes to ``on_text`` with the time it arrived.

Request rows, all of type ``WS``:

- ``connect``: the handshake (response time = handshake time); a failure fails the run.
- ``send``: each message sent (a failure if the socket refused it).
- ``recv broadcast`` (reported by subclasses): one per delivery, response time =
  delivery latency from the send time carried in the message.
- ``unexpected close``: the server closed the connection, or it broke, while
  the user still wanted it: always a failure.

The connection is made (and remade after an unexpected close) inside the
user's task by ``ensure_connected``, never in ``on_start``, so a reconnect is
paced by the task and a failed connect is just a failed row.
"""

from __future__ import annotations

import struct
import time
from typing import Any

import gevent
import websocket
from _metrics import ROW_CONNECT, ROW_SEND, ROW_UNEXPECTED_CLOSE, WS
from locust import User

RECONNECT_PAUSE = 1.0  # seconds between connect attempts after a failure


class ConnectionLost(Exception):
    """The server closed the connection, or it broke, while the user still wanted it."""


class WebSocketUser(User):
    """A Locust user holding one WebSocket connection to ``host + ws_path()``."""

    abstract = True
    path = "/"  # the route (and query) to connect to; or override ws_path()
    connect_timeout = 10.0

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        self.ws: websocket.WebSocket | None = None
        self.connected_at: float | None = None  # time.monotonic() when the handshake completed
        self._receiver: gevent.Greenlet | None = None
        self._last_attempt = float("-inf")

    # -- for subclasses -------------------------------------------------------

    def ws_path(self) -> str:
        return self.path

    def on_open(self) -> None:
        """The handshake completed (``self.connected_at`` is set); the receive greenlet starts next."""

    def on_text(self, text: str, now: float) -> None:
        """One text message arrived at ``now`` (time.monotonic())."""

    def on_lost(self) -> None:
        """The connection closed unexpectedly (already reported as a failure)."""

    # -- connection -------------------------------------------------------------

    def url(self) -> str:
        host = (self.host or "").rstrip("/")
        if host.startswith("http://"):
            host = "ws://" + host[len("http://"):]
        elif host.startswith("https://"):
            host = "wss://" + host[len("https://"):]
        return host + self.ws_path()

    def fire(self, name: str, response_time: float, length: int = 0, exception: BaseException | None = None) -> None:
        self.environment.events.request.fire(
            request_type=WS, name=name, response_time=response_time, response_length=length,
            exception=exception, context={},
        )

    def ensure_connected(self) -> bool:
        """Connect unless connected; after a failure, wait ``RECONNECT_PAUSE`` before trying again."""
        if self.ws is not None:
            return True
        pause = self._last_attempt + RECONNECT_PAUSE - time.monotonic()
        if pause > 0:
            gevent.sleep(pause)
        self._last_attempt = time.monotonic()
        return self.connect()

    def connect(self) -> bool:
        start = time.perf_counter()
        try:
            ws = websocket.create_connection(
                self.url(),
                timeout=self.connect_timeout,
                skip_utf8_validation=True,  # the JSON decoder rejects bad text anyway
                enable_multithread=True,  # a lock around sends: the receiver answers pings
                suppress_origin=True,  # a load generator, not a browser
            )
        except Exception as exc:
            self.fire(ROW_CONNECT, (time.perf_counter() - start) * 1000, exception=exc)
            return False
        ws.settimeout(None)  # reads wait for as long as it takes; the server's pings keep it alive
        self.fire(ROW_CONNECT, (time.perf_counter() - start) * 1000)
        self.ws = ws
        self.connected_at = time.monotonic()
        self.on_open()
        self._receiver = gevent.spawn(self._receive, ws)
        return True

    def send_text(self, text: str) -> bool:
        ws = self.ws
        if ws is None:
            return False
        start = time.perf_counter()
        try:
            ws.send(text)
        except Exception as exc:
            self.fire(ROW_SEND, (time.perf_counter() - start) * 1000, len(text), exc)
            self._lost(ws, f"send failed: {exc!r}")
            return False
        self.fire(ROW_SEND, (time.perf_counter() - start) * 1000, len(text))
        return True

    def close(self) -> None:
        """Close on purpose: stop the receiver first, so nothing reports this close as unexpected."""
        ws, self.ws, self.connected_at = self.ws, None, None
        receiver, self._receiver = self._receiver, None
        if receiver is not None:
            receiver.kill(block=False)
        if ws is not None:
            try:
                ws.send_close(websocket.STATUS_NORMAL)
            except Exception:
                pass
            ws.shutdown()

    def on_stop(self) -> None:
        self.close()

    # -- the receive greenlet -------------------------------------------------------

    def _receive(self, ws: websocket.WebSocket) -> None:
        try:
            while True:
                opcode, frame = ws.recv_data_frame(True)  # answers pings itself
                now = time.monotonic()
                if opcode == websocket.ABNF.OPCODE_TEXT:
                    self.on_text(frame.data.decode("utf-8"), now)
                elif opcode == websocket.ABNF.OPCODE_CLOSE:
                    code = struct.unpack("!H", frame.data[:2])[0] if len(frame.data) >= 2 else None
                    reason = frame.data[2:].decode("utf-8", "replace")
                    self._lost(ws, f"closed by the server: {code} {reason}".rstrip())
                    return
                elif opcode == websocket.ABNF.OPCODE_BINARY:
                    self.on_binary(frame.data, now)
        except gevent.GreenletExit:
            raise
        except Exception as exc:
            self._lost(ws, f"connection broke: {exc!r}")

    def on_binary(self, data: bytes, now: float) -> None:
        """One binary message arrived (none of hubbub's JSON routes sends any)."""

    def _lost(self, ws: websocket.WebSocket, detail: str) -> None:
        if ws is not self.ws:
            return  # closed on purpose, or already reported
        self.ws, self.connected_at = None, None
        if self._receiver is not gevent.getcurrent() and self._receiver is not None:
            self._receiver.kill(block=False)
        self._receiver = None
        ws.shutdown()
        self.fire(ROW_UNEXPECTED_CLOSE, 0, exception=ConnectionLost(detail))
        self.on_lost()
