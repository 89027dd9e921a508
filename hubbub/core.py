"""hubbub's sans-io core: it decides, it never does.

Bytes and the current time go in; bytes per connection and a short list of
effects come out. No sockets, no event loop, no clock of its own and no
module-level mutable state, so one process can run several ``Server`` objects
and a test can replay a whole session (ping timeouts included) in microseconds.

The file reads top-down: values (config, effects, errors), the frame encoder,
the permessage-deflate and size-limit extensions for wsproto, the router, the
connection, rooms, and last the ``Server`` that ties them together.

Typical use from an event loop::

    server = Server(router, Config())
    conn = server.connect(peer=("127.0.0.1", 50422), now=now)
    server.receive(conn, data, now)         # b"" means the peer closed its side
    for c in server.pending():              # connections that gained output
        transport_of[c].write(c.data_to_send())
        if c.closed: transport_of[c].close()
    deadline = server.tick(now)             # keepalive, handshake and close timers

A shell that wants the fast path calls ``take_shared()`` before ``pending()``: each
room's broadcasts of the pass come as one bytes object for many connections (see
``Room``), written after each connection's own output.
"""

from __future__ import annotations

import base64
import binascii
import enum
import fnmatch
import heapq
import json
import re
import struct
import zlib
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import h11
from wsproto.connection import Connection as WSConnection
from wsproto.connection import ConnectionState as WSState
from wsproto.connection import ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage
from wsproto.extensions import Extension, PerMessageDeflate
from wsproto.frame_protocol import CloseReason, Opcode, RsvBits
from wsproto.utilities import generate_accept_token

__all__ = [
    "Ack",
    "Config",
    "Connection",
    "Endpoint",
    "EventError",
    "Failure",
    "History",
    "HttpReply",
    "HttpRoute",
    "Match",
    "Metrics",
    "PresenceChanged",
    "Publish",
    "Room",
    "Router",
    "Server",
    "State",
    "Stored",
    "Unauthorized",
    "UsageError",
    "encode_frame",
]

# ---------------------------------------------------------------------------
# Values: configuration, effects, errors
# ---------------------------------------------------------------------------


