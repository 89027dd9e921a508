"""A client of hubbub's server API (PROTOCOL.md section 2), for an application backend: a Django or
FastAPI view, a Celery task, a cron job. Standard library only.

::

    from hubbub.api import Client

    hub = Client("http://127.0.0.1:8765", key=os.environ["HUBBUB_API_KEY"])
    hub.publish("news", {"headline": "..."})          # {"id": ..., "ts": ...}, once stored
    hub.history("news", limit=10)                       # [message, ...], oldest first
    hub.presence("news")                                # {user: [meta, ...]}, every instance
    hub.disconnect("mallory")                           # this instance's count of closed connections

Why ``http.client`` and not ``urllib.request``: ``urllib`` opens a new TCP connection (and, with
https, a new TLS handshake) for every request and sends ``Connection: close``; ``http.client``
keeps an HTTP/1.1 connection open between requests, which the server honours. That saves a round
trip (three with TLS) and the server's connection setup on every request (bench/api_throughput.py
measures both; README, "Publishing from your backend").

Thread safety: a ``Client`` may be shared by threads. It keeps a small pool of kept-alive
connections; each request takes one (or opens one) and gives it back, so concurrent requests run
in parallel on separate connections and never interleave on one.

A kept-alive connection the server (or a proxy) closed while it sat idle is noticed on its next
request, which is then sent once more on a new connection. Every ``publish`` carries an idempotency
``key`` (a random one unless given), so on a server that deduplicates keys that second attempt
cannot store the message twice.

The key is sent only in the ``Authorization`` header; it is never logged nor shown by ``repr``.
"""

from __future__ import annotations

import http.client
import json
import secrets
import ssl
import threading
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

__all__ = ["ApiError", "Client"]

_STALE = (http.client.RemoteDisconnected, http.client.BadStatusLine, ConnectionResetError, BrokenPipeError,
          ConnectionAbortedError)
"""What sending on a connection the server already closed raises."""


class ApiError(Exception):
    """A non-200 answer: ``status`` (401, 400, 404, 405, 413, 503, ...), ``code`` (the answer's
    ``error``: ``unauthorized``, ``bad_room``, ``bad_field``, ``too_large``, ...) and ``detail``."""

    def __init__(self, status: int, code: str, detail: str = "") -> None:
        super().__init__(f"HTTP {status} {code}" + (f": {detail}" if detail else ""))
        self.status = status
        self.code = code
        self.detail = detail


class Client:
    """The server API of one hubbub server (or a load balancer in front of several).

    ``url``: ``http://HOST:PORT`` or ``https://HOST:PORT`` (``ws://``/``wss://`` are read as
    those), optionally with a path prefix a proxy serves the API under. ``key``: one of the
    server's ``--api-key`` keys. ``timeout``: seconds per socket operation. ``ssl_context``: for
    https (default: ``ssl.create_default_context()``, which verifies the certificate).
    ``pool_size``: idle connections kept for reuse."""

    def __init__(self, url: str, key: str, *, timeout: float = 10.0, ssl_context: ssl.SSLContext | None = None,
                 pool_size: int = 8) -> None:
        parts = urlsplit(url)
        scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
        if scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.scheme = scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        self.timeout = timeout
        self.ssl_context = ssl_context if ssl_context is not None or scheme == "http" else \
            ssl.create_default_context()
        self.pool_size = pool_size
        self._headers = {"Authorization": f"Bearer {key}", "Accept": "application/json"}
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never the key
        return f"<hubbub.api.Client {self.scheme}://{self.host}:{self.port}{self.prefix}>"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the idle kept-alive connections (a later request opens a new one)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    # -- the endpoints ----------------------------------------------------------------------------

    def publish(self, room: str, data: Any, user: str | None = None, key: str | None = None) -> dict[str, Any]:
        """Publish ``data`` (any JSON value) to ``room`` as ``user`` (the server's default: ``"server"``);
        returns ``{"id", "ts"}`` once the message is stored. ``key``: the idempotency key (at most
        64 bytes; a random one unless given)."""
        body: dict[str, Any] = {"room": room, "data": data}
        body["key"] = key if key is not None else secrets.token_urlsafe(16)
        if user is not None:
            body["user"] = user
        return dict(self._call("POST", "/api/publish", body))

    def history(self, room: str, limit: int | None = None, before: str | None = None,
                after: str | None = None) -> list[dict[str, Any]]:
        """A page of ``room``'s stored messages, oldest first (``after``: the oldest ``limit`` after that
        id; ``before``: the newest ``limit`` before it; both: between them). The server caps ``limit``
        at its ``--history-max``."""
        query = {"room": room, "limit": limit, "before": before, "after": after}
        answer = self._call("GET", "/api/history?" + urlencode({k: v for k, v in query.items() if v is not None},
                                                                quote_via=quote))
        return list(answer["messages"])

    def presence(self, room: str) -> dict[str, list[dict[str, Any]]]:
        """Who is in ``room`` on every instance: ``{user: [meta, ...]}``, one meta per connection."""
        return dict(self._call("GET", "/api/presence?" + urlencode({"room": room}, quote_via=quote))["users"])

    def disconnect(self, user: str, room: str | None = None) -> int:
        """Take ``user`` out of ``room`` (their connections get ``left`` with ``"reason":"removed"``), or
        with no room close their connections on every instance (close code 4001). Returns this
        instance's count."""
        body: dict[str, Any] = {"user": user}
        if room is not None:
            body["room"] = room
        return int(self._call("POST", "/api/disconnect", body)["disconnected"])

    # -- HTTP -------------------------------------------------------------------------------------

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """An idle kept-alive connection (True: reused) or a new one."""
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        if self.scheme == "https":
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                               context=self.ssl_context), False
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout), False

    def _release(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < self.pool_size:
                self._idle.append(conn)
                return
        conn.close()

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        payload = None
        headers = self._headers
        if body is not None:
            payload = json.dumps(body, separators=(",", ":")).encode()
            headers = {**headers, "Content-Type": "application/json"}
        while True:
            conn, reused = self._connection()
            try:
                conn.request(method, self.prefix + path, body=payload, headers=headers)
                response = conn.getresponse()
                raw = response.read()
            except _STALE:
                conn.close()
                if reused:
                    continue  # the server closed it while idle: once more on a new connection
                raise
            except BaseException:
                conn.close()
                raise
            if response.will_close:
                conn.close()
            else:
                self._release(conn)
            return self._answer(response.status, raw)

    @staticmethod
    def _answer(status: int, raw: bytes) -> Any:
        try:
            value = json.loads(raw) if raw else None
        except ValueError:
            value = None
        if status == 200 and value is not None:
            return value
        if isinstance(value, dict) and isinstance(value.get("error"), str):
            raise ApiError(status, value["error"], str(value.get("detail", "")))
        text = raw[:200].decode("utf-8", "replace").strip()
        raise ApiError(status, "not_found" if status == 404 else f"http_{status}", text)