def _setting(default: Any, help: str) -> Any:
    """A Config field whose reason travels with it: into --help and the README table."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True, slots=True)
class Config:
    """Every limit in one place, each with its reason. The CLI is built from these fields."""

    max_connections: int = _setting(10_000, "open WebSocket connections; the next handshake gets HTTP 503")
    max_connections_per_address: int = _setting(
        1000, "sockets open from one client IP address (handshakes included); the next handshake gets HTTP 429 "
        "with Retry-After; 0 turns it off. Behind a reverse proxy every client has the proxy's address: "
        "turn it off there and let the proxy limit per client"
    )
    max_message_size: int = _setting(
        64 * 1024, "bytes per message on JSON routes, across fragments and after inflating; close 1009 beyond"
    )
    max_echo_message_size: int = _setting(
        16 * 1024 * 1024, "bytes per message on /echo, which carries arbitrary payloads; close 1009 beyond"
    )
    max_buffer: int = _setting(
        1024 * 1024, "outbound bytes queued per connection; a client that reads slower is closed with 1013"
    )
    rate_limit: float = _setting(
        100.0,
        "messages per second per connection, with a burst of one second's worth; 0 turns it off. "
        "Over it: error event rate_limited and the message is dropped; a further second's worth: close 1008",
    )
    frames_per_pass: int = _setting(
        64, "frames handled from one connection per loop pass; the rest wait (its socket unread) while the "
        "others get their turn, so one connection's flood delays another's messages by one such budget at most"
    )
    ping_interval: float = _setting(20.0, "seconds between keepalive pings; 0 turns them off")
    ping_timeout: float = _setting(20.0, "no pong within this many seconds of a ping: close 1011")
    handshake_timeout: float = _setting(10.0, "seconds a client has to send its HTTP request; then it is dropped")
    close_timeout: float = _setting(5.0, "seconds to wait for the peer's close frame after ours; then it is dropped")
    max_header_bytes: int = _setting(16 * 1024, "bytes of request line and headers; HTTP 431 beyond")
    max_headers: int = _setting(64, "number of request headers; HTTP 431 beyond")
    max_user_bytes: int = _setting(
        256, "bytes of a user name (?user= or a token's sub), which rides in every message and presence list; "
        "HTTP 400 (401 for a token) beyond, as for control characters in it"
    )
    allowed_hosts: tuple[str, ...] | None = _setting(
        None,
        "Host header values served ('*.example.com' covers subdomains; a port is ignored); unset: any. "
        "A DNS-rebinding page reaches the server under the attacker's name: list your own names to refuse it "
        "(HTTP 400)",
    )
    allowed_origins: tuple[str, ...] | None = _setting(
        None,
        "origins allowed to open a WebSocket ('*' for any); unset: the server's own host only, plus "
        "clients that send no Origin. Blocks cross-site WebSocket hijacking (HTTP 403)",
    )
    compression: bool = _setting(True, "negotiate permessage-deflate when the client offers it")
    compression_min_size: int = _setting(128, "outbound messages smaller than this are not compressed")
    compression_level: int = _setting(
        6, "zlib level for outbound compressed messages, 1 (fastest) to 9 (smallest). On large text (JSON, "
        "HTML, prose) 1 takes a fifth of the CPU of 6 for about 18 percent more bytes"
    )
    presence_window: float = _setting(0.05, "seconds over which presence joins and leaves coalesce into one diff")
    history_max: int = _setting(100, "largest limit a history request may ask for")
    node: str = _setting("0000", "this instance's tag inside message ids, so instances never collide")
    presence_heartbeat: float = _setting(
        2.0, "seconds between this instance's presence heartbeats through the broker (several instances)"
    )
    presence_ttl: float = _setting(
        6.0,
        "seconds without a heartbeat after which another instance's users leave presence "
        "(an instance killed without goodbye drops out within this plus --presence-window)",
    )


class UsageError(Exception):
    """A caller of the core broke its contract (our mistake, never the peer's)."""


class EventError(Exception):
    """Raised by a handler to answer the client with an ``error`` event; the connection stays open."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


class Unauthorized(Exception):
    """Raised by a token verifier (``Server(verifier=...)``): the handshake is refused with 401."""


@dataclass(frozen=True, slots=True)
class Ack:
    """Who to tell once a message is stored: ``Server.ack`` or ``Server.unavailable`` takes these.

    ``ref`` is the client's (None: it asked for no ack, but still hears when its message was lost)."""

    conn_id: int
    ref: Any
    id: str


@dataclass(frozen=True, slots=True)
class Stored:
    """Effect: a chat message to keep in the store; once it is, the shell calls ``Server.ack([ack])``."""

    room: str
    message: Mapping[str, Any]
    ack: Ack | None = None


@dataclass(frozen=True, slots=True)
class Publish:
    """Effect: a message for the members of ``room`` on the other instances (through the broker)."""

    room: str
    message: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class PresenceChanged:
    """Effect: this instance's presence changed; the shell tells the broker ``Server.local_presence()``."""


@dataclass(frozen=True, slots=True)
class History:
    """Effect: the shell should read a room's history and answer with ``Server.history_reply``."""

    conn_id: int
    room: str
    limit: int
    before: str | None


@dataclass(frozen=True, slots=True)
class Failure:
    """Effect: application code or one of the core's own steps raised. It was contained to what it
    was working on (``where``: "handler", "receive", "timer", "ack", "deliver", ...): the connection
    ``conn_id`` (if any) was closed with 1011, everything else went on. The shell logs it once."""

    conn_id: int | None
    error: BaseException
    where: str = "handler"


Effect = Stored | History | Failure | Publish | PresenceChanged


class Metrics:
    """Counters the core keeps for ``/metrics``: it only counts, the shell formats."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "deliveries",
        "duplicates",
        "failures",
        "messages_in",
        "rejections",
        "slow_consumers",
    )

    def __init__(self) -> None:
        self.messages_in: dict[str, int] = {}  # route name -> messages received
        self.deliveries = 0  # messages queued to recipients by broadcasts
        self.bytes_in = 0
        self.bytes_out = 0
        self.slow_consumers = 0  # connections closed with 1013
        self.rejections: dict[int, int] = {}  # HTTP status -> handshakes refused with it
        self.duplicates = 0  # broker messages dropped as already delivered
        self.failures: dict[str, int] = {}  # where -> exceptions contained there (see ``Failure``)

# ---------------------------------------------------------------------------
# Frames: server frames are unmasked, so one frame's bytes serve every recipient
# ---------------------------------------------------------------------------

_TEXT = Opcode.TEXT.value
_BINARY = Opcode.BINARY.value
_pack_short = struct.Struct("!BBH").pack
_pack_long = struct.Struct("!BBQ").pack
_encode_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
"""Strict JSON out: NaN and Infinity raise instead of being written (no browser could parse them)."""


_INFINITIES = (float("inf"), float("-inf"))


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in _INFINITIES:
        raise ValueError(f"number {text[:24]} is out of range")
    return value


_decode_json = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float).decode
"""Strict JSON in: no NaN/Infinity literals, no number that overflows to infinity (such as 1e999)."""

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
"""A ``\\uD800``-``\\uDFFF`` escape: it may decode to a lone surrogate, which no UTF-8 output can hold."""


def decode_event(text: str) -> Any:
    """Parse one client message as strict JSON, or raise ``ValueError`` saying why.

    Python's json accepts what no browser's JSON.parse does and what cannot be written back out:
    NaN and Infinity, numbers that overflow to infinity, and ``\\ud800``-style escapes that decode
    to lone surrogates (not encodable as UTF-8: echoing one would raise on the way out). All three
    are refused here, where the string enters, so everything past this point re-encodes. The
    surrogate check costs one regex search, and a re-encode only for texts holding such escapes
    (valid pairs, e.g. an escaped emoji, pass)."""
    value = _decode_json(text)
    if "\\u" in text and _SURROGATE_ESCAPE.search(text):
        try:
            _encode_json(value).encode()
        except UnicodeEncodeError:
            raise ValueError("a string holds a lone surrogate (an unpaired \\ud800-\\udfff escape)") from None
    return value


_DEFLATE_TAIL = b"\x00\x00\xff\xff"


def encode_frame(opcode: int, payload: bytes, rsv1: bool = False) -> bytes:
    """One final, unmasked server frame, byte-identical to what wsproto would produce."""
    first = 0x80 | opcode | (0x40 if rsv1 else 0)
    n = len(payload)
    if n < 126:
        return bytes((first, n)) + payload
    if n < 65536:
        return _pack_short(first, 126, n) + payload
    return _pack_long(first, 127, n) + payload


def deflate(payload: bytes, window_bits: int, level: int = zlib.Z_DEFAULT_COMPRESSION) -> bytes:
    """Compress one whole message with a fresh context (server_no_context_takeover)."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, -window_bits)
    data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
    return data[:-4] if data.endswith(_DEFLATE_TAIL) else data


class OutboundMessage:
    """One outgoing message, encoded once and compressed at most once per window size."""

    __slots__ = ("_deflated", "_level", "_min_size", "opcode", "payload", "plain")

    def __init__(self, opcode: int, payload: bytes, min_compress: int, level: int) -> None:
        self.opcode = opcode
        self.payload = payload
        self.plain = encode_frame(opcode, payload)
        self._deflated: dict[int, bytes] = {}
        self._min_size = min_compress
        self._level = level

    def frame_for(self, window_bits: int | None) -> bytes:
        """The frame for a recipient that negotiated deflate with these bits (None: not at all)."""
        if window_bits is None or len(self.payload) < self._min_size:
            return self.plain
        frame = self._deflated.get(window_bits)
        if frame is None:
            frame = encode_frame(self.opcode, deflate(self.payload, window_bits, self._level), rsv1=True)
            self._deflated[window_bits] = frame
        return frame


def text_message(payload: Mapping[str, Any], config: Config) -> OutboundMessage:
    """A JSON event as an outgoing text message."""
    return OutboundMessage(
        _TEXT, _encode_json(payload).encode(), config.compression_min_size, config.compression_level
    )


# ---------------------------------------------------------------------------
# wsproto extensions: bounded inflate and a per-message size limit
# ---------------------------------------------------------------------------


class BoundedDeflate(PerMessageDeflate):
    """permessage-deflate that never inflates more than the message limit plus one chunk.

    wsproto inflates whatever arrives; a 1 MiB message can inflate to 1 GiB.
    Here each inbound chunk is inflated with ``max_length`` set to what the
    message may still grow by, and a message that would pass the limit fails
    with 1009 before the excess is ever produced. Outbound messages are
    compressed by the core itself (``deflate``), not through this class.
    """

    def __init__(self, max_size: int) -> None:
        super().__init__(server_no_context_takeover=True)
        self.max_size = max_size
        self.inflated = 0

    def _inflate(self, data: bytes) -> bytes | CloseReason:
        assert self._decompressor is not None
        room = self.max_size - self.inflated
        try:
            out = self._decompressor.decompress(data, room + 1)
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        self.inflated += len(out)
        if self.inflated > self.max_size or self._decompressor.unconsumed_tail:
            return CloseReason.MESSAGE_TOO_BIG
        return out

    def frame_inbound_payload_data(self, proto: Any, data: bytes) -> bytes | CloseReason:
        if not self._inbound_compressed or not self._inbound_is_compressible:
            return data
        return self._inflate(data)

    def frame_inbound_complete(self, proto: Any, fin: bool) -> bytes | CloseReason | None:
        if not fin:
            return None
        if not self._inbound_is_compressible or not self._inbound_compressed:
            self._inbound_compressed = None
            return None
        out = self._inflate(_DEFLATE_TAIL)
        self.inflated = 0
        if self.client_no_context_takeover:
            self._decompressor = None
        self._inbound_compressed = None
        return out


class SizeLimit(Extension):
    """Counts each message's payload (after inflating) across fragments; 1009 beyond the limit.

    wsproto enforces no message size; this rides in its extension chain after
    permessage-deflate, claims no RSV bit and is always enabled. wsproto passes
    control frames (ping, pong, close) through the chain too: they are not part
    of the message, so they are not counted.
    """

    name = "hubbub-size-limit"

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.size = 0
        self.compressed = False
        self.control = False

    def enabled(self) -> bool:
        return True

    def offer(self) -> bool:
        return False  # never negotiated: a server-side guard, not a wire extension

    def frame_inbound_header(
        self, proto: Any, opcode: Opcode, rsv: RsvBits, payload_length: int
    ) -> CloseReason | RsvBits:
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            self.size = 0
            self.compressed = rsv.rsv1
        self.control = opcode.iscontrol()
        if (
            not self.control
            and not self.compressed
            and self.size + payload_length > self.max_size
        ):
            return CloseReason.MESSAGE_TOO_BIG
        return RsvBits(False, False, False)

    def frame_inbound_payload_data(self, proto: Any, data: bytes) -> bytes | CloseReason:
        if self.control:
            return data
        self.size += len(data)
        if self.size > self.max_size:
            return CloseReason.MESSAGE_TOO_BIG
        return data

    def frame_inbound_complete(self, proto: Any, fin: bool) -> bytes | CloseReason | None:
        return None


def negotiate_deflate(offers: Iterable[str], max_size: int) -> tuple[BoundedDeflate, str] | None:
    """Accept the first permessage-deflate offer we can honour, as RFC 7692 asks.

    We always add ``server_no_context_takeover``: every outgoing message is then
    compressed on its own, so a broadcast is compressed once for all recipients.
    """
    for offer in offers:
        if offer.split(";", 1)[0].strip().lower() != PerMessageDeflate.name:
            continue
        extension = BoundedDeflate(max_size)
        try:
            accepted = extension.accept(offer)
        except ValueError:  # a malformed window size such as "client_max_window_bits=x"
            continue
        if accepted is not None:
            return extension, f"{PerMessageDeflate.name}; {accepted}" if accepted else PerMessageDeflate.name
    return None


# ---------------------------------------------------------------------------
# Router: compile once, match once per handshake, dispatch by event name
# ---------------------------------------------------------------------------

Handler = Callable[["Connection", dict], None]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """What a route does. ``events`` maps an event name to ``handler(conn, event)``.

    An endpoint with ``on_raw`` receives every message as it came (str or bytes)
    instead of JSON events; JSON endpoints close binary messages with 1003.
    """

    events: Mapping[str, Handler] = field(default_factory=dict)
    on_open: Callable[[Connection], None] | None = None
    on_close: Callable[[Connection], None] | None = None
    on_raw: Callable[[Connection, str | bytes], None] | None = None
    max_message_size: int | None = None
    """Overrides ``Config.max_message_size`` for this route (None: the config's)."""
    max_buffer: int | None = None
    """Raises ``Config.max_buffer`` for this route (None: the config's), e.g. to hold one whole echo."""
    name: str = ""
    rooms: Callable[[Mapping[str, str]], Iterable[str]] | None = None
    """The rooms a connection joins, from its route params: checked against a token's ``rooms`` claim."""


@dataclass(frozen=True, slots=True)
class Match:
    endpoint: Endpoint
    params: dict[str, str]
    template: str


_PARAM = re.compile(r"{([A-Za-z_][A-Za-z0-9_]*)}")

MAX_NAME_BYTES = 200
"""Bytes of a path parameter such as a room name (PROTOCOL.md: a room is 1-200 bytes of UTF-8)."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
"""C0 and C1 control characters and DEL: refused in names, escaped in logs."""

_MAX_TIMESTAMP = 1e15
"""Seconds; a token's ``exp`` beyond this (about 30 million years) is refused rather than overflowing."""


def printable(text: str, limit: int = 200) -> str:
    """``text`` safe for one log line: control characters escaped, at most ``limit`` characters kept.

    Anything a client sent (a close reason, a user name, a room) may hold a newline that would
    forge a log line, or terminal escapes."""
    if len(text) > limit:
        text = text[:limit] + "..."
    if _CONTROL.search(text):
        text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    return text


def path_param(raw: str) -> str:
    """Decode one path parameter strictly; ``ValueError`` says why it is not a valid name.

    ``unquote`` would turn invalid UTF-8 into U+FFFD, so ``%FE``, ``%FF`` and ``%C0`` would all
    name one room; here they are refused, as are empty names, names over ``MAX_NAME_BYTES`` and
    control characters."""
    try:
        value = unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise ValueError("bad path parameter: percent-encoded bytes that are not UTF-8") from None
    size = len(value.encode())
    if not 0 < size <= MAX_NAME_BYTES:
        raise ValueError(f"bad path parameter: a name is 1 to {MAX_NAME_BYTES} bytes")
    if _CONTROL.search(value):
        raise ValueError("bad path parameter: control characters")
    return value


class Router:
    """Path templates such as ``/chat/{room}`` compiled to regexes when added."""

    def __init__(self) -> None:
        self._routes: list[tuple[re.Pattern[str], str, Endpoint]] = []

    def add(self, template: str, endpoint: Endpoint) -> None:
        pattern, pos = "^", 0
        for m in _PARAM.finditer(template):
            pattern += re.escape(template[pos : m.start()]) + f"(?P<{m.group(1)}>[^/]+)"
            pos = m.end()
        pattern += re.escape(template[pos:]) + "$"
        self._routes.append((re.compile(pattern), template, endpoint))

    def match(self, path: str) -> Match | None:
        """The route ``path`` names, with its parameters decoded; ``ValueError`` for a bad parameter."""
        for regex, template, endpoint in self._routes:
            m = regex.match(path)
            if m is not None:
                params = {k: path_param(v) for k, v in m.groupdict().items()}
                return Match(endpoint, params, template)
        return None


# ---------------------------------------------------------------------------
# Connection
# ---------------------------------------------------------------------------


class State(enum.Enum):
    HANDSHAKE = "handshake"  # reading the HTTP request
    OPEN = "open"
    CLOSING = "closing"  # our close frame is out; waiting for the peer's
    CLOSED = "closed"


_HTTP_REASONS = {
    101: "Switching Protocols",
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    426: "Upgrade Required",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


HttpReply = tuple[int, bytes, str] | tuple[int, bytes, str, Iterable[tuple[str, str]]]
"""What a plain-HTTP route returns: status, body, content type and, optionally, headers of its own."""

HttpRoute = Callable[["Server", Mapping[bytes, bytes]], HttpReply]
"""A plain-HTTP route, called as ``route(server, request_headers)`` (names lower-case bytes)."""


def http_response(
    status: int,
    body: bytes = b"",
    content_type: str = "text/plain; charset=utf-8",
    headers: Iterable[tuple[str, str]] = (),
) -> bytes:
    """A complete HTTP/1.1 response that closes the connection."""
    lines = [f"HTTP/1.1 {status} {_HTTP_REASONS.get(status, 'Error')}"]
    lines += [f"{k}: {v}" for k, v in headers]
    lines += [
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "",
        "",
    ]
    return "\r\n".join(lines).encode("latin-1") + body


REPLY_ALLOWANCE = 4
"""Replies a client asked for may queue up to this many times ``max_buffer`` before it is a slow consumer."""


class Connection:
    """One client, from its first byte to its close; also the context handlers work with.

    Handlers read ``id``, ``user``, ``params``, ``query``, ``claims``, ``peer``
    and act through ``send``, ``join``, ``broadcast``, ``close`` and friends.
    """

    __slots__ = (
        "_binary",
        "_handshake_deadline",
        "_http",
        "_parts",
        "_ping_seq",
        "_pong_due",
        "_tokens",
        "_tokens_at",
        "_ws",
        "address",
        "backlogged",
        "claims",
        "close_code",
        "close_reason",
        "deflate_bits",
        "endpoint",
        "id",
        "outbound",
        "outbound_size",
        "params",
        "peer",
        "query",
        "reply_size",
        "rooms",
        "server",
        "shell",
        "state",
        "status",
        "user",
    )

    def __init__(self, server: Server, conn_id: int, peer: Any, now: float) -> None:
        self.id = conn_id
        self.peer = peer
        self.address = peer[0] if isinstance(peer, tuple) and peer else peer  # the client's IP address
        self.state = State.HANDSHAKE
        self.server = server
        self.user = "anonymous"
        self.params: dict[str, str] = {}
        self.query: dict[str, str] = {}
        self.claims: Mapping[str, Any] = {}
        self.endpoint: Endpoint | None = None
        self.rooms: list[Room] = []
        self.outbound: list[bytes] = []
        self.outbound_size = 0
        self.reply_size = 0  # queued bytes of replies the client asked for (see ``reply``)
        self.status: int | None = None  # the HTTP status we answered: 101, or why we refused
        self.close_code: int | None = None
        self.close_reason = ""
        self.deflate_bits: int | None = None
        self.shell: Any = None  # the shell's own object for this connection (its socket or transport)
        self.backlogged = False  # input is buffered that this pass had no budget for: see Server.resume
        self._http: h11.Connection | None = h11.Connection(
            h11.SERVER, max_incomplete_event_size=server.config.max_header_bytes
        )
        self._ws: WSConnection | None = None
        self._parts: list[str | bytes] = []
        self._binary = False
        self._tokens = server.config.rate_limit
        self._tokens_at = now
        self._ping_seq = 0
        self._pong_due = False
        self._handshake_deadline = now + server.config.handshake_timeout

    def __repr__(self) -> str:
        return f"<Connection {self.id} {self.state.value} user={self.user!r} peer={self.peer!r}>"

    @property
    def closed(self) -> bool:
        """True once the shell should close the socket (after writing what is queued)."""
        return self.state is State.CLOSED

    def data_to_send(self) -> bytes:
        """Everything queued for this connection, in order; the queue is emptied."""
        out = self.outbound
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self.outbound_size = 0
        self.reply_size = 0
        self.server.metrics.bytes_out += len(data)
        return data

    # -- what handlers call ------------------------------------------------

    def send(self, payload: Mapping[str, Any]) -> None:
        """Send one JSON event to this connection."""
        if self.state is State.OPEN:
            self._queue(text_message(payload, self.server.config))

    def send_message(self, message: str | bytes) -> None:
        """Send a text (str) or binary (bytes) message as it is."""
        if self.state is State.OPEN:
            cfg = self.server.config
            opcode, payload = (_TEXT, message.encode()) if isinstance(message, str) else (_BINARY, bytes(message))
            self._queue(OutboundMessage(opcode, payload, cfg.compression_min_size, cfg.compression_level))

    def error(self, code: str, detail: str) -> None:
        self.send({"event": "error", "code": code, "detail": detail})

    def join(self, room: str, presence: bool = False) -> Room:
        """Join a room (created on first use); with ``presence`` the room tracks users."""
        return self.server._join(self, room, presence)

    def broadcast(self, room: str, payload: Mapping[str, Any], exclude: Connection | None = None) -> None:
        self.server.broadcast(room, payload, exclude=exclude)

    def emit(self, effect: Effect) -> None:
        self.server._effects.append(effect)

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake (the peer's close frame or ``close_timeout`` ends it)."""
        self.server._close(self, code, reason, wait=True)

    # -- internals ---------------------------------------------------------

    def reply(self, payload: Mapping[str, Any]) -> None:
        """Send one JSON event this connection asked for (a history page, a presence list).

        Such a reply may be large, and asking for a lot does not make a slow consumer: its
        bytes do not count against ``max_buffer`` (only against ``REPLY_ALLOWANCE`` times it,
        so one that asks again and again without reading is still closed)."""
        if self.state is State.OPEN:
            self._queue_raw(text_message(payload, self.server.config).frame_for(self.deflate_bits), reply=True)

    def _queue(self, message: OutboundMessage) -> None:
        self._queue_raw(message.frame_for(self.deflate_bits))

    def _queue_raw(self, data: bytes, reply: bool = False) -> None:
        """This connection's own output (events, control frames, HTTP answers), after what its rooms
        broadcast to it so far in this pass; pongs to a ping flood count against the buffer too."""
        if data:
            for room in self.rooms:
                if room._batch is not None and self not in room._detached:
                    self.server._detach(room, self)
            if reply:
                self.outbound.append(bytes(data))
                self.reply_size += len(data)
                self.server._pending[self] = None
                if self.reply_size > REPLY_ALLOWANCE * self.server.config.max_buffer:
                    self.server._slow.append(self)
            else:
                self._append(bytes(data))

    def _append(self, data: bytes) -> None:
        self.outbound.append(data)
        self.outbound_size += len(data)
        server = self.server
        server._pending[self] = None
        if self.outbound_size > server.config.max_buffer:
            server._slow.append(self)


# ---------------------------------------------------------------------------
# Rooms
# ---------------------------------------------------------------------------


class Room:
    """Members of one named room, and, for presence rooms, who is in it.

    Broadcasts of one pass (one input, or one ``tick``) collect in the room's batch, one
    list of frames per compression group, and leave as one bytes object shared by every
    member of the group (``Server.take_shared``): a pipelining sender's messages cost each
    recipient one write per pass, not one per message. Members that must not take the
    whole batch (the sender it excludes, a member that joined mid-pass or got output of its
    own in between) are *detached* for the rest of the pass and get frames one by one; so are
    members of several rooms, whose frames must keep their order across rooms.
    """

    __slots__ = (
        "_batch",
        "_detached",
        "_flush_at",
        "_log",
        "_multi",
        "_newcomers",
        "groups",
        "members",
        "name",
        "presence",
        "users",
    )

    def __init__(self, name: str, presence: bool) -> None:
        self.name = name
        self.members: dict[Connection, None] = {}
        self.groups: dict[int | None, dict[Connection, None]] = {}  # deflate window bits (None: off) -> members
        self._batch: dict[int | None, list[bytes]] | None = None  # this pass's frames per group, while open
        self._detached: dict[Connection, None] = {}  # members served one frame at a time until the pass ends
        self._multi: dict[Connection, None] = {}  # members of other rooms too: detached in every pass
        self.presence = presence
        self.users: dict[str, int] = {}  # user -> open connections in this room
        self._log: list[tuple[str, bool]] = []  # (user, joined) in this presence window
        self._newcomers: dict[Connection, None] = {}  # joined in this window: their state comes at its end
        self._flush_at: float | None = None

    def user_list(self) -> list[str]:
        return sorted(self.users)

    def diff(self) -> tuple[list[str], list[str]]:
        """Net joins and leaves in this window's log."""
        net: dict[str, int] = {}
        for user, joined in self._log:
            net[user] = net.get(user, 0) + (1 if joined else -1)
        joins = sorted(u for u, n in net.items() if n > 0)
        leaves = sorted(u for u, n in net.items() if n < 0)
        return joins, leaves


# ---------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------

_PING, _PONG_DUE, _HANDSHAKE, _CLOSING, _PRESENCE, _TOKEN_EXPIRY, _NODE_EXPIRY = range(7)

Verifier = Callable[[str], Mapping[str, Any]]
"""Checks a bearer token and returns its claims, or raises ``Unauthorized``."""


class RemoteNode:
    """Another instance as its presence heartbeats describe it: its users per room, until ``deadline``."""

    __slots__ = ("deadline", "rooms")

    def __init__(self) -> None:
        self.rooms: dict[str, frozenset[str]] = {}
        self.deadline = 0.0


class Server:
    """All connections and rooms of one hubbub instance; see the module docstring."""

    def __init__(
        self,
        router: Router,
        config: Config | None = None,
        http_routes: Mapping[str, HttpRoute] | None = None,
        verifier: Verifier | None = None,
    ) -> None:
        """``verifier`` turns on token authentication: every WebSocket handshake must carry a token
        (``?token=`` or ``Authorization: Bearer``) it accepts, and its ``sub`` claim is the user."""
        self.router = router
        self.config = config or Config()
        self.connections: dict[int, Connection] = {}
        self.rooms: dict[str, Room] = {}
        self.open_count = 0
        self._http_routes = {"/healthz": Server._healthz, **(http_routes or {})}
        self._next_id = 1
        self._addresses: dict[Any, int] = {}  # client address -> its sockets still open (handshakes included)
        self._pending: dict[Connection, None] = {}
        self._batched: list[Room] = []  # rooms with broadcasts in this pass, for take_shared
        self._slow: list[Connection] = []
        self._effects: list[Effect] = []
        self._timers: list[tuple[float, int, int, Any, int]] = []
        self._timer_seq = 0
        self._now = 0.0
        self._id_ms = 0
        self._id_seq = 0
        self.metrics = Metrics()
        self._verifier = verifier
        self._backends: dict[str, bool] = {}  # "store"/"broker" -> reachable, as the shell last saw it
        self._remote: dict[str, RemoteNode] = {}  # other instances' presence, by node tag
        self._remote_users: dict[str, dict[str, int]] = {}  # room -> user -> instances listing them
        self._last_id: dict[str, str] = {}  # node -> newest message id delivered from it
        self._presence_dirty = False

    # -- the API the shell drives -----------------------------------------

    def connect(self, peer: Any, now: float) -> Connection:
        """A new TCP connection: it must send its HTTP request within the handshake timeout."""
        self._now = now
        conn = Connection(self, self._next_id, peer, now)
        self._next_id += 1
        self.connections[conn.id] = conn
        addresses = self._addresses
        addresses[conn.address] = addresses.get(conn.address, 0) + 1
        self._schedule(conn._handshake_deadline, _HANDSHAKE, conn.id)
        return conn

    def receive(self, conn: Connection, data: bytes, now: float) -> None:
        """Feed bytes from the peer (``b""`` when it closed its side). Never raises for peer input."""
        self._now = now
        self.metrics.bytes_in += len(data)
        state = conn.state
        try:
            if state is State.OPEN or state is State.CLOSING:
                self._receive_frames(conn, data)
            elif state is State.HANDSHAKE:
                self._receive_request(conn, data)
        except Exception as exc:  # our bug, triggered by this peer's input: it costs this connection only
            self._contain("receive", conn, exc)
        self._settle()

    def resume(self, conn: Connection, now: float) -> None:
        """Handle the next budget of a backlogged connection's buffered input.

        After ``receive`` leaves a connection ``backlogged`` (it had more frames than
        ``Config.frames_per_pass``), the shell stops reading its socket and calls this in a
        later loop pass, after the other connections had their turn; it reads the socket
        again once the connection is no longer ``backlogged``."""
        self._now = now
        if conn.backlogged and (conn.state is State.OPEN or conn.state is State.CLOSING):
            try:
                self._process_frames(conn, self.config.frames_per_pass)
            except Exception as exc:
                self._contain("receive", conn, exc)
        else:
            conn.backlogged = False
        self._settle()

    def tick(self, now: float) -> float | None:
        """Run every timer that is due; return when the next one is (None: no timers)."""
        self._now = now
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, kind, target, seq = heapq.heappop(timers)
            try:
                self._fire(kind, target, seq, now)
            except Exception as exc:  # one timer's failure must not cost the others
                self._contain("timer", self.connections.get(target) if isinstance(target, int) else None, exc)
        self._settle()
        return timers[0][0] if timers else None

    def pending(self) -> list[Connection]:
        """Connections that gained output or closed since the last call.

        Room broadcasts not taken with ``take_shared`` are queued to each member first,
        so a shell that only calls ``pending`` and ``data_to_send`` sees everything."""
        if self._batched:
            for data, members in self._take_batches():
                for member in members:
                    member._append(data)
        self._settle()
        if not self._pending:
            return []
        conns = list(self._pending)
        self._pending.clear()
        return conns

    def take_shared(self) -> list[tuple[bytes, list[Connection]]]:
        """This pass's room broadcasts: (bytes, the connections that take exactly those bytes).

        The fast write path: one bytes object per room and compression group, written as it
        is to each listed connection's socket. Call it before ``pending``: output a connection
        gained before its room's first broadcast of the pass is in ``pending`` and must be
        written first; anything later was queued in order there and the connection is not
        listed here. A connection whose socket cannot take the bytes now gets them through
        ``enqueue``."""
        shared = self._take_batches()
        for data, members in shared:
            self.metrics.bytes_out += len(data) * len(members)
        return shared

    def enqueue(self, conn: Connection, data: bytes) -> None:
        """Queue shared bytes the shell could not write now (its socket is full), behind the
        connection's own output; they count against ``max_buffer`` (``pending`` closes it with 1013)."""
        if conn.state is State.OPEN:
            conn._append(data)

    def effects(self) -> list[Effect]:
        """Work for the shell's backends since the last call (store, history, logs)."""
        effects, self._effects = self._effects, []
        self._presence_dirty = False
        return effects

    def close_all(self, code: int = 1001, reason: str = "server shutting down") -> None:
        """Queue a close for every client (1001 on shutdown) and drop unfinished handshakes."""
        for conn in list(self.connections.values()):
            if conn.state is State.OPEN:
                self._close(conn, code, reason, wait=True)
            elif conn.state is State.HANDSHAKE:
                self._drop(conn)
        self._settle()

    def broadcast(self, room: str, payload: Mapping[str, Any], exclude: Connection | None = None) -> int:
        """Send one JSON event to every member of ``room`` but ``exclude``; returns the recipients.

        The event is serialised once (and compressed once per window size) and added to the
        room's batch for this pass; see ``Room`` and ``take_shared``. Nothing here is per recipient
        but the members detached for this pass.
        """
        target = self.rooms.get(room)
        if target is None:
            return 0
        count = self._add_to_batch(target, text_message(payload, self.config), (exclude,) if exclude else ())
        self.metrics.deliveries += count
        return count

    def _add_to_batch(self, target: Room, message: OutboundMessage, excluded: Collection[Connection]) -> int:
        """One message for every member of ``target`` but ``excluded``; returns how many get it."""
        batch = target._batch
        if batch is None:
            batch = target._batch = {}
            self._batched.append(target)
            if target._multi:
                target._detached.update(target._multi)
        detached = target._detached
        members = target.members
        count = len(members)
        for conn in excluded:
            if conn in members:
                count -= 1
                if conn not in detached:
                    self._detach(target, conn)
        for bits in target.groups:
            frames = batch.get(bits)
            if frames is None:
                batch[bits] = [message.frame_for(bits)]
            else:
                frames.append(message.frame_for(bits))
        for member in detached:
            if member not in excluded:
                member._append(message.frame_for(member.deflate_bits))
        return count

    def _detach(self, room: Room, conn: Connection) -> None:
        """From now until the pass ends, ``conn`` takes ``room``'s frames one by one (it gets the
        frames batched so far at once), so its own output and exclusions keep their order."""
        assert room._batch is not None
        room._detached[conn] = None
        frames = room._batch.get(conn.deflate_bits)
        if frames:
            conn._append(frames[0] if len(frames) == 1 else b"".join(frames))

    def _take_batches(self) -> list[tuple[bytes, list[Connection]]]:
        shared: list[tuple[bytes, list[Connection]]] = []
        for room in self._batched:
            batch, room._batch = room._batch, None
            detached = room._detached
            if detached:
                room._detached = {}
            if batch is None:
                continue
            for bits, frames in batch.items():
                group = room.groups.get(bits)
                if not group:
                    continue
                members = list(group)
                for member in detached:  # few: this pass's senders, late joiners, multi-room members
                    if member in group:
                        members.remove(member)
                if members:
                    shared.append((frames[0] if len(frames) == 1 else b"".join(frames), members))
        self._batched.clear()
        return shared

    def deliver(self, room: str, payload: Mapping[str, Any], node: str | None = None) -> int | None:
        """A message from the broker (another instance) for the local members of ``room``.

        Returns how many members it went to, or None when it was dropped as already delivered.

        With the publishing instance's ``node`` tag, each message is delivered once and in
        order: our own messages coming back are ignored (we delivered them when they were
        sent), and so is any id not newer than the last one delivered from that node (a
        publisher that replays after a broker outage may resend what already arrived).
        """
        if node is not None:
            if node == self.config.node:
                return None
            message_id = payload.get("id")
            if isinstance(message_id, str):
                last = self._last_id.get(node)
                if last is not None and message_id <= last:
                    self.metrics.duplicates += 1
                    return None
                self._last_id[node] = message_id
        try:
            count: int | None = self.broadcast(room, payload)
        except Exception as exc:  # a message we cannot re-encode costs that message, not the stream
            self._contain("deliver", None, exc)
            count = None
        self._settle()
        return count

    def ack(self, acks: Iterable[Ack]) -> None:
        """The store committed these messages: tell each sender that is still connected."""
        connections = self.connections
        for ack in acks:
            conn = connections.get(ack.conn_id)
            if conn is not None and ack.ref is not None:
                try:
                    conn.send({"event": "ack", "ref": ack.ref, "id": ack.id})
                except Exception as exc:  # one sender's ack must not cost the rest of the batch theirs
                    self._contain("ack", conn, exc)
        self._settle()

    def unavailable(self, acks: Iterable[Ack], detail: str) -> None:
        """The store could not keep these messages: each sender gets an ``unavailable`` error."""
        connections = self.connections
        for ack in acks:
            conn = connections.get(ack.conn_id)
            if conn is not None:
                error = {"event": "error", "code": "unavailable", "detail": detail, "id": ack.id}
                if ack.ref is not None:
                    error["ref"] = ack.ref
                try:
                    conn.send(error)
                except Exception as exc:
                    self._contain("ack", conn, exc)
        self._settle()

    def history_reply(self, conn_id: int, room: str, messages: list[Mapping[str, Any]]) -> None:
        """The store's answer to a ``History`` effect."""
        conn = self.connections.get(conn_id)
        if conn is not None:
            try:
                conn.reply(self.history_page(room, messages))
            except Exception as exc:
                self._contain("history", conn, exc)
            self._settle()

    def history_page(self, room: str, messages: list[Mapping[str, Any]]) -> dict[str, Any]:
        """A ``history`` event that fits in ``max_buffer``: the newest messages that fit, oldest first,
        with ``"truncated": true`` when older ones had to be left out (the client pages on with
        ``before`` set to the first id). Sixty 60 KB messages must not make a reply no client can take."""
        page: dict[str, Any] = {"event": "history", "room": room, "messages": messages}
        budget = self.config.max_buffer
        if len(_encode_json(page).encode()) <= budget:
            return page
        used = len(_encode_json({**page, "messages": [], "truncated": True}).encode())
        kept = 0
        for message in reversed(messages):
            used += len(_encode_json(message).encode()) + 1
            if used > budget and kept:
                break
            kept += 1
        return {**page, "messages": messages[len(messages) - kept :], "truncated": True}

    def history_failed(self, conn_id: int, detail: str) -> None:
        """The store could not answer a ``History`` effect."""
        conn = self.connections.get(conn_id)
        if conn is not None:
            conn.error("unavailable", detail)

    def set_available(self, backend: str, up: bool) -> None:
        """The shell's latest word on a backend ("store", "broker"); /healthz answers 503 while one is down."""
        self._backends[backend] = up

    def available(self, backend: str) -> bool:
        """False only after the shell said ``backend`` is down (handlers refuse to write then)."""
        return self._backends.get(backend, True)

    # -- presence across instances ------------------------------------------

    def local_presence(self) -> dict[str, list[str]]:
        """This instance's own users per presence room: what its heartbeats tell the others."""
        return {name: room.user_list() for name, room in self.rooms.items() if room.presence and room.users}

    def remote_presence(self, node: str, rooms: Mapping[str, Iterable[str]] | None, now: float) -> None:
        """Another instance's heartbeat: its users per presence room (None: it said goodbye).

        Its users count as present until ``presence_ttl`` passes without another heartbeat.
        """
        if node == self.config.node:
            return
        self._now = now
        try:
            self._remote_heartbeat(node, rooms, now)
        except Exception as exc:  # a malformed heartbeat costs that heartbeat
            self._contain("presence", None, exc)
        self._settle()

    def _remote_heartbeat(self, node: str, rooms: Mapping[str, Iterable[str]] | None, now: float) -> None:
        remote = self._remote.get(node)
        if rooms is None:
            if remote is not None:
                self._expire_node(node)
            return
        if remote is None:
            remote = self._remote[node] = RemoteNode()
        new = {room: frozenset(users) for room, users in rooms.items()}
        old = remote.rooms
        remote.rooms = new
        for room in old.keys() | new.keys():
            before, after = old.get(room, frozenset()), new.get(room, frozenset())
            if before != after:
                self._remote_change(room, after - before, before - after)
        remote.deadline = now + self.config.presence_ttl
        self._schedule(remote.deadline, _NODE_EXPIRY, node)

    def _expire_node(self, node: str) -> None:
        remote = self._remote.pop(node)
        self._last_id.pop(node, None)
        for room, users in remote.rooms.items():
            self._remote_change(room, frozenset(), users)

    def _remote_change(self, name: str, joined: Iterable[str], left: Iterable[str]) -> None:
        counts = self._remote_users.setdefault(name, {})
        room = self.rooms.get(name)
        for user in joined:
            n = counts.get(user, 0)
            counts[user] = n + 1
            if n == 0 and room is not None and room.presence and user not in room.users:
                self._presence_event(room, user, True)
        for user in left:
            n = counts.get(user, 0) - 1
            if n > 0:
                counts[user] = n
                continue
            counts.pop(user, None)
            if room is not None and room.presence and user not in room.users:
                self._presence_event(room, user, False)
        if not counts:
            del self._remote_users[name]

    def _presence_changed(self) -> None:
        if not self._presence_dirty:
            self._presence_dirty = True
            self._effects.append(PresenceChanged())

    def new_id(self) -> str:
        """A unique, time-ordered message id: milliseconds, a sequence and the node tag."""
        ms = int(self._now * 1000)
        if ms > self._id_ms:
            self._id_ms, self._id_seq = ms, 0
        else:
            self._id_seq += 1
        return f"{self._id_ms:012x}{self._id_seq:06x}{self.config.node}"

    @property
    def next_deadline(self) -> float | None:
        """When ``tick`` next has work to do (None: no timer is set)."""
        return self._timers[0][0] if self._timers else None

    @property
    def now(self) -> float:
        """The time of the input being handled, as the shell passed it (Unix seconds)."""
        return self._now

    def stats(self) -> dict[str, Any]:
        """Counts only, never content: what /healthz reports."""
        by_route: dict[str, int] = {}
        for conn in self.connections.values():
            if conn.state is State.OPEN and conn.endpoint is not None:
                by_route[conn.endpoint.name] = by_route.get(conn.endpoint.name, 0) + 1
        presence_users = sum(len(r.users) for r in self.rooms.values() if r.presence)
        down = sorted(name for name, up in self._backends.items() if not up)
        return {
            "status": "unavailable" if down else "ok",
            "backends": {name: "up" if up else "down" for name, up in sorted(self._backends.items())},
            "instances": len(self._remote) + 1,
            "connections": self.open_count,
            "sockets": len(self.connections),
            "rooms": len(self.rooms),
            "presence_users": presence_users,
            "routes": by_route,
        }

    # -- handshake ----------------------------------------------------------

    def _receive_request(self, conn: Connection, data: bytes) -> None:
        http = conn._http
        assert http is not None
        if not data:
            self._drop(conn)
            return
        try:
            http.receive_data(data)
            event = http.next_event()
        except h11.RemoteProtocolError as exc:
            self._answer(conn, exc.error_status_hint, f"bad request: {exc}\n")
            return
        if event is h11.NEED_DATA:
            return
        if not isinstance(event, h11.Request):
            self._answer(conn, 400, "bad request\n")
            return
        self._handle_request(conn, event, http.trailing_data[0])

    def _handle_request(self, conn: Connection, request: h11.Request, trailing: bytes) -> None:
        cfg = self.config
        headers: dict[bytes, bytes] = {}
        head_size = len(request.target)
        raw_items = request.headers.raw_items()  # a list: iterating h11's Headers itself is slow
        for raw_name, value in raw_items:
            name = raw_name.lower()
            headers[name] = headers[name] + b", " + value if name in headers else value
            head_size += len(name) + len(value) + 4
        if len(raw_items) > cfg.max_headers:
            self._answer(conn, 431, "too many headers\n")
            return
        # h11 bounds only a head still arriving; one that arrived whole in a single read is measured here
        if head_size > cfg.max_header_bytes:
            self._answer(conn, 431, "request line and headers too large\n")
            return
        try:
            target = request.target.decode("ascii")
            split = urlsplit(target)
        except (UnicodeDecodeError, ValueError):
            self._answer(conn, 400, "bad request target\n")
            return
        if cfg.allowed_hosts is not None and not self._host_allowed(headers.get(b"host")):
            self._answer(conn, 400, "invalid Host header\n")
            return
        path = split.path
        method = request.method
        upgrade = b"websocket" in headers.get(b"upgrade", b"").lower()
        if not upgrade:
            self._answer_http(conn, method, path, headers)
            return
        try:
            match = self.router.match(path)
        except ValueError as exc:
            self._answer(conn, 400, f"{exc}\n")
            return
        if match is None:
            self._answer(conn, 404, "no such route\n")
            return
        if method != b"GET":
            self._answer(conn, 405, "method not allowed\n", headers=[("Allow", "GET")])
            return
        connection_tokens = [t.strip() for t in headers.get(b"connection", b"").lower().split(b",")]
        if b"upgrade" not in connection_tokens:
            self._answer(conn, 400, "missing 'Connection: Upgrade'\n")
            return
        if headers.get(b"sec-websocket-version") != b"13":
            self._answer(
                conn, 426, "only WebSocket version 13 is supported\n", headers=[("Sec-WebSocket-Version", "13")]
            )
            return
        key = headers.get(b"sec-websocket-key", b"")
        try:
            valid_key = len(base64.b64decode(key, validate=True)) == 16
        except (binascii.Error, ValueError):
            valid_key = False
        if not valid_key:
            self._answer(conn, 400, "missing or invalid Sec-WebSocket-Key\n")
            return
        if not self._origin_allowed(headers.get(b"origin"), headers.get(b"host")):
            self._answer(conn, 403, "origin not allowed\n")
            return
        try:
            query = dict(parse_qsl(split.query, errors="strict", max_num_fields=cfg.max_headers))
        except (UnicodeDecodeError, ValueError):
            self._answer(conn, 400, "bad query string (not UTF-8, or too many fields)\n")
            return
        if self._verifier is None:
            problem = self._bad_user(query.get("user", ""))
            if problem:
                self._answer(conn, 400, f"bad user name: it {problem}\n")
                return
        elif not self._authenticate(conn, match, query, headers):
            return
        per_address = cfg.max_connections_per_address
        if per_address > 0 and self._addresses.get(conn.address, 0) > per_address:
            self._answer(
                conn, 429, "too many connections from your address, try again later\n", headers=[("Retry-After", "5")]
            )
            return
        if self.open_count >= cfg.max_connections:
            self._answer(conn, 503, "server full, try again later\n", headers=[("Retry-After", "5")])
            return
        self._upgrade(conn, match, query, key, headers, trailing)

    def _authenticate(
        self, conn: Connection, match: Match, query: Mapping[str, str], headers: Mapping[bytes, bytes]
    ) -> bool:
        """Token authentication before the upgrade: 401 without a valid token, 403 for a room
        outside its ``rooms`` claim. The token's ``exp`` becomes a timer that closes with 1008."""
        assert self._verifier is not None
        token = query.get("token")
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            token = credentials.strip()
        bearer = [("WWW-Authenticate", 'Bearer realm="hubbub"')]
        if not token:
            self._answer(conn, 401, "a token is required (?token= or Authorization: Bearer)\n", headers=bearer)
            return False
        try:
            claims = self._verifier(token)
        except Unauthorized as exc:
            self._answer(conn, 401, f"invalid token: {printable(str(exc))}\n", headers=bearer)
            return False
        except Exception as exc:  # a verifier's surprise (an overflowing claim, say) is a bad token, not a crash
            self._contain("verifier", None, exc)
            self._answer(conn, 401, "invalid token\n", headers=bearer)
            return False
        user = claims.get("sub")
        if not isinstance(user, str) or not user:
            self._answer(conn, 401, "invalid token: no 'sub' claim\n", headers=bearer)
            return False
        problem = self._bad_user(user)
        if problem:
            self._answer(conn, 401, f"invalid token: 'sub' {problem}\n", headers=bearer)
            return False
        expires = claims.get("exp")
        if expires is not None:
            if isinstance(expires, bool) or not isinstance(expires, (int, float)):
                self._answer(conn, 401, "invalid token: 'exp' must be a number\n", headers=bearer)
                return False
            if not -_MAX_TIMESTAMP < expires < _MAX_TIMESTAMP:
                self._answer(conn, 401, "invalid token: 'exp' is out of range\n", headers=bearer)
                return False
        allowed = claims.get("rooms")
        if allowed is not None and match.endpoint.rooms is not None:
            patterns = [allowed] if isinstance(allowed, str) else allowed
            if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
                self._answer(conn, 401, "invalid token: 'rooms' must be a list of patterns\n", headers=bearer)
                return False
            for room in match.endpoint.rooms(match.params):
                if not any(fnmatch.fnmatchcase(room, p) for p in patterns):
                    self._answer(conn, 403, f"this token may not join room {room[:64]!r}\n")
                    return False
        conn.user = user
        conn.claims = claims
        if expires is not None:
            self._schedule(float(expires), _TOKEN_EXPIRY, conn.id)
        return True

    def _bad_user(self, user: str) -> str | None:
        """Why ``user`` cannot be a user name (None: it can): too long, control characters, or not
        encodable (a lone surrogate from a token's JSON). Names go into every message and presence list."""
        try:
            size = len(user.encode())
        except UnicodeEncodeError:
            return "is not valid UTF-8"
        if size > self.config.max_user_bytes:
            return f"is longer than {self.config.max_user_bytes} bytes"
        if _CONTROL.search(user):
            return "holds control characters"
        return None

    def _host_allowed(self, host: bytes | None) -> bool:
        """The Host header names this server (``allowed_hosts``), as a DNS-rebinding defence."""
        allowed = self.config.allowed_hosts
        assert allowed is not None
        if host is None:
            return False
        name = host.decode("latin-1").strip().lower()
        if name.startswith("["):  # [::1]:8765
            name = name[: name.find("]") + 1]
        else:
            name = name.rsplit(":", 1)[0]
        for pattern in allowed:
            if pattern == "*" or name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:])):
                return True
        return False

    def _origin_allowed(self, origin: bytes | None, host: bytes | None) -> bool:
        if origin is None:
            return True  # not a browser: Origin only protects browsers' ambient credentials
        allowed = self.config.allowed_origins
        text = origin.decode("latin-1").strip().lower()
        if allowed is None:
            netloc = urlsplit(text).netloc
            return host is not None and netloc == host.decode("latin-1").strip().lower()
        return "*" in allowed or text in allowed

    def _upgrade(
        self,
        conn: Connection,
        match: Match,
        query: Mapping[str, str],
        key: bytes,
        headers: Mapping[bytes, bytes],
        trailing: bytes,
    ) -> None:
        cfg = self.config
        endpoint = match.endpoint
        max_size = endpoint.max_message_size or cfg.max_message_size
        conn.endpoint = endpoint
        conn.params = match.params
        conn.query = dict(query)
        if self._verifier is None:  # with tokens, _authenticate set the user from "sub"
            conn.user = conn.query.get("user") or "anonymous"
        response = [
            "HTTP/1.1 101 Switching Protocols",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Accept: {generate_accept_token(key).decode()}",
        ]
        extensions: list[Extension] = []
        offers = headers.get(b"sec-websocket-extensions")
        if cfg.compression and offers:
            negotiated = negotiate_deflate(offers.decode("latin-1").split(","), max_size)
            if negotiated is not None:
                deflate_ext, accept_header = negotiated
                extensions.append(deflate_ext)
                conn.deflate_bits = deflate_ext.server_max_window_bits
                response.append(f"Sec-WebSocket-Extensions: {accept_header}")
        extensions.append(SizeLimit(max_size))
        conn._queue_raw(("\r\n".join(response) + "\r\n\r\n").encode("latin-1"))
        conn._http = None
        conn.status = 101
        conn._ws = WSConnection(ConnectionType.SERVER, extensions)
        conn.state = State.OPEN
        self.open_count += 1
        if cfg.ping_interval > 0:
            self._schedule(self._now + cfg.ping_interval, _PING, conn.id)
        if endpoint.on_open is not None:
            self._call(conn, endpoint.on_open, conn)
        if trailing and conn.state is State.OPEN:
            self._receive_frames(conn, trailing)

    def _answer_http(self, conn: Connection, method: bytes, path: str, headers: Mapping[bytes, bytes]) -> None:
        route = self._http_routes.get(path)
        if route is None:
            try:
                websocket_route = self.router.match(path) is not None
            except ValueError:
                websocket_route = True  # a route's path with a bad parameter: still not plain HTTP
            if websocket_route:
                self._answer(conn, 426, "this is a WebSocket endpoint\n", headers=[("Upgrade", "websocket")])
            else:
                self._answer(conn, 404, "not found\n")
            return
        if method not in (b"GET", b"HEAD"):
            self._answer(conn, 405, "method not allowed\n", headers=[("Allow", "GET, HEAD")])
            return
        status, body, content_type, *own = route(self, headers)
        extra = list(own[0]) if own else []
        if not any(name.lower() == "cache-control" for name, _ in extra):
            extra.append(("Cache-Control", "no-store"))
        response = http_response(status, body, content_type, headers=extra)
        if method == b"HEAD":
            response = response[: len(response) - len(body)]
        conn._queue_raw(response)
        conn.status = status
        self._set_closed(conn)

    def _answer(
        self, conn: Connection, status: int, text: str, headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        """Refuse with a real HTTP response, then close: never accept-then-close."""
        conn._queue_raw(http_response(status, text.encode(), headers=headers))
        conn.status = status
        rejections = self.metrics.rejections
        rejections[status] = rejections.get(status, 0) + 1
        self._set_closed(conn)

    def _healthz(self, headers: Mapping[bytes, bytes]) -> HttpReply:
        stats = self.stats()
        status = 200 if stats["status"] == "ok" else 503
        return status, (_encode_json(stats) + "\n").encode(), "application/json"

    # -- frames -------------------------------------------------------------

    def _receive_frames(self, conn: Connection, data: bytes) -> None:
        ws = conn._ws
        assert ws is not None
        if not data:
            if conn.backlogged:  # what the peer sent before it closed still counts
                self._process_frames(conn, None)
            if conn.state is not State.CLOSED:
                self._drop(conn, 1006)
            return
        ws.receive_data(data)
        self._process_frames(conn, self.config.frames_per_pass)

    def _process_frames(self, conn: Connection, budget: int | None) -> None:
        """Handle the frames wsproto has buffered, at most ``budget`` of them (None: all).

        A connection that had more is *backlogged*: the rest stays in wsproto's buffer, the
        shell stops reading its socket and calls ``resume`` in a later loop pass, after every
        other connection had its turn. So one connection's flood delays the others by one
        budget at most, however much it sends in one read."""
        ws = conn._ws
        assert ws is not None
        conn.backlogged = False
        left = budget if budget is not None and budget > 0 else -1
        for event in ws.events():
            if conn.state is State.CLOSED:
                return
            if isinstance(event, TextMessage) or isinstance(event, BytesMessage):
                if conn.state is State.OPEN:
                    if event.message_finished or not event.frame_finished or self._admit_rate(conn, False):
                        self._on_data(conn, event)
            elif isinstance(event, Ping):
                if ws.state is WSState.OPEN and self._admit_rate(conn, False):
                    conn._queue_raw(ws.send(Pong(event.payload)))
            elif isinstance(event, Pong):
                if self._admit_rate(conn, False) and event.payload == str(conn._ping_seq).encode():
                    conn._pong_due = False
            elif isinstance(event, CloseConnection):
                self._on_close_frame(conn, event)
            left -= 1
            if left == 0:
                conn.backlogged = conn.state is not State.CLOSED
                return

    def _on_close_frame(self, conn: Connection, event: CloseConnection) -> None:
        ws = conn._ws
        assert ws is not None
        if ws.state is WSState.REMOTE_CLOSING:  # the peer starts the closing handshake: answer it
            conn._queue_raw(ws.send(CloseConnection(event.code)))
            self._leave_all(conn, event.code, event.reason)
            self._set_closed(conn)
        elif ws.state is WSState.CLOSED:  # the peer answered our close
            self._set_closed(conn)
        elif conn.state is State.OPEN:  # wsproto found a protocol violation (1002, 1007, 1009): fail it
            self._close(conn, event.code, event.reason, wait=False)
        else:  # a violation while we wait for the peer's close: its parser has stopped, so fail it now
            self._set_closed(conn)

    def _on_data(self, conn: Connection, event: TextMessage | BytesMessage) -> None:
        endpoint = conn.endpoint
        assert endpoint is not None
        if isinstance(event, BytesMessage):
            if endpoint.on_raw is None:
                self._close(conn, 1003, "binary messages are not supported on this route", wait=True)
                return
            conn._binary = True
        conn._parts.append(event.data)
        if not event.message_finished:
            return
        parts = conn._parts
        conn._parts = []
        if conn._binary:
            conn._binary = False
            message: str | bytes = parts[0] if len(parts) == 1 else b"".join(parts)  # type: ignore[arg-type]
        else:
            message = parts[0] if len(parts) == 1 else "".join(parts)  # type: ignore[arg-type]
        if not self._admit_rate(conn):
            return
        counts = self.metrics.messages_in
        counts[endpoint.name] = counts.get(endpoint.name, 0) + 1
        if endpoint.on_raw is not None:
            self._call(conn, endpoint.on_raw, conn, message)
        else:
            self._dispatch(conn, endpoint, message)  # type: ignore[arg-type]

    def _admit_rate(self, conn: Connection, message: bool = True) -> bool:
        """Token bucket: refill at rate_limit/s up to one second's worth; debt past that closes 1008.

        Every frame costs a token: each message, and also each ping, pong and fragment that does
        not end a message (``message`` False), so a flood of those is closed like one of messages.
        Over the rate, a message is dropped with a ``rate_limited`` error; a control frame or
        fragment just costs its token (a fragment still counts toward its message)."""
        rate = self.config.rate_limit
        if rate <= 0:
            return True
        now = self._now
        tokens = min(rate, conn._tokens + (now - conn._tokens_at) * rate) - 1
        conn._tokens, conn._tokens_at = tokens, now
        if tokens >= 0:
            return True
        if tokens < -rate:
            self._close(conn, 1008, "rate limit exceeded", wait=True)
        elif message:
            conn.error("rate_limited", f"more than {rate:g} messages per second; this one was dropped")
        return not message and conn.state is State.OPEN

    def _dispatch(self, conn: Connection, endpoint: Endpoint, text: str) -> None:
        try:
            event = decode_event(text)
        except RecursionError:
            conn.error("bad_json", "JSON nested too deeply")
            return
        except ValueError as exc:
            conn.error("bad_json", f"invalid JSON: {exc}")
            return
        if not isinstance(event, dict):
            conn.error("not_object", "expected a JSON object")
            return
        name = event.get("event")
        if not isinstance(name, str):
            conn.error("missing_event", 'expected a string field "event"')
            return
        handler = endpoint.events.get(name)
        if handler is None:
            conn.error("unknown_event", f"unknown event {name[:64]!r}")
            return
        self._call(conn, handler, conn, event)

    def _call(self, conn: Connection, fn: Callable[..., None], *args: Any) -> None:
        """Run application code: EventError answers the client; anything else closes 1011."""
        try:
            fn(*args)
        except EventError as exc:
            conn.error(exc.code, exc.detail)
        except Exception as exc:  # a handler's bug must not take the server down with it
            self._contain("handler", conn, exc)

    def _contain(self, where: str, conn: Connection | None, exc: Exception) -> None:
        """An exception escaped one step (``where``): count it, hand it to the shell's log as a
        ``Failure``, and fail the connection it was working for (if any) with 1011. Nothing else
        of the pass is lost: the caller goes on with its next item."""
        failures = self.metrics.failures
        failures[where] = failures.get(where, 0) + 1
        self._effects.append(Failure(conn.id if conn is not None else None, exc, where))
        if conn is None:
            return
        if conn.state is State.OPEN:
            self._close(conn, 1011, "internal error", wait=False)
        elif conn.state is State.HANDSHAKE:
            self._answer(conn, 500, "internal error\n")
        elif conn.state is State.CLOSING:
            self._set_closed(conn)

    # -- closing --------------------------------------------------------------

    def _close(self, conn: Connection, code: int, reason: str, wait: bool) -> None:
        """Send our close frame; wait for the peer's (``wait``) or fail the connection now."""
        if conn.state is not State.OPEN:
            return
        ws = conn._ws
        assert ws is not None
        if ws.state is WSState.OPEN:
            conn._queue_raw(ws.send(CloseConnection(code, reason)))
        self._leave_all(conn, code, reason)
        if wait:
            conn.state = State.CLOSING
            self._schedule(self._now + self.config.close_timeout, _CLOSING, conn.id)
        else:
            self._set_closed(conn)

    def _drop(self, conn: Connection, code: int = 1006) -> None:
        """The socket is gone or must go without ceremony."""
        if conn.state is State.OPEN:
            self._leave_all(conn, code, "")
        if conn.state is not State.CLOSED:
            conn.outbound.clear()
            conn.outbound_size = 0
            self._set_closed(conn)

    def _leave_all(self, conn: Connection, code: int, reason: str) -> None:
        """The connection stops being a member anywhere: it has left OPEN."""
        conn.close_code, conn.close_reason = code, reason
        self.open_count -= 1
        for room in conn.rooms:
            self._leave(conn, room)
        conn.rooms = []
        endpoint = conn.endpoint
        if endpoint is not None and endpoint.on_close is not None:
            conn.state = State.CLOSING  # handlers may not send to a leaving connection
            self._call(conn, endpoint.on_close, conn)

    def _set_closed(self, conn: Connection) -> None:
        if conn.state is not State.CLOSED:
            addresses = self._addresses
            left = addresses.get(conn.address, 1) - 1
            if left > 0:
                addresses[conn.address] = left
            else:
                addresses.pop(conn.address, None)
        conn.state = State.CLOSED
        conn.backlogged = False
        conn._ws = None
        conn._http = None
        conn._parts = []
        self._pending[conn] = None
        self.connections.pop(conn.id, None)

    def _settle(self) -> None:
        """After each input: fail the slow consumers it produced."""
        default = self.config.max_buffer
        while self._slow:
            slow, self._slow = self._slow, []
            for conn in slow:
                endpoint = conn.endpoint
                limit = max(default, endpoint.max_buffer or 0) if endpoint is not None else default
                if conn.state is State.OPEN and (
                    conn.outbound_size > limit or conn.reply_size > REPLY_ALLOWANCE * limit
                ):
                    # It is not reading: drop what it has not taken (its rooms' batches of this
                    # pass included) and fail it with 1013. An upgrade answer still unsent stays:
                    # the client gets its 101 before the close, never a bare close frame.
                    for room in conn.rooms:
                        if room._batch is not None:
                            room._detached[conn] = None
                    head = conn.outbound[0] if conn.outbound and conn.outbound[0].startswith(b"HTTP/") else None
                    conn.outbound.clear()
                    if head is not None:
                        conn.outbound.append(head)
                    conn.outbound_size = conn.reply_size = 0
                    self.metrics.slow_consumers += 1
                    self._close(conn, 1013, "slow consumer: outbound buffer full", wait=False)

    # -- rooms and presence ---------------------------------------------------

    def _join(self, conn: Connection, name: str, presence: bool) -> Room:
        if conn.state is not State.OPEN:
            raise UsageError(f"cannot join {name!r}: connection {conn.id} is {conn.state.value}")
        room = self.rooms.get(name)
        if room is None:
            room = self.rooms[name] = Room(name, presence)
        if conn in room.members:
            return room
        room.members[conn] = None
        group = room.groups.get(conn.deflate_bits)
        if group is None:
            group = room.groups[conn.deflate_bits] = {}
        group[conn] = None
        if room._batch is not None:
            room._detached[conn] = None  # it must not get what was broadcast before it joined
        conn.rooms.append(room)
        if len(conn.rooms) > 1:
            for each in conn.rooms:
                each._multi[conn] = None
                if each._batch is not None and conn not in each._detached:
                    self._detach(each, conn)
        user = conn.user
        count = room.users.get(user, 0)
        room.users[user] = count + 1
        if room.presence:
            room._newcomers[conn] = None
            if count == 0:
                self._presence_changed()
                if user not in self._remote_users.get(name, ()):
                    room._log.append((user, True))
            self._open_window(room)
        return room

    def _leave(self, conn: Connection, room: Room) -> None:
        room.members.pop(conn, None)
        group = room.groups.get(conn.deflate_bits)
        if group is not None:
            group.pop(conn, None)
            if not group:
                del room.groups[conn.deflate_bits]
        room._detached.pop(conn, None)
        room._multi.pop(conn, None)
        room._newcomers.pop(conn, None)
        user = conn.user
        count = room.users.get(user, 0) - 1
        if count > 0:
            room.users[user] = count
        else:
            room.users.pop(user, None)
            if room.presence:
                self._presence_changed()
                if user not in self._remote_users.get(room.name, ()):
                    self._presence_event(room, user, False)
        if not room.members and room._flush_at is None:
            self.rooms.pop(room.name, None)

    def _presence_event(self, room: Room, user: str, joined: bool) -> None:
        room._log.append((user, joined))
        self._open_window(room)

    def _open_window(self, room: Room) -> None:
        if room._flush_at is None:
            room._flush_at = self._now + self.config.presence_window
            self._schedule(room._flush_at, _PRESENCE, room)

    def _flush_presence(self, room: Room) -> None:
        """End a presence window: members get its net joins and leaves (one shared diff); those
        who joined during it get the state as it is now instead (one list, encoded once).

        Whatever the burst (a reconnect storm of thousands), a window costs one sort of the
        users, two encodes and one write per member."""
        joins, leaves = room.diff()
        newcomers = room._newcomers
        if joins or leaves:
            diff = {"event": "presence_diff", "joins": joins, "leaves": leaves}
            self._add_to_batch(room, text_message(diff, self.config), newcomers)
        if newcomers:
            state = text_message({"event": "presence_state", "users": self.presence(room.name)}, self.config)
            for conn in newcomers:
                conn._queue_raw(state.frame_for(conn.deflate_bits), reply=True)
        room._log = []
        room._newcomers = {}
        room._flush_at = None
        if not room.members:
            self.rooms.pop(room.name, None)

    def presence(self, room: str) -> list[str]:
        """Users present in a room on this instance and the others, sorted."""
        target = self.rooms.get(room)
        local = target.users.keys() if target is not None else ()
        remote = self._remote_users.get(room)
        if not remote:
            return sorted(local)
        return sorted(remote.keys() | local)

    # -- timers ---------------------------------------------------------------

    def _schedule(self, when: float, kind: int, target: Any, seq: int = 0) -> None:
        """Timers name connections by id, so a closed connection is freed before its timers expire."""
        self._timer_seq += 1
        heapq.heappush(self._timers, (when, self._timer_seq, kind, target, seq))

    def _fire(self, kind: int, target: Any, seq: int, now: float) -> None:
        if kind == _PRESENCE:
            self._flush_presence(target)
            return
        if kind == _NODE_EXPIRY:
            remote = self._remote.get(target)
            if remote is not None and remote.deadline <= now:
                self._expire_node(target)
            return
        conn = self.connections.get(target)
        if conn is None:
            return  # closed since: nothing to do
        if kind == _HANDSHAKE:
            if conn.state is State.HANDSHAKE:
                self._drop(conn)
        elif kind == _CLOSING:
            if conn.state is State.CLOSING:
                self._set_closed(conn)
        elif kind == _PING:
            if conn.state is State.OPEN and conn._ws is not None:
                conn._ping_seq += 1
                conn._pong_due = True
                conn._queue_raw(conn._ws.send(Ping(str(conn._ping_seq).encode())))
                cfg = self.config
                self._schedule(now + cfg.ping_timeout, _PONG_DUE, conn.id, conn._ping_seq)
                self._schedule(now + max(cfg.ping_interval, cfg.ping_timeout), _PING, conn.id)
        elif kind == _PONG_DUE:
            if conn.state is State.OPEN and conn._pong_due and conn._ping_seq == seq:
                self._close(conn, 1011, "keepalive ping timeout", wait=False)
        elif kind == _TOKEN_EXPIRY:
            if conn.state is State.OPEN:
                self._close(conn, 1008, "token expired", wait=True)
