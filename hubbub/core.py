"""hubbub's sans-io core: it decides, it never does.

Bytes and the current time go in; bytes per connection and a short list of
effects come out. No sockets, no event loop, no clock of its own and no
module-level mutable state, so one process can run several ``Server`` objects
and a test can replay a whole session (ping timeouts included) in microseconds.

The file reads top-down, and each class owns its state; the others reach it
through its public methods:

- ``Config`` (every limit), the effects (``Stored``, ``Publish``, ``History``,
  ``PresenceChanged``, ``Failure``) and ``Metrics`` (counts only): plain values.
- ``decode_event``, ``OutboundMessage``: strict JSON in, frames out, encoded once.
- ``BoundedDeflate``, ``SizeLimit``: wsproto extensions that bound inflating and message size.
- ``Router``: path templates to ``Endpoint``s, the routes' handlers.
- ``Gatekeeper``: the handshake as a pure decision: ``Refuse``, ``ServeHttp``, ``CallEndpoint`` (an
  ``HttpEndpoint`` of the server API, answered on a keep-alive connection) or ``Upgrade``;
  ``Handshakes`` carries the decisions out and owns the handshake deadlines and per-address counts.
- ``Timers``: one heap of deadlines, by ``TimerKind``.
- ``Connection``: one client: its parsers (``RequestReader`` for its HTTP side), output queue,
  rate bucket and keepalive; and the API handlers use (they are never handed the server).
- ``Room``: one room's members, per-pass batch and presence window; ``Rooms``: all of them,
  joins, leaves and presence.
- ``Cluster``: the other instances, as their heartbeats describe them; duplicate detection.
- ``Messages``: a message's way through the instance: ids, publish keys, recoveries, the pass's
  effects for the backends, and the backends' answers (broker deliveries, store acks and reads).
- ``Server``: ties them together: the shell's API, frame dispatch, timers and the close
  lifecycle (``send_close``, ``fail``, ``abort``).

Typical use from an event loop (README.md, "Embedding the core", has a complete one)::

    server = Server(router, Config())
    conn = server.connect(peer=("127.0.0.1", 50422), now=now)
    server.receive(conn, data, now)         # b"" means the peer closed its side
    for effect in server.effects():         # Stored, History, Publish: the backends carry them out
        ...                                 # and answer with server.ack(...), history_reply(...)
    shared = server.take_shared()           # each room's broadcasts of the pass: one bytes object
    for c in server.pending():              # connections that gained output of their own: first
        transport_of[c].write(c.data_to_send())
        if c.closed: transport_of[c].close()
    for data, members in shared:
        for c in members: transport_of[c].write(data)
    deadline = server.tick(now)             # keepalive, handshake and close timers, presence windows
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
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple
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
    "CallEndpoint",
    "Config",
    "Connection",
    "Decision",
    "Endpoint",
    "EventError",
    "Failure",
    "Gatekeeper",
    "History",
    "HttpEndpoint",
    "HttpError",
    "HttpReply",
    "HttpRequest",
    "HttpRoute",
    "Match",
    "Metrics",
    "PresenceChanged",
    "Publish",
    "PublishOrdered",
    "Refuse",
    "Room",
    "Router",
    "ServeHttp",
    "Server",
    "State",
    "Stored",
    "TimerKind",
    "Unauthorized",
    "Upgrade",
    "UsageError",
    "compact",
    "decode_event",
    "encode_frame",
    "healthz",
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
    max_rooms_per_connection: int = _setting(
        100, "rooms one /ws connection may be in at once; a join past it is refused with too_many_rooms"
    )
    read_only_rooms: tuple[str, ...] | None = _setting(
        None, "room name patterns (globs) where no client may publish, only the server; refused with forbidden"
    )
    history_max: int = _setting(100, "largest limit a history request may ask for")
    recover_max: int = _setting(
        1000, "most messages a /ws join with since recovers in its joined reply; a longer gap answers "
        "recovered false (the client pages history)"
    )
    recover_ring: int = _setting(
        200, "recent messages each room with members keeps in memory, so a short reconnect recovers without "
        "reading the store (also bounded by --recover-ring-bytes); freed with the room"
    )
    recover_ring_bytes: int = _setting(256 * 1024, "bytes of recent messages each room keeps in memory, at most")
    recover_memory: int = _setting(
        64 * 1024 * 1024, "bytes the rings of all rooms hold together, at most (about): past it, a room that "
        "gets a message halves its ring first, so many busy rooms cannot take the memory"
    )
    recover_window: float = _setting(
        2.0, "seconds: a message published on another instance within this of since may have reached the "
        "client's old instance in another order, so a recovery with one is recovered false (the client pages "
        "history); at least the broker's delivery time"
    )
    idempotency_keys: int = _setting(
        100_000, "publish keys (room, user, key) this instance remembers, newest first, so that a publish re-sent "
        "with its key is acked with the original id and not stored or delivered again"
    )
    node: str = _setting("0000", "this instance's tag inside message ids, so instances never collide")
    presence_heartbeat: float = _setting(
        2.0, "seconds between this instance's presence heartbeats through the broker (several instances)"
    )
    presence_ttl: float = _setting(
        6.0,
        "seconds without a heartbeat after which another instance's users leave presence "
        "(an instance killed without goodbye drops out within this plus --presence-window)",
    )
    codec: Codec = field(default_factory=lambda: STDLIB_JSON, metadata={"help": ""})
    """How JSON is read and written: the standard library's by default; the shell passes orjson's
    (``hubbub.server``), several times faster. Not a flag: both are strict the same way (``Codec``)."""


class UsageError(Exception):
    """A caller of the core broke its contract (our mistake, never the peer's)."""


class EventError(Exception):
    """Raised by a handler to answer the client with an ``error`` event (with the request's ``ref`` and
    ``room``, when given); the connection stays open."""

    def __init__(self, code: str, detail: str, ref: Any = None, room: str | None = None) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.ref = ref
        self.room = room


class Unauthorized(Exception):
    """Raised by a token verifier (``Server(verifier=...)``): the handshake is refused with 401."""


# Effects are named tuples: one or two are made per message, and a tuple is the cheapest value Python makes.

_new_tuple = tuple.__new__


class Ack(NamedTuple):
    """Who to tell once a message is stored: ``Server.ack`` or ``Server.unavailable`` takes these.

    ``ref`` is the client's (None: it asked for no ack, but still hears when its message was lost)."""

    conn_id: int
    ref: Any
    id: str
    ts: int | None = None
    """The message's ts, for an ack that carries it (``/ws``'s)."""
    room: str | None = None
    """The message's room, for an error that names it (``/ws``'s)."""


class Stored(NamedTuple):
    """Effect: a chat message to keep in the store; once it is, the shell calls ``Server.ack([ack])``."""

    room: str
    message: Mapping[str, Any]
    ack: Ack | None = None


class Publish(NamedTuple):
    """Effect: a message for the members of ``room`` on the other instances (through the broker)."""

    room: str
    message: Mapping[str, Any]


class PublishOrdered(NamedTuple):
    """Effect: a message for the broker to put in its room's order (a sequencing broker, while it orders:
    ``Server.order_through_broker``). Nobody here has it yet: it comes back, with its id, through
    ``Server.deliver_sequenced``, and is delivered, stored and acked then, like everywhere else."""

    room: str
    message: Mapping[str, Any]


class PresenceChanged(NamedTuple):
    """Effect: this instance's presence changed; the shell tells the broker ``Server.local_presence()``."""


class History(NamedTuple):
    """Effect: the shell should read a room's history and answer with ``Server.history_reply``."""

    conn_id: int
    room: str
    limit: int
    before: str | None
    after: str | None = None
    ref: Any = None
    """The request's ``ref``, for the reply (``/ws``)."""


@dataclass(frozen=True, slots=True)
class Failure:
    """Effect: application code or one of the core's own steps raised. It was contained to what it
    was working on (``where``: "handler", "receive", "timer", "ack", "deliver", ...): the connection
    ``conn_id`` (if any) was closed with 1011, everything else went on. The shell logs it once."""

    conn_id: int | None
    error: BaseException
    where: str = "handler"


Effect = Stored | History | Failure | Publish | PublishOrdered | PresenceChanged


class Metrics:
    """Counters the core keeps for ``/metrics``: it only counts, the shell formats."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "deliveries",
        "duplicates",
        "failures",
        "http",
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
        self.http: dict[tuple[str, int], int] = {}  # (HttpEndpoint name, status) -> requests answered

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


@dataclass(frozen=True, slots=True)
class Codec:
    """Strict JSON both ways. ``loads(text)`` raises ``ValueError`` for what a browser's JSON.parse
    would refuse or what could not be written back out (NaN, Infinity, numbers that overflow,
    lone surrogates); ``dumps(value)`` gives UTF-8 bytes and never writes NaN or Infinity (it
    raises, or writes null). Every client string passes ``loads``, so every output re-encodes."""

    name: str
    loads: Callable[[str], Any]
    dumps: Callable[[Any], bytes]


STDLIB_JSON = Codec("json", decode_event, lambda value: _encode_json(value).encode())
"""The standard library's json, made strict by ``decode_event`` and ``allow_nan=False``."""


_DEFLATE_TAIL = b"\x00\x00\xff\xff"


_FAST_DATA = frozenset((0x81, 0x82))  # FIN + text, FIN + binary, no RSV bit
_FAST_DEFLATED = frozenset((0xC1, 0xC2))  # the same with RSV1: compressed, on a deflate connection
_FAST_CONTROL = frozenset((0x89, 0x8A))  # FIN + ping, FIN + pong
_FAST_PARTIAL = 64 * 1024 + 14
"""A frame still arriving is buffered for the fast path up to this size; a larger one goes to wsproto,
which takes it piece by piece instead of the buffer being copied on every read."""


def _unmask(payload: bytes, key: bytes) -> bytes:
    """XOR a client frame's payload with its 4-byte key, as two big integers: one C-speed operation."""
    n = len(payload)
    mask = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(mask, "little")).to_bytes(n, "little")


def _utf8_so_far(buf: bytes, head: int, end: int) -> bool:
    """The part of a text frame that has arrived (its mask key at ``head``) could still be UTF-8."""
    if end <= head + 4:
        return True
    data = _unmask(buf[head + 4 : end], buf[head : head + 4])
    try:
        data.decode()
    except UnicodeDecodeError as exc:  # a character cut short by the read is not an error (yet)
        return exc.reason == "unexpected end of data" and exc.start >= len(data) - 3
    return True


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
        n = len(payload)  # encode_frame, inline: one of these is made per message
        if n < 126:
            self.plain = bytes((0x80 | opcode, n)) + payload
        elif n < 65536:
            self.plain = _pack_short(0x80 | opcode, 126, n) + payload
        else:
            self.plain = _pack_long(0x80 | opcode, 127, n) + payload
        self._deflated: dict[int, bytes] | None = None  # made for the first recipient that deflates
        self._min_size = min_compress
        self._level = level

    def frame_for(self, window_bits: int | None) -> bytes:
        """The frame for a recipient that negotiated deflate with these bits (None: not at all)."""
        if window_bits is None or len(self.payload) < self._min_size:
            return self.plain
        deflated = self._deflated
        if deflated is None:
            deflated = self._deflated = {}
        frame = deflated.get(window_bits)
        if frame is None:
            frame = encode_frame(self.opcode, deflate(self.payload, window_bits, self._level), rsv1=True)
            deflated[window_bits] = frame
        return frame


def compact(data: bytes) -> bytes:
    """``data`` in a bytes object of its own size. orjson's output keeps the buffer it wrote into (about
    4 KiB for a short message): what is kept for long (a room's recent messages, a member's metadata)
    is copied first, or it would cost that much each."""
    return bytes(memoryview(data))


def text_message(payload: Mapping[str, Any], config: Config) -> OutboundMessage:
    """A JSON event as an outgoing text message, encoded once (with ``config.codec``)."""
    return OutboundMessage(_TEXT, config.codec.dumps(payload), config.compression_min_size, config.compression_level)


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

    def inflate_message(self, data: bytes) -> bytes | CloseReason:
        """One whole compressed message at once (the receive fast path): what wsproto's path does
        with its header, payload and completion, bounded the same way, on the same decompressor
        (so a client's context takeover carries across both paths)."""
        if self._decompressor is None:
            self._decompressor = zlib.decompressobj(-int(self.client_max_window_bits))
        out = self._inflate(data)
        tail = out if isinstance(out, CloseReason) else self._inflate(_DEFLATE_TAIL)
        self.inflated = 0
        if self.client_no_context_takeover:
            self._decompressor = None
        if isinstance(tail, CloseReason):
            return tail
        return out + tail  # type: ignore[operator]

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
    warns_expiry: bool = False
    """Send ``token_expiring`` before a token's ``exp`` (30 s ahead, or at half its life if shorter)."""
    refs: bool = False
    """Errors the core answers itself (``missing_event``, ``unknown_event``) carry the event's ``ref``."""
    joins: bool = False
    """Clients join and leave rooms at run time (``/ws``): a user removed from a room (``Server.disconnect``)
    leaves it and hears ``left``; on other routes the room is the connection's, which is closed."""


@dataclass(frozen=True, slots=True)
class Match:
    """A request path matched to its endpoint, with the path's parameters decoded."""

    endpoint: Endpoint
    params: dict[str, str]


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
        self._routes: list[tuple[re.Pattern[str], Endpoint]] = []

    def add(self, template: str, endpoint: Endpoint) -> None:
        """Add a route; ``ValueError`` for a template that is not ``/literal/{name}/...`` with distinct
        parameter names (each a Python identifier), rather than a regex error or a route that never matches."""
        if not template.startswith("/"):
            raise ValueError(f"route template {template!r} must start with '/'")
        names = _PARAM.findall(template)
        if len(set(names)) != len(names):
            raise ValueError(f"route template {template!r} names a parameter twice")
        if "{" in _PARAM.sub("", template) or "}" in _PARAM.sub("", template):
            raise ValueError(f"route template {template!r}: a parameter is {{name}}, name an identifier")
        pattern, pos = "^", 0
        for m in _PARAM.finditer(template):
            pattern += re.escape(template[pos : m.start()]) + f"(?P<{m.group(1)}>[^/]+)"
            pos = m.end()
        pattern += re.escape(template[pos:]) + "$"
        self._routes.append((re.compile(pattern), endpoint))

    def match(self, path: str) -> Match | None:
        """The route ``path`` names, with its parameters decoded; ``ValueError`` for a bad parameter."""
        for regex, endpoint in self._routes:
            m = regex.match(path)
            if m is not None:
                return Match(endpoint, {k: path_param(v) for k, v in m.groupdict().items()})
        return None


def route_event(
    endpoint: Endpoint, text: str, loads: Callable[[str], Any] = decode_event
) -> tuple[Handler, dict[str, Any]] | EventError:
    """One client message on a JSON route: its handler and the event, or the error it gets
    (``bad_json``, ``not_object``, ``missing_event``, ``unknown_event``)."""
    try:
        event = loads(text)
    except RecursionError:
        return EventError("bad_json", "JSON nested too deeply")
    except ValueError as exc:
        return EventError("bad_json", f"invalid JSON: {exc}")
    if not isinstance(event, dict):
        return EventError("not_object", "expected a JSON object")
    ref = event.get("ref") if endpoint.refs else None
    # None, an int or a str (bool is neither) decide without the isinstance checks: nearly every ref
    if ref is not None and type(ref) not in (int, str) and (
        isinstance(ref, bool) or not isinstance(ref, (str, int, float))
    ):
        ref = None
    name = event.get("event")
    if not isinstance(name, str):
        return EventError("missing_event", 'expected a string field "event"', ref)
    handler = endpoint.events.get(name)
    if handler is None:
        return EventError("unknown_event", f"unknown event {name[:64]!r}", ref)
    return handler, event


# ---------------------------------------------------------------------------
# The handshake: a pure decision about one HTTP request
# ---------------------------------------------------------------------------

_HTTP_REASONS = {
    101: "Switching Protocols",
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    426: "Upgrade Required",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


HttpReply = tuple[int, bytes, str] | tuple[int, bytes, str, Iterable[tuple[str, str]]]
"""What a plain-HTTP route returns: status, body, content type and, optionally, headers of its own."""

HttpRoute = Callable[["Server", Mapping[bytes, bytes]], HttpReply]
"""A plain-HTTP route, called as ``route(server, request_headers)`` (names lower-case bytes)."""

Verifier = Callable[[str], Mapping[str, Any]]
"""Checks a bearer token and returns its claims, or raises ``Unauthorized``."""


class HttpRequest(NamedTuple):
    """One HTTP request for an ``HttpEndpoint``, its body read whole."""

    method: str
    path: str
    query: Mapping[str, str]
    """The query string's fields, decoded strictly (the last of a repeated name wins)."""
    headers: Mapping[bytes, bytes]
    """Names lower-case, repeated ones joined with ", "."""
    body: bytes


class HttpError(Exception):
    """Raised by an ``HttpEndpoint``'s handler: answer ``status`` with ``{"error": code, "detail": detail}``
    (and ``headers``); the connection stays open for the next request."""

    def __init__(self, status: int, code: str, detail: str, headers: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = tuple(headers)


@dataclass(frozen=True, slots=True)
class HttpEndpoint:
    """An HTTP route with a body and a JSON answer, on a keep-alive connection (the server API).

    ``handler(conn, request)`` returns the ``HttpReply`` at once, or None when the answer comes
    later: it emitted an effect whose reply names ``conn.id`` (``Stored`` through ``conn.publish``,
    ``History``), and the server answers when the backend does (``ack`` as ``{"id","ts"}``,
    ``history_reply`` as ``{"room","messages"}``, their failures as 503). A body over
    ``Config.max_message_size`` is 413, one that does not arrive within ``handshake_timeout`` 408;
    a method not in ``methods`` 405. Requests are counted in ``Metrics.http`` by ``name`` and status."""

    handler: Callable[[Connection, HttpRequest], HttpReply | None]
    methods: tuple[str, ...] = ("GET",)
    name: str = ""


def http_response(
    status: int,
    body: bytes = b"",
    content_type: str = "text/plain; charset=utf-8",
    headers: Iterable[tuple[str, str]] = (),
    keep_alive: bool = False,
) -> bytes:
    """A complete HTTP/1.1 response; it closes the connection unless ``keep_alive``."""
    lines = [f"HTTP/1.1 {status} {_HTTP_REASONS.get(status, 'Error')}"]
    lines += [f"{k}: {v}" for k, v in headers]
    lines += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
    if not keep_alive:
        lines.append("Connection: close")
    lines += ["", ""]
    return "\r\n".join(lines).encode("latin-1") + body


def json_error(code: str, detail: str) -> bytes:
    """An HTTP endpoint's error body: ``{"error": code, "detail": detail}``."""
    return _encode_json({"error": code, "detail": detail}).encode()


_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 408: "timeout", 413: "too_large", 431: "headers_too_large",
                 500: "internal", 503: "unavailable", 504: "timeout"}
"""The ``error`` code of an HTTP endpoint's refusal, by status."""


class RequestHead(NamedTuple):
    """One parsed HTTP request head: what the gatekeeper decides on."""

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    """(name as sent, value), in order."""
    http_version: bytes = b"1.1"


_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/1\.1")
_HEADER_LINE = re.compile(rb"(" + _TOKEN + rb"):[ \t]*((?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?)[ \t]*")
"""h11's own grammar (``h11._abnf``) for a request line and a header line, in one regex each."""


def parse_head(head: bytes) -> RequestHead | None:
    """The request fast path: parse a complete head (up to, not including, its blank line) the way
    h11 would, or None for anything h11 must judge itself. It takes only what nearly every client
    sends: an HTTP/1.1 request line, header lines in h11's grammar ending in CRLF (no obsolete line
    folding), one Host, and no body or one of at most one plain Content-Length (an API client's
    POST; no Transfer-Encoding); whatever it takes, h11 takes the same way
    (``tests/test_core_fastpath.py`` checks this for random heads)."""
    lines = head.split(b"\r\n")
    first = _REQUEST_LINE.fullmatch(lines[0])
    if first is None:
        return None
    headers = []
    hosts = lengths = 0
    for line in lines[1:]:
        field = _HEADER_LINE.fullmatch(line)
        if field is None:
            return None
        name = field[1]
        lower = name.lower()
        if lower == b"host":
            hosts += 1
        elif lower == b"content-length":
            lengths += 1
            value = field[2]
            if not (value.isdigit() and len(value) <= 18):  # h11 judges anything else
                return None
        elif lower == b"transfer-encoding":
            return None
        headers.append((name, field[2]))
    if hosts != 1 or lengths > 1:
        return None
    return RequestHead(first[1], first[2], headers)


@dataclass(frozen=True, slots=True)
class Refuse:
    """Decision: answer ``status`` with ``reason`` as the body, then close (never accept-then-close)."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...] = ()
    failure: Exception | None = None
    """An exception contained while deciding (a token verifier's surprise): the server counts it."""
    json: bool = False
    """Answer as an ``HttpEndpoint`` does: ``{"error", "detail"}`` (a request under its path prefix)."""
    endpoint: str = ""
    """The ``HttpEndpoint`` refused, for ``Metrics.http`` ("unknown": none under its prefix)."""


@dataclass(frozen=True, slots=True)
class ServeHttp:
    """Decision: a plain HTTP request for one of the server's HTTP routes (``head``: answer without the body)."""

    route: HttpRoute
    head: bool
    headers: Mapping[bytes, bytes]
    """The request's headers, names lower-case, repeated ones joined with ", "."""


@dataclass(frozen=True, slots=True)
class Upgrade:
    """Decision: accept the WebSocket, with everything the connection opens with."""

    endpoint: Endpoint
    params: Mapping[str, str]
    query: Mapping[str, str]
    user: str
    claims: Mapping[str, Any]
    expires: float | None
    """The token's ``exp`` (Unix seconds): the connection is closed 1008 then. None: no token, or no expiry."""
    deflate: BoundedDeflate | None
    """permessage-deflate, if agreed (its inbound state is the connection's from now on)."""
    deflate_bits: int | None
    max_message_size: int
    response: bytes
    """The ``101 Switching Protocols`` answer."""


@dataclass(frozen=True, slots=True)
class CallEndpoint:
    """Decision: a request for an ``HttpEndpoint``: read its body, then call it."""

    endpoint: HttpEndpoint
    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[bytes, bytes]
    keep_alive: bool
    """HTTP/1.1 without ``Connection: close``: the connection waits for the next request after the answer."""


Decision = Refuse | ServeHttp | CallEndpoint | Upgrade


_BEARER = (("WWW-Authenticate", 'Bearer realm="hubbub"'),)


class Gatekeeper:
    """The handshake policy, as a pure decision in h11's manner: one parsed HTTP request in, one
    frozen ``Refuse``, ``ServeHttp`` or ``Upgrade`` out (tests assert on them). It owns the rules
    (header limits, Host and Origin, the route, the WebSocket headers, user names, tokens and their
    room claims, per-address and total limits, permessage-deflate) and no state: the counts it
    needs come in as arguments, and the server carries the decision out."""

    def __init__(
        self,
        router: Router,
        config: Config,
        http_routes: Mapping[str, HttpRoute | HttpEndpoint],
        verifier: Verifier | None,
    ) -> None:
        self.router = router
        self.config = config
        self.http_routes = http_routes
        self.verifier = verifier
        # the path prefixes of the HttpEndpoints ("/api/"): requests under them are refused in JSON
        self._json_prefixes = tuple(
            {path.rsplit("/", 1)[0] + "/" for path, route in http_routes.items() if isinstance(route, HttpEndpoint)}
        )

    def decide(self, request: RequestHead, from_address: int, open_connections: int) -> Decision:
        """What to do with ``request``; ``from_address`` counts the sockets its client's address has
        open (this one included), ``open_connections`` the open WebSocket connections."""
        cfg = self.config
        headers: dict[bytes, bytes] = {}
        head_size = len(request.target)
        raw_items = request.headers
        for raw_name, value in raw_items:
            name = raw_name.lower()
            headers[name] = headers[name] + b", " + value if name in headers else value
            head_size += len(name) + len(value) + 4
        if len(raw_items) > cfg.max_headers:
            return Refuse(431, "too many headers")
        # h11 bounds only a head still arriving; one that arrived whole in a single read is measured here
        if head_size > cfg.max_header_bytes:
            return Refuse(431, "request line and headers too large")
        try:
            split = urlsplit(request.target.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return Refuse(400, "bad request target")
        if cfg.allowed_hosts is not None and not self._host_allowed(headers.get(b"host")):
            return Refuse(400, "invalid Host header")
        if b"websocket" not in headers.get(b"upgrade", b"").lower():
            return self._plain_http(request, split.path, split.query, headers)
        try:
            match = self.router.match(split.path)
        except ValueError as exc:
            return Refuse(400, str(exc))
        if match is None:
            return Refuse(404, "no such route")
        if request.method != b"GET":
            return Refuse(405, "method not allowed", (("Allow", "GET"),))
        connection_tokens = [t.strip() for t in headers.get(b"connection", b"").lower().split(b",")]
        if b"upgrade" not in connection_tokens:
            return Refuse(400, "missing 'Connection: Upgrade'")
        if headers.get(b"sec-websocket-version") != b"13":
            return Refuse(426, "only WebSocket version 13 is supported", (("Sec-WebSocket-Version", "13"),))
        key = headers.get(b"sec-websocket-key", b"")
        try:
            valid_key = len(base64.b64decode(key, validate=True)) == 16
        except (binascii.Error, ValueError):
            valid_key = False
        if not valid_key:
            return Refuse(400, "missing or invalid Sec-WebSocket-Key")
        if not self._origin_allowed(headers.get(b"origin"), headers.get(b"host")):
            return Refuse(403, "origin not allowed")
        try:
            query = dict(parse_qsl(split.query, errors="strict", max_num_fields=cfg.max_headers))
        except (UnicodeDecodeError, ValueError):
            return Refuse(400, "bad query string (not UTF-8, or too many fields)")
        if self.verifier is None:
            user, claims, expires = query.get("user") or "anonymous", {}, None
            problem = self.bad_user(user)
            if problem:
                return Refuse(400, f"bad user name: it {problem}")
        else:
            identity = self._authenticate(match, query, headers)
            if isinstance(identity, Refuse):
                return identity
            user, claims, expires = identity
        per_address = cfg.max_connections_per_address
        if per_address > 0 and from_address > per_address:
            return Refuse(429, "too many connections from your address, try again later", (("Retry-After", "5"),))
        if open_connections >= cfg.max_connections:
            return Refuse(503, "server full, try again later", (("Retry-After", "5"),))
        return self._upgrade(match, query, user, claims, expires, key, headers)

    def bad_user(self, user: str) -> str | None:
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

    def _plain_http(self, request: RequestHead, path: str, query: str, headers: Mapping[bytes, bytes]) -> Decision:
        method = request.method
        route = self.http_routes.get(path)
        if isinstance(route, HttpEndpoint):
            return self._call_endpoint(route, request, path, query, headers)
        if route is None:
            try:
                websocket_route = self.router.match(path) is not None
            except ValueError:
                websocket_route = True  # a route's path with a bad parameter: still not plain HTTP
            if websocket_route:
                return Refuse(426, "this is a WebSocket endpoint", (("Upgrade", "websocket"),))
            if self._json_prefixes and path.startswith(self._json_prefixes):
                return Refuse(404, "no such endpoint", json=True, endpoint="unknown")
            return Refuse(404, "not found")
        if method not in (b"GET", b"HEAD"):
            return Refuse(405, "method not allowed", (("Allow", "GET, HEAD"),))
        return ServeHttp(route, method == b"HEAD", headers)

    def _call_endpoint(
        self, endpoint: HttpEndpoint, request: RequestHead, path: str, query: str, headers: Mapping[bytes, bytes]
    ) -> Decision:
        method = request.method.decode("ascii")
        name = endpoint.name
        if method not in endpoint.methods:
            allow = (("Allow", ", ".join(endpoint.methods)),)
            return Refuse(405, "method not allowed", allow, json=True, endpoint=name)
        length = headers.get(b"content-length")  # h11 checked it; the fast path takes no request with one
        if length is not None and (not length.isdigit() or int(length) > self.config.max_message_size):
            return Refuse(413, f"the body is over {self.config.max_message_size} bytes", json=True, endpoint=name)
        try:
            fields = dict(parse_qsl(query, errors="strict", max_num_fields=self.config.max_headers))
        except (UnicodeDecodeError, ValueError):
            return Refuse(400, "bad query string (not UTF-8, or too many fields)", json=True, endpoint=name)
        keep_alive = request.http_version == b"1.1" and b"close" not in headers.get(b"connection", b"").lower()
        return CallEndpoint(endpoint, method, path, fields, headers, keep_alive)

    def _authenticate(
        self, match: Match, query: Mapping[str, str], headers: Mapping[bytes, bytes]
    ) -> Refuse | tuple[str, Mapping[str, Any], float | None]:
        """Token authentication: (user, claims, expiry), or 401 without a valid token, 403 for a room
        outside its ``rooms`` claim."""
        assert self.verifier is not None
        token = query.get("token")
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            token = credentials.strip()
        if not token:
            return Refuse(401, "a token is required (?token= or Authorization: Bearer)", _BEARER)
        identity = self.verify(token)
        if isinstance(identity, Refuse):
            return identity
        user, claims, expires = identity
        allowed = claims.get("rooms")
        if allowed is not None and match.endpoint.rooms is not None:
            patterns = [allowed] if isinstance(allowed, str) else allowed
            if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
                return Refuse(401, "invalid token: 'rooms' must be a list of patterns", _BEARER)
            for room in match.endpoint.rooms(match.params):
                if not any(fnmatch.fnmatchcase(room, p) for p in patterns):
                    return Refuse(403, f"this token may not join room {room[:64]!r}")
        return user, claims, expires

    def verify(self, token: str) -> Refuse | tuple[str, Mapping[str, Any], float | None]:
        """A token's (user, claims, expiry) as the handshake checks them, or the 401 it gets: the verifier
        (signature, ``exp``, ``nbf``, ``aud``, ``iss``), then a usable ``sub`` and a sane ``exp``."""
        assert self.verifier is not None
        bearer = _BEARER
        try:
            claims = self.verifier(token)
        except Unauthorized as exc:
            return Refuse(401, f"invalid token: {printable(str(exc))}", bearer)
        except Exception as exc:  # a verifier's surprise (an overflowing claim, say) is a bad token, not a crash
            return Refuse(401, "invalid token", bearer, failure=exc)
        user = claims.get("sub")
        if not isinstance(user, str) or not user:
            return Refuse(401, "invalid token: no 'sub' claim", bearer)
        problem = self.bad_user(user)
        if problem:
            return Refuse(401, f"invalid token: 'sub' {problem}", bearer)
        expires = claims.get("exp")
        if expires is not None:
            if isinstance(expires, bool) or not isinstance(expires, (int, float)):
                return Refuse(401, "invalid token: 'exp' must be a number", bearer)
            if not -_MAX_TIMESTAMP < expires < _MAX_TIMESTAMP:
                return Refuse(401, "invalid token: 'exp' is out of range", bearer)
        return user, claims, None if expires is None else float(expires)

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
        match: Match,
        query: Mapping[str, str],
        user: str,
        claims: Mapping[str, Any],
        expires: float | None,
        key: bytes,
        headers: Mapping[bytes, bytes],
    ) -> Upgrade:
        cfg = self.config
        max_size = match.endpoint.max_message_size or cfg.max_message_size
        response = [
            "HTTP/1.1 101 Switching Protocols",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Accept: {generate_accept_token(key).decode()}",
        ]
        deflate_ext = None
        deflate_bits = None
        offers = headers.get(b"sec-websocket-extensions")
        if cfg.compression and offers:
            negotiated = negotiate_deflate(offers.decode("latin-1").split(","), max_size)
            if negotiated is not None:
                deflate_ext, accept_header = negotiated
                deflate_bits = deflate_ext.server_max_window_bits
                response.append(f"Sec-WebSocket-Extensions: {accept_header}")
        return Upgrade(
            match.endpoint, match.params, query, user, claims, expires, deflate_ext, deflate_bits, max_size,
            ("\r\n".join(response) + "\r\n\r\n").encode("latin-1"),
        )


# ---------------------------------------------------------------------------
# Timers: one heap of deadlines, by kind
# ---------------------------------------------------------------------------


class TimerKind(enum.Enum):
    """What a timer does when it fires, and what its target is."""

    PING = "ping"  # a connection id: send a keepalive ping
    PONG_DUE = "pong due"  # a connection id (and the ping's number): no pong yet, close 1011
    CLOSE = "close"  # a connection id: the peer's close frame is late, drop the socket
    TOKEN_EXPIRY = "token expiry"  # a connection id (and its token's number): its token expired, close 1008
    TOKEN_EXPIRING = "token expiring"  # a connection id (and its token's number): tell it, so it refreshes
    PRESENCE = "presence"  # a Room: its presence window ends
    NODE_EXPIRY = "node expiry"  # another instance's node tag: its heartbeats may have stopped
    ANNOUNCE = "announce"  # none: this instance's presence changed, the broker should tell the others
    ANSWER_DUE = "answer due"  # an Exchange: the backend has not answered an HTTP endpoint's request, 504


class Timers:
    """Deadlines in one heap. Timers name connections by id, so a closed connection is freed
    before its timers expire (the entry finds no connection and does nothing)."""

    __slots__ = ("_heap", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, TimerKind, Any, int]] = []
        self._seq = 0

    def schedule(self, when: float, kind: TimerKind, target: Any, seq: int = 0) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, kind, target, seq))

    def pop_due(self, now: float) -> tuple[TimerKind, Any, int] | None:
        """The next timer due at ``now`` (removed from the heap), or None."""
        heap = self._heap
        if heap and heap[0][0] <= now:
            _, _, kind, target, seq = heapq.heappop(heap)
            return kind, target, seq
        return None

    @property
    def next_deadline(self) -> float | None:
        return self._heap[0][0] if self._heap else None


# ---------------------------------------------------------------------------
# Connection: one client's protocol state, output queue, rate bucket and keepalive
# ---------------------------------------------------------------------------


class State(enum.Enum):
    HANDSHAKE = "handshake"  # reading the HTTP request
    OPEN = "open"  # a WebSocket: messages flow both ways
    CLOSING = "closing"  # our close frame is out; we wait for the peer's (or close_timeout)
    CLOSED = "closed"  # done: the shell writes what is queued, then closes the socket


# The states as plain module constants, for the per-message and per-connection paths: on Python 3.11
# reading a member off its Enum class (``State.OPEN``) goes through EnumType's ``__getattr__`` hook, which
# the interpreter cannot specialise: about 800 instructions each, against 50 for a global.
_HANDSHAKE = State.HANDSHAKE
_OPEN = State.OPEN
_CLOSING = State.CLOSING
_CLOSED = State.CLOSED


class RateBucket:
    """One connection's token bucket: ``rate`` tokens a second, a burst of one second's worth."""

    __slots__ = ("at", "rate", "tokens")

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.at = now

    def take(self, now: float) -> float:
        """Spend a token; returns what is left (below zero: over the rate by that much)."""
        rate = self.rate
        tokens = min(rate, self.tokens + (now - self.at) * rate) - 1
        self.tokens, self.at = tokens, now
        return tokens


class Keepalive:
    """One connection's pings: the number of the last one sent, and whether its pong is still due."""

    __slots__ = ("due", "seq")

    def __init__(self) -> None:
        self.seq = 0
        self.due = False

    def ping(self) -> bytes:
        """The payload of the next ping (its number)."""
        self.seq += 1
        self.due = True
        return str(self.seq).encode()

    def pong(self, payload: bytes) -> None:
        if payload == str(self.seq).encode():
            self.due = False

    def late(self, seq: int) -> bool:
        """Ping ``seq`` is the last one sent and its pong has not come."""
        return self.due and self.seq == seq


class Outbox:
    """This pass's register of what the shell must write: the connections that gained output (in the
    order they did) and those that went over their buffer. The server owns it; each connection notes
    itself as it queues."""

    __slots__ = ("pending", "slow")

    def __init__(self) -> None:
        self.pending: dict[Connection, None] = {}
        self.slow: list[Connection] = []


NO_META = b"{}"
"""The presence metadata of a connection that gave none (and of every v1 chat member)."""

CLOSE_REMOVED = 4001
"""Close code: the server API disconnected this user (``/api/disconnect``); PROTOCOL.md section 2."""

CONTROL_ROOM = "\x00hubbub"
"""The broker room of commands between instances (``Server.disconnect``): no client can name a room
with a control character in it, so none can join or publish here."""

BACKEND_TIMEOUT = 30.0
"""Seconds an ``HttpEndpoint``'s request waits for its backend's answer (the store's ack); then 504."""

REPLY_ALLOWANCE = 4
"""Replies a client asked for may queue up to this many times ``max_buffer`` before it is a slow consumer."""


class Exchange:
    """One HTTP request to an ``HttpEndpoint`` on its way: its body arriving, then (``waiting``) its
    answer, when a backend gives it. A connection has at most one (keep-alive: one after another)."""

    __slots__ = ("call", "conn_id", "length", "parts", "size", "waiting")

    def __init__(self, conn_id: int, call: CallEndpoint) -> None:
        self.conn_id = conn_id
        self.call = call
        self.parts: list[bytes] = []
        self.size = 0
        self.waiting = False
        length = call.headers.get(b"content-length")
        self.length = int(length) if length is not None and length.isdigit() else 0
        """The body's length, when the request fast path took the head (h11 counts it otherwise)."""


class RequestReader:
    """One connection's HTTP side, from its first byte until it is a WebSocket (or closed): its
    request heads (an ordinary complete head parsed by ``parse_head``, anything else by h11, made
    only then), the body of a request to an ``HttpEndpoint`` (its ``Exchange``), and what the
    client sent after (pipelined requests, or the first frames of a client that did not wait for
    our 101). The connection makes it at the connect and drops it when it opens or closes;
    ``Handshakes`` drives it."""

    __slots__ = ("_config", "_http", "_inbox", "exchange")

    def __init__(self, config: Config) -> None:
        self._config = config
        self._http: h11.Connection | None = None  # made only for a request the fast path leaves to it
        self._inbox = b""  # what was received and not read yet
        self.exchange: Exchange | None = None
        """The ``HttpEndpoint`` request in progress (its body arriving, or its answer awaited)."""

    def read_request(self, data: bytes) -> RequestHead | Refuse | None:
        """Handshake bytes in; the complete request once it is here (None until then), or the
        refusal a malformed one gets."""
        http = self._http
        if http is None:
            head = self._inbox + data if self._inbox else data
            end = head.find(b"\r\n\r\n")
            if end < 0 and len(head) <= self._config.max_header_bytes:
                self._inbox = head
                return None  # more to come
            parsed = parse_head(head[:end]) if end >= 0 else None
            if parsed is not None:
                self._inbox = head[end + 4 :]  # the trailing bytes: frames sent before our 101
                return parsed
            self._inbox = b""
            data = head
            http = self._http = h11.Connection(h11.SERVER, max_incomplete_event_size=self._config.max_header_bytes)
        try:
            http.receive_data(data)
            event = http.next_event()
        except h11.RemoteProtocolError as exc:
            return Refuse(exc.error_status_hint, f"bad request: {exc}")
        if event is h11.NEED_DATA:
            return None
        if not isinstance(event, h11.Request):
            return Refuse(400, "bad request")
        self._inbox = http.trailing_data[0]
        return RequestHead(event.method, event.target, event.headers.raw_items(), event.http_version)

    def begin_exchange(self, conn_id: int, call: CallEndpoint) -> None:
        self.exchange = Exchange(conn_id, call)

    def read_body(self, data: bytes) -> bytes | Refuse | None:
        """Body bytes in (``data`` may be b"": what came with the head); the whole body once it is here,
        None until then, or the refusal it gets (413 past ``max_message_size``, 400 if malformed)."""
        exchange = self.exchange
        assert exchange is not None
        http = self._http
        limit = self._config.max_message_size
        if http is None:  # the fast path took the head: the body is its Content-Length bytes (none without)
            length = exchange.length
            if length > limit:
                return Refuse(413, f"the body is over {limit} bytes", json=True)
            buffered = self._inbox + data if data else self._inbox
            if len(buffered) < length:
                self._inbox = buffered
                return None
            self._inbox = buffered[length:]  # a pipelined next request, if any
            return buffered[:length]
        try:
            if data:
                http.receive_data(data)
            while True:
                event = http.next_event()
                if event is h11.NEED_DATA:
                    return None
                if type(event) is h11.Data:
                    exchange.size += len(event.data)
                    if exchange.size > limit:
                        return Refuse(413, f"the body is over {limit} bytes", json=True)
                    exchange.parts.append(bytes(event.data))
                elif type(event) is h11.EndOfMessage:
                    self._inbox = http.trailing_data[0]  # a pipelined next request, if any
                    self._http = None
                    return b"".join(exchange.parts)
                else:
                    return Refuse(400, "bad request body", json=True)
        except h11.RemoteProtocolError as exc:
            return Refuse(exc.error_status_hint, f"bad request: {exc}", json=True)

    def end_exchange(self) -> None:
        self.exchange = None

    def buffer_request(self, data: bytes) -> bool:
        """Keep bytes of a pipelined request that arrived while an answer is awaited; False when the
        client sent more than one request head and body may hold (it is not waiting for answers)."""
        self._inbox += data
        return len(self._inbox) <= self._config.max_header_bytes + self._config.max_message_size

    @property
    def trailing(self) -> bytes:
        """What the client sent after its request (its first frames, if it did not wait for our 101)."""
        return self._inbox



class FrameReader:
    """A WebSocket's receive side, made when it opens: the receive fast path's buffer, then (from
    the first frame the fast path does not take, or our own close frame) wsproto's engine, and the
    fragments of a message still arriving. Its connection drives it (``feed``, ``read``) and hands
    itself in for what the frames do to it: the rate limit, pongs, the close of a bad route."""

    __slots__ = ("_at", "_binary", "_deflate", "_fast", "_inbox", "_limit", "_parts", "_unmask", "_ws")

    def __init__(
        self, deflate: BoundedDeflate | None, limit: int, fast: bool, unmask: Callable[[bytes, bytes], bytes]
    ) -> None:
        """``unmask(payload, key)``: the fast path's unmasking (``Server``'s ``unmask``)."""
        self._ws: WSConnection | None = None  # wsproto, made when first needed (see ``_engine``)
        self._unmask = unmask
        self._deflate = deflate  # permessage-deflate, if agreed
        self._limit = limit  # bytes per message
        self._fast = fast  # the receive fast path reads the stream (until its first odd frame)
        self._inbox = b""  # what the fast path has not read yet, from ``_at`` on
        self._at = 0
        self._parts: list[str | bytes] | tuple[()] = ()  # a fragmented message's parts (a list once it has some)
        self._binary = False

    @property
    def state(self) -> WSState:
        """wsproto's state; open while its engine is not made yet."""
        return self._ws.state if self._ws is not None else WSState.OPEN

    def send(self, event: CloseConnection) -> bytes:
        """Our close frame, through wsproto (it tracks the closing handshake)."""
        return self._engine().send(event)

    def _engine(self) -> WSConnection:
        """wsproto, made when first needed: for the first frame the fast path does not take, or for
        our close frame. Until then it has seen nothing, so it starts where the stream stands: open,
        at a frame boundary, no message in progress (the fast path takes whole messages only)."""
        ws = self._ws
        if ws is None:
            extensions: list[Extension] = [self._deflate] if self._deflate is not None else []
            extensions.append(SizeLimit(self._limit))  # after inflating: it counts what the message grew to
            ws = self._ws = WSConnection(ConnectionType.SERVER, extensions)
        return ws

    def feed(self, data: bytes) -> None:
        """Frame bytes in, for ``read``."""
        if self._fast:
            inbox = self._inbox
            self._inbox = data if self._at >= len(inbox) else inbox[self._at :] + data
            self._at = 0
        else:
            self._engine().receive_data(data)

    def read(self, conn: Connection, budget: int | None) -> Iterator[str | bytes | CloseConnection]:
        """The complete messages and the close frame in what was fed, from at most ``budget`` frames
        (None: all of them). Pings are answered and pongs noted here; every frame costs a rate token.

        Frames past the budget stay buffered: the connection is then ``backlogged`` until
        ``Server.resume`` reads on (one connection's flood delays the others by one budget at most,
        however much it sends in one read)."""
        conn.backlogged = False
        left = budget if budget is not None and budget > 0 else -1
        if self._fast:  # the common case: every message comes through one generator, not one inside another
            return self._read_fast(conn, left)
        return self._read_slow(conn, left)

    def _read_slow(self, conn: Connection, left: int) -> Iterator[str | bytes | CloseConnection]:
        """``read`` through wsproto: messages assembled from fragments, control frames, the close."""
        for event in self._engine().events():
            if conn.state is _CLOSED:
                return
            if isinstance(event, TextMessage) or isinstance(event, BytesMessage):
                if conn.state is _OPEN:
                    message = self._data(conn, event)
                    if message is not None:
                        yield message
            elif isinstance(event, Ping):
                if conn.ws_open and conn.admit(False):
                    conn.send_frame(Pong(event.payload))
            elif isinstance(event, Pong):
                if conn.admit(False):
                    conn.pong(event.payload)
            elif isinstance(event, CloseConnection):
                yield event
            left -= 1
            if left == 0:
                conn.backlogged = conn.state is not _CLOSED
                return

    def _read_fast(self, conn: Connection, left: int) -> Iterator[str | bytes | CloseConnection]:
        """The receive fast path: whole frames straight from the buffered bytes, no wsproto.

        It takes what nearly every client sends: a masked, unfragmented text or binary frame (RSV1
        only on a permessage-deflate connection) under the message size limit, whole in the buffer,
        and pings and pongs. It unmasks in one C-speed integer XOR and decodes UTF-8 strictly. The
        first frame it does not take (a fragment, a close, a reserved bit or opcode, an unmasked or
        oversized frame, invalid UTF-8, a big frame still arriving) and everything after it go to
        wsproto, for good: wsproto's answer to it is the answer (tests/test_core_fastpath.py proves
        both paths give the same events and close codes for any stream). Returns the budget left."""
        buf = self._inbox
        end = len(buf)
        pos = self._at
        limit = self._limit
        deflate = self._deflate
        closed, open_ = _CLOSED, _OPEN
        raw = conn.endpoint is not None and conn.endpoint.on_raw is not None
        unlimited = conn.config.rate_limit <= 0
        unmask = self._unmask
        while True:
            if pos + 2 > end or conn.state is closed:
                break
            b0 = buf[pos]
            b1 = buf[pos + 1]
            n = b1 & 0x7F
            # judged from the first two bytes, as wsproto does: unmasked, not a kind this path takes, a control
            # frame over 125 bytes
            if b1 < 0x80 or not (
                b0 in _FAST_DATA or (b0 in _FAST_CONTROL and n < 126) or (b0 in _FAST_DEFLATED and deflate is not None)
            ):
                yield from self._hand_over(conn, buf, pos, left)
                return
            head = pos + 2
            if n == 126:
                if pos + 4 > end:
                    break
                n = (buf[pos + 2] << 8) | buf[pos + 3]
                head = pos + 4
            elif n == 127:
                if pos + 10 > end:
                    break
                n = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = pos + 10
            if n > limit:  # wsproto's size limit answers it (1009) as soon as the header is in
                yield from self._hand_over(conn, buf, pos, left)
                return
            stop = head + 4 + n
            if stop > end:
                if (
                    stop - pos > _FAST_PARTIAL
                    or b0 & 0x40
                    or (b0 == 0x81 and not _utf8_so_far(buf, head, end))
                    or (b0 == 0x82 and not raw)
                ):
                    # A big frame still arriving (wsproto streams it as it comes); a compressed one (wsproto
                    # inflates as it comes, so it can fail a bad one before it is whole); text that is already
                    # not UTF-8, or binary on a JSON route (wsproto fails those at once, as the RFC asks).
                    yield from self._hand_over(conn, buf, pos, left)
                    return
                break
            payload = unmask(buf[head + 4 : stop], buf[head : head + 4]) if n else b""
            if b0 & 0x40:  # compressed, on a deflate connection
                inflated = deflate.inflate_message(payload)  # type: ignore[union-attr]
                if isinstance(inflated, CloseReason):  # as wsproto reports an extension's refusal
                    self._at = stop
                    yield CloseConnection(inflated, "error in extension")
                    return
                payload = inflated
            message: str | bytes | None = None
            if b0 & 0x0F == 0x1:
                try:
                    message = payload.decode()
                except UnicodeDecodeError as exc:
                    if not b0 & 0x40:  # wsproto answers it (1007), in its own words
                        yield from self._hand_over(conn, buf, pos, left)
                        return
                    self._at = stop  # inflated already, so it cannot be handed over: wsproto's answer here
                    yield CloseConnection(CloseReason.INVALID_FRAME_PAYLOAD_DATA, str(exc))
                    return
            elif b0 & 0x0F == 0x2:
                message = payload
            self._at = pos = stop
            if message is None:
                if b0 == 0x89:
                    if conn.ws_open and conn.admit(False):
                        conn.queue(encode_frame(0xA, payload))
                elif conn.admit(False):
                    conn.pong(payload)
            elif conn.state is open_:
                if not raw and type(message) is bytes:
                    conn.close(CloseReason.UNSUPPORTED_DATA, "binary messages are not allowed on this route"
                    )
                elif unlimited or conn.admit(True):
                    yield message
            left -= 1
            if left == 0:
                conn.backlogged = pos < end and conn.state is not closed
                return
        if pos >= end or conn.state is closed:
            self._inbox, self._at = b"", 0
        else:
            self._at = pos  # a frame still arriving: the rest comes with the next read

    def _hand_over(
        self, conn: Connection, buf: bytes, pos: int, left: int
    ) -> Iterator[str | bytes | CloseConnection]:
        """From the frame at ``pos`` on, the stream is wsproto's: the rest of this read goes on there."""
        self._fast = False
        self._inbox, self._at = b"", 0
        self._engine().receive_data(buf[pos:])
        yield from self._read_slow(conn, left)

    def _data(self, conn: Connection, event: TextMessage | BytesMessage) -> str | bytes | None:
        """One data frame (or part of one) from wsproto: the whole message once its last fragment came
        and the rate admits it. A fragment that ends no message costs a token of its own."""
        assert conn.endpoint is not None
        if isinstance(event, BytesMessage) and conn.endpoint.on_raw is None:
            conn.close(CloseReason.UNSUPPORTED_DATA, "binary messages are not allowed on this route")
            return None
        if event.frame_finished and not event.message_finished and not conn.admit(False):
            return None
        if isinstance(event, BytesMessage):
            self._binary = True
        if self._parts:
            self._parts.append(event.data)  # type: ignore[union-attr]
        else:
            self._parts = [event.data]
        if not event.message_finished:
            return None
        parts = self._parts
        self._parts = ()
        message: str | bytes
        if self._binary:
            self._binary = False
            message = parts[0] if len(parts) == 1 else b"".join(parts)  # type: ignore[arg-type]
        else:
            message = parts[0] if len(parts) == 1 else "".join(parts)  # type: ignore[arg-type]
        return message if conn.admit(True) else None



class Connection:
    """One client, from its first byte to its close.

    It owns who it is (``user``, ``params``, ``query``, ``claims``), its output queue and how full
    it is, its rate bucket and keepalive; its protocol state is its ``request`` (a
    ``RequestReader``) until it opens, then its ``frames`` (a ``FrameReader``). The server drives
    it through the methods under "for the server" (``Handshakes`` its ``request``); nothing else
    touches its insides.

    **The handlers' API** (a handler needs nothing else, and is not handed the ``Server``): read
    ``id``, ``user``, ``params``, ``query``, ``claims``, ``peer``, ``now``, ``config``; act with
    ``send``, ``reply``, ``reply_raw``, ``send_message``, ``error``, ``close``, ``emit``; rooms
    with ``join``, ``broadcast`` (v1), ``enter``, ``leave``, ``update_meta``, ``publish`` (v2);
    ask ``new_id()``, ``available(backend)``, ``presence(room)``, ``presence_json(room)``,
    ``in_room(room)``, ``joining()``, ``repeat(room, user, key)``; tokens and the server API with
    ``verify``, ``renew``, ``disconnect``. It hands each on to the server part that owns it
    (``Rooms`` through the server, ``Messages``, ``Handshakes``).

    **The shell's API**: ``data_to_send()``, ``closed``, ``backlogged``, ``peer``, ``id``, and the
    ``shell`` slot for the shell's own object (its transport or socket link).
    """

    __slots__ = (
        "_bucket",
        "_config",
        "_keepalive",
        "_outbox",
        "_server",
        "address",
        "backlogged",
        "claims",
        "close_code",
        "close_reason",
        "deflate_bits",
        "endpoint",
        "expires",
        "frames",
        "id",
        "outbound",
        "outbound_size",
        "params",
        "peer",
        "query",
        "reply_size",
        "request",
        "rooms",
        "shell",
        "state",
        "status",
        "token_number",
        "user",
    )

    def __init__(self, server: Server, outbox: Outbox, conn_id: int, peer: Any, now: float) -> None:
        config = server.config
        self.id = conn_id
        self.peer = peer
        self.address = peer[0] if isinstance(peer, tuple) and peer else peer  # the client's IP address
        self.state = _HANDSHAKE
        self.user = "anonymous"
        self.params: Mapping[str, str] = {}
        self.query: Mapping[str, str] = {}
        self.claims: Mapping[str, Any] = {}
        self.expires: float | None = None  # the token's exp (Unix seconds), if it has one
        self.token_number = 0  # counts the tokens it has had (a refresh makes the old one's timers stale)
        self.endpoint: Endpoint | None = None
        self.rooms: list[Room] = []  # the rooms it is in, in the order it joined (Rooms keeps this list)
        self.outbound: list[bytes] | tuple[()] = ()  # what is queued (a list while something is): see append
        self.outbound_size = 0
        self.reply_size = 0  # queued bytes of replies the client asked for (see ``reply``)
        self.status: int | None = None  # the HTTP status we answered: 101, or why we refused
        self.close_code: int | None = None
        self.close_reason = ""
        self.deflate_bits: int | None = None
        self.shell: Any = None  # the shell's own object for this connection (its socket or transport)
        self.backlogged = False  # input is buffered that this pass had no budget for: see Server.resume
        self.request: RequestReader | None = RequestReader(config)  # its HTTP side, until it opens or closes
        self._server = server
        self._outbox = outbox
        self._config = config
        self.frames: FrameReader | None = None  # its receive side, once it is a WebSocket
        # made when first needed (the first message, the first ping): an idle connection costs less without them
        self._bucket: RateBucket | None = None
        self._keepalive: Keepalive | None = None

    def __repr__(self) -> str:
        return f"<Connection {self.id} {self.state.value} user={self.user!r} peer={self.peer!r}>"

    # -- the shell's API ----------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once the shell should close the socket (after writing what is queued)."""
        return self.state is _CLOSED

    def data_to_send(self) -> bytes:
        """Everything queued for this connection, in order; the queue is emptied."""
        out = self.outbound
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        self.outbound = ()  # an idle connection holds no list (10,000 of them: half a megabyte)
        self.outbound_size = 0
        self.reply_size = 0
        self._server.metrics.bytes_out += len(data)
        return data

    # -- the handlers' API ----------------------------------------------------

    @property
    def now(self) -> float:
        """The time of the input being handled (Unix seconds, as the shell passed it)."""
        return self._server.now

    @property
    def config(self) -> Config:
        return self._config

    def send(self, payload: Mapping[str, Any]) -> None:
        """Send one JSON event to this connection."""
        if self.state is _OPEN:
            self.queue(self._frame(payload))

    def send_many(self, payloads: Iterable[Mapping[str, Any]]) -> None:
        """Send JSON events to this connection, in order, as one write (a store batch's acks). One that
        cannot be encoded raises, after those before it were queued."""
        if self.state is _OPEN:
            frames: list[bytes] = []
            try:
                if self.deflate_bits is None:  # ``_frame`` of a connection that never deflates, without a call each
                    dumps = self._config.codec.dumps
                    for payload in payloads:
                        body = dumps(payload)
                        n = len(body)
                        frames.append(bytes((0x81, n)) + body if n < 126 else encode_frame(_TEXT, body))
                else:
                    for payload in payloads:
                        frames.append(self._frame(payload))
            finally:
                if frames:
                    self.queue(frames[0] if len(frames) == 1 else b"".join(frames))

    def reply(self, payload: Mapping[str, Any]) -> None:
        """Send one JSON event this connection asked for (a history page, a presence list).

        Such a reply may be large, and asking for a lot does not make a slow consumer: its
        bytes do not count against ``max_buffer`` (only against ``REPLY_ALLOWANCE`` times it,
        so one that asks again and again without reading is still closed)."""
        if self.state is _OPEN:
            self.queue_reply(self._frame(payload))

    def _frame(self, payload: Mapping[str, Any]) -> bytes:
        """One event's frame for this connection alone (an ack, an error, a reply): compressed only if
        this connection deflates and the event is big enough to be worth it."""
        config = self._config
        body = config.codec.dumps(payload)
        if self.deflate_bits is None or len(body) < config.compression_min_size:
            n = len(body)
            return bytes((0x81, n)) + body if n < 126 else encode_frame(_TEXT, body)
        return OutboundMessage(_TEXT, body, config.compression_min_size, config.compression_level).frame_for(
            self.deflate_bits)

    def send_message(self, message: str | bytes) -> None:
        """Send a text (str) or binary (bytes) message as it is."""
        if self.state is _OPEN:
            cfg = self._config
            opcode, payload = (_TEXT, message.encode()) if isinstance(message, str) else (_BINARY, bytes(message))
            self.queue(OutboundMessage(opcode, payload, cfg.compression_min_size, cfg.compression_level).frame_for(
                self.deflate_bits))

    def error(self, code: str, detail: str, ref: Any = None, room: str | None = None) -> None:
        """An ``error`` event (with the request's ``ref`` and ``room``, when given); the connection stays
        open (raising ``EventError`` does the same)."""
        event: dict[str, Any] = {"event": "error", "code": code, "detail": detail}
        if ref is not None:
            event["ref"] = ref
        if room is not None:
            event["room"] = room
        self.send(event)

    def join(self, room: str, presence: bool = False) -> Room:
        """Join a room (created on first use); with ``presence`` the room tracks who is in it."""
        return self._server.join(self, room, presence)

    def broadcast(self, room: str, payload: Mapping[str, Any], exclude_self: bool = False) -> int:
        """One JSON event to every member of ``room`` (but this connection, with ``exclude_self``),
        encoded once; returns how many get it."""
        return self._server.broadcast(room, payload, exclude=self if exclude_self else None)

    def emit(self, effect: Effect) -> None:
        """Hand an effect (``Stored``, ``Publish``, ``History``) to the shell's backends."""
        self._server.emit(effect)

    def publish(
        self, room: str, message: dict[str, Any], ref: Any = None, v2: bool = False, key: str | None = None
    ) -> str | None:
        """A message from this connection for ``room``: it gets its ``id`` and ``ts`` (added last),
        goes to the other members here at once, to the other instances (``Publish``) and to the
        store (``Stored``); this connection hears an ``ack`` with ``ref`` once it is stored (or
        ``unavailable`` if it could not be). Returns the id; None when the store is known to be down
        (nothing was sent, and this connection got an ``unavailable`` error with ``ref``). ``v2``:
        ``/ws``'s publish: its ack carries the ``ts`` and its errors the room, and a message over
        ``max_message_size`` as encoded is refused (``EventError``, ``bad_field``). ``key``: idempotency
        (``PublishKeys``): a repeat of ``(room, message["user"], key)`` is acked with the original id,
        and neither delivered nor stored again."""
        return self._server.messages.publish(self, room, message, ref, v2, key)

    def close(self, code: int = CloseReason.NORMAL_CLOSURE, reason: str = "") -> None:
        """Start the closing handshake (the peer's close frame or ``close_timeout`` ends it)."""
        self._server.send_close(self, code, reason)

    def new_id(self) -> str:
        """A unique, time-ordered message id (see ``Server.new_id``)."""
        return self._server.messages.new_id()

    def available(self, backend: str) -> bool:
        """False while the shell reports ``backend`` ("store", "broker") down: refuse to write then."""
        return self._server.available(backend)

    def presence(self, room: str) -> list[str]:
        """Users present in ``room`` on every instance, sorted."""
        return self._server.presence(room)

    def enter(
        self, room: str, meta: bytes = NO_META, watch: bool = True, ref: Any = None, since: str | None = None
    ) -> None:
        """Join ``room`` as a ``/ws`` client: present there with ``meta`` (this connection's metadata,
        encoded JSON). The core answers ``joined``: at once without presence when it does not ``watch``;
        else at the end of the presence window, with everyone's presence, and its messages and presence
        diffs start from there. ``since`` (the last message id the client saw): the ``joined`` also
        carries what it missed (``recovered``, ``messages``), perhaps after a store read."""
        self._server.messages.enter(self, room, meta, watch, ref, since)

    def repeat(self, room: str, user: str, key: str) -> tuple[str, Any] | None:
        """The ``(id, ts)`` of the stored message published with this key (``PublishKeys``), if known."""
        seen = self._server.messages.published(room, user, key)
        return seen if isinstance(seen, tuple) else None

    def joining(self) -> int:
        """Joins with ``since`` of this connection that wait for the store (they count as rooms)."""
        return self._server.messages.joining(self)

    def leave(self, room: str) -> bool:
        """Leave ``room`` (False: this connection was not in it)."""
        return self._server.messages.leave(self, room)

    def update_meta(self, room: str, meta: bytes) -> bool:
        """This connection's metadata in ``room`` is now ``meta`` (encoded JSON); False: not in it."""
        return self._server.update_meta(self, room, meta)

    def in_room(self, room: str) -> bool:
        """This connection is in ``room``, or joins it with ``since`` and waits for the store (it may
        publish there)."""
        return any(each.name == room for each in self.rooms) or self._server.messages.recovering(self, room)

    def presence_json(self, room: str) -> bytes:
        """``{USER: [META, ...]}`` of ``room`` on every instance, as encoded JSON."""
        return self._server.presence_json(room)

    def verify(self, token: str) -> tuple[str, Mapping[str, Any], float | None]:
        """(user, claims, expiry) of a new token, checked as at the handshake; ``EventError`` if it is
        not good (code ``forbidden``)."""
        checked = self._server.handshakes.verify(token)
        if isinstance(checked, Refuse):
            raise EventError("forbidden", checked.reason)
        return checked

    def renew(self, claims: Mapping[str, Any], expires: float | None) -> None:
        """Go on with a new token's ``claims`` (its ``exp``: ``expires``): the old one's expiry is off."""
        self._server.handshakes.renew(self, claims, expires)

    def disconnect(self, user: str, room: str | None = None) -> int:
        """Remove ``user``'s connections on every instance (a server API request): from ``room`` only, or
        all of them, closed with 4001. Returns how many this instance had."""
        return self._server.messages.disconnect(user, room)

    def reply_raw(self, body: bytes) -> None:
        """``reply`` with an event that is already encoded JSON (``body``, UTF-8): a big state spliced
        together from parts encoded once."""
        if self.state is _OPEN:
            config = self._config
            self.queue_reply(OutboundMessage(
                _TEXT, body, config.compression_min_size, config.compression_level).frame_for(self.deflate_bits))

    # -- for the server: the protocol engines ---------------------------------

    @property
    def exchange(self) -> Exchange | None:
        """The ``HttpEndpoint`` request in progress (its body arriving, or its answer awaited)."""
        request = self.request
        return request.exchange if request is not None else None

    def open(self, upgrade: Upgrade) -> None:
        """Become a WebSocket as ``upgrade`` decided: the 101 goes out first."""
        self.endpoint = upgrade.endpoint
        self.params = upgrade.params
        self.query = upgrade.query
        self.user = upgrade.user
        self.claims = upgrade.claims
        self.deflate_bits = upgrade.deflate_bits
        self.queue(upgrade.response)
        self.status = 101
        self.request = None
        server = self._server
        self.frames = FrameReader(upgrade.deflate, upgrade.max_message_size, server.fast_path, server.unmask)
        self.state = _OPEN  # the trailing bytes are fed to its frames by the server

    def answer(self, status: int, response: bytes) -> None:
        """Answer the HTTP request (a refusal, or a plain HTTP route's answer) and be done."""
        self.queue(response)
        self.status = status

    def feed(self, data: bytes) -> None:
        """Frame bytes in, for ``read_frames``."""
        self.frames.feed(data)  # type: ignore[union-attr]

    def read_frames(self, budget: int | None) -> Iterator[str | bytes | CloseConnection]:
        """The complete messages and the close frame in what was fed, from at most ``budget`` frames
        (``FrameReader.read``)."""
        return self.frames.read(self, budget)  # type: ignore[union-attr]

    def pong(self, payload: bytes) -> None:
        """A pong came (its frame passed the rate limit): the keepalive notes it."""
        if self._keepalive is not None:
            self._keepalive.pong(payload)

    def admit(self, message: bool) -> bool:
        """The rate limit. Every frame costs a token: each message, and also each ping, pong and
        fragment that ends no message (``message`` False), so a flood of those is closed like one of
        messages. Over the rate a message is dropped with a ``rate_limited`` error (a control frame or
        fragment just costs its token); debt past one second's worth closes 1008."""
        bucket = self._bucket
        if bucket is None:
            rate = self._config.rate_limit
            if rate <= 0:
                return True
            bucket = self._bucket = RateBucket(rate, self._server.now)  # full, as if made at the connect
        tokens = bucket.take(self._server.now)
        if tokens >= 0:
            return True
        if tokens < -bucket.rate:
            self._server.send_close(self, CloseReason.POLICY_VIOLATION, "rate limit exceeded")
        elif message:
            self.error("rate_limited", f"more than {bucket.rate:g} messages per second; this one was dropped")
        return not message and self.state is _OPEN

    @property
    def ws_open(self) -> bool:
        """Neither side has sent its close frame (data and control frames may still be sent)."""
        return self.ws_state is WSState.OPEN

    @property
    def ws_state(self) -> WSState | None:
        """wsproto's state; a WebSocket whose engine is not made yet is open. None: not a WebSocket."""
        frames = self.frames
        return frames.state if frames is not None else None

    def send_frame(self, event: Any) -> None:
        """Queue the frame for ``event``: a pong or a ping (encoded here, as wsproto would: control
        frames carry no state), or a close (through wsproto, which tracks the closing handshake)."""
        if isinstance(event, Pong):
            self.queue(encode_frame(0xA, event.payload))
        elif isinstance(event, Ping):
            self.queue(encode_frame(0x9, event.payload))
        else:
            self.queue(self.frames.send(event))  # type: ignore[union-attr]

    def ping(self) -> int:
        """Queue a keepalive ping; returns its number, for ``pong_late``."""
        keepalive = self._keepalive
        if keepalive is None:
            keepalive = self._keepalive = Keepalive()
        self.send_frame(Ping(keepalive.ping()))
        return keepalive.seq

    def pong_late(self, seq: int) -> bool:
        return self._keepalive is not None and self._keepalive.late(seq)

    def finish(self) -> None:
        """The protocol is over: drop the engines and any half-received message."""
        self.state = _CLOSED
        self.backlogged = False
        self.request = None
        self.frames = None
        self._outbox.pending[self] = None

    def drop_output(self) -> None:
        """Forget what the client has not taken, but an unsent HTTP answer: it gets its 101 before
        our close, never a bare close frame."""
        out = self.outbound
        self.outbound = [out[0]] if out and out[0].startswith(b"HTTP/") else ()
        self.outbound_size = self.reply_size = 0

    def queue(self, data: bytes) -> None:
        """This connection's own output (events, control frames, HTTP answers), after what its rooms
        broadcast to it so far in this pass; pongs to a ping flood count against the buffer too."""
        if data:
            for room in self.rooms:
                room.detach_if_batching(self)
            self.append(bytes(data))

    def queue_reply(self, data: bytes) -> None:
        """Like ``queue``, for a reply the client asked for: counted apart (see ``reply``)."""
        if data:
            for room in self.rooms:
                room.detach_if_batching(self)
            if self.outbound:
                self.outbound.append(bytes(data))  # type: ignore[union-attr]
            else:
                self.outbound = [bytes(data)]
            self.reply_size += len(data)
            outbox = self._outbox
            outbox.pending[self] = None
            if self.reply_size > REPLY_ALLOWANCE * self._config.max_buffer:
                outbox.slow.append(self)

    def append(self, data: bytes) -> None:
        """Queue bytes as they are (a room's frames, shared bytes the shell could not write), counted
        against ``max_buffer``."""
        if self.outbound:
            self.outbound.append(data)  # type: ignore[union-attr]
        else:
            self.outbound = [data]
        self.outbound_size += len(data)
        outbox = self._outbox
        outbox.pending[self] = None
        if self.outbound_size > self._config.max_buffer:
            outbox.slow.append(self)

    def over_limit(self) -> bool:
        """Still open and over its buffer (its route's, if larger): a slow consumer."""
        limit = self._config.max_buffer
        if self.endpoint is not None and self.endpoint.max_buffer:
            limit = max(limit, self.endpoint.max_buffer)
        return self.state is _OPEN and (
            self.outbound_size > limit or self.reply_size > REPLY_ALLOWANCE * limit
        )


# ---------------------------------------------------------------------------
# Rooms: members, per-pass batches, presence windows
# ---------------------------------------------------------------------------

class Recovery:
    """A ``/ws`` join with ``since``: what it waits for and, once the store has answered (when the ring
    did not hold ``since``), the stored messages after it (``page``, as encoded) and whether the store
    knew ``since`` in this room (``found``). Also the ``History`` request's ``ref`` for that read."""

    __slots__ = ("conn_id", "found", "meta", "near", "page", "refs", "room", "since", "truncated", "watch")

    def __init__(self, conn_id: int, room: str, since: str, meta: bytes, watch: bool, ref: Any) -> None:
        self.conn_id = conn_id
        self.room = room
        self.since = since
        self.meta = meta
        self.watch = watch
        self.refs = [ref]
        self.page: list[tuple[str, bytes, int]] | None = None
        self.found = False
        self.near: list[str] = []  # the ids the store has just before since (within recover_window)
        self.truncated = False  # the store's page stopped at its limit


def _origin(message_id: str) -> tuple[int, str] | None:
    """(milliseconds, instance tag) of an id ``IdClock`` made; None for anything else."""
    head = message_id[:12]
    if len(message_id) <= 18 or not all(c in "0123456789abcdef" for c in head):
        return None
    return int(head, 16), message_id[18:]


def _read_from(since: str, window: float) -> str:
    """Where a recovery's store read starts: ``recover_window`` before ``since``, to see who published
    around it (just below ``since`` for an id that is not ``IdClock``'s)."""
    origin = _origin(since)
    if origin is None:
        return _below(since)
    return f"{max(origin[0] - int(window * 1000), 0):012x}"


SEQUENCED_TAG = "~"
"""The tag of the ids a sequencing broker gave (``Server.deliver_sequenced``) in place of an instance's:
those messages are in one order on every instance, as if one instance had sent them all."""


def _uncertain(since: str, ids: Iterable[str], window: float, live: Callable[[str], bool]) -> bool:
    """Some id within ``window`` of ``since`` is another instance's, and both instances ran at the
    same time (``live``: this one, or one whose messages reached it): the two may have reached the
    client's old instance in the other order than here (each instance's own messages keep their
    order everywhere; two instances' do not). A restarted single instance is not uncertain: its
    tag before the restart never ran beside it. The broker's order (``SEQUENCED_TAG``) counts as one
    more instance that ran beside every other: only messages it did not order (an outage's) next to
    ones it did, or to another instance's, are uncertain."""
    origin = _origin(since)
    if origin is None or not (origin[1] == SEQUENCED_TAG or live(origin[1])):
        return False
    ms, node = origin
    span = int(window * 1000)
    for message_id in ids:
        other = _origin(message_id)
        if (other is not None and other[1] != node and abs(other[0] - ms) <= span
                and (other[1] == SEQUENCED_TAG or live(other[1]))):
            return True
    return False


class PublishKeys:
    """The publish keys this instance has seen: ``(room, user, key)`` -> the message's ``(id, ts)`` once
    stored, or, until then, the acks of repeats waiting for it. The newest ``limit`` are kept. A repeat
    of a stored key is acked with the original id at once; of one still being stored, when it is
    (or told ``unavailable`` with it). Keys of other instances' messages come with them from the
    broker (``known``)."""

    __slots__ = ("_entries", "_limit", "_waiting", "waiting")

    def __init__(self, limit: int) -> None:
        self._entries: dict[tuple[str, Any, str], tuple[str, Any] | list[Ack]] = {}
        self._waiting: dict[str, tuple[str, Any, str]] = {}  # message id -> its key, until stored or lost
        self._limit = limit
        self.waiting = False
        """Some keyed message is still being stored (``_waiting`` is not empty): read for every ack, so a
        plain attribute, not a property."""

    def lookup(self, key: tuple[str, Any, str]) -> tuple[str, Any] | list[Ack] | None:
        return self._entries.get(key)

    def storing(self, key: tuple[str, Any, str], message_id: str) -> None:
        self._entries[key] = []
        self._waiting[message_id] = key
        self.waiting = True
        self._trim()

    def known(self, key: tuple[str, Any, str], message_id: str, ts: Any) -> None:
        self._entries[key] = (message_id, ts)
        self._trim()

    def stored(self, message_id: str, ts: Any) -> list[Ack]:
        """The message with this id is stored: the repeats that waited for it (and its key is now known)."""
        key = self._waiting.pop(message_id, None) if self._waiting else None
        if key is None:
            return []
        self.waiting = bool(self._waiting)
        waiters = self._entries.get(key)
        self._entries[key] = (message_id, ts)
        return waiters if isinstance(waiters, list) else []

    def renamed(self, message_id: str, new_id: str) -> None:
        """The message still being stored under ``message_id`` got its final id (the broker ordered it)."""
        key = self._waiting.pop(message_id, None) if self._waiting else None
        if key is not None:
            self._waiting[new_id] = key

    def superseded(self, message_id: str) -> None:
        """The message waiting under ``message_id`` will not be stored: its key's original came first (the
        broker ordered another instance's message with the same key before it); the key stays known."""
        self._waiting.pop(message_id, None)

    def lost(self, message_id: str) -> list[Ack]:
        """The message with this id could not be stored: its key is free again; the repeats that waited."""
        key = self._waiting.pop(message_id, None) if self._waiting else None
        if key is None:
            return []
        self.waiting = bool(self._waiting)
        waiters = self._entries.pop(key, None)
        return waiters if isinstance(waiters, list) else []

    def _trim(self) -> None:
        entries = self._entries
        while len(entries) > self._limit:
            del entries[next(iter(entries))]


def _below(message_id: str) -> str:
    """A string just below ``message_id``: ``after`` it, a store's page starts at ``message_id`` itself
    (and perhaps a few ids between the two, which the caller drops)."""
    last = message_id[-1]
    return message_id[:-1] if last == "\x00" else message_id[:-1] + chr(ord(last) - 1)


RECOVERIES_IN_FLIGHT = 2
"""Store reads for joins with ``since`` one connection may have waiting at once: a client that rejoins
100 rooms from long ago must not queue 100 reads of up to ``2 * recover_max`` rows ahead of everyone
else's writes and history (the rest are answered ``recovered: false`` at once)."""


class Recoveries:
    """Joins with ``since`` (``Recovery``): recovered from the room's ring at once when it holds
    ``since``; else the store is read first (``History`` with the ``Recovery`` as its ref), the room and
    its ring held meanwhile so that what arrives during the read is not missed, and the join goes
    on with the answer (``Rooms.recovery_json`` then computes what was missed). The one owner of the
    joins waiting for the store."""

    __slots__ = ("_limit", "_rooms", "_waiting", "_window")

    def __init__(self, rooms: Rooms, config: Config) -> None:
        self._rooms = rooms
        self._waiting: dict[tuple[int, str], Recovery] = {}
        self._limit = 2 * config.recover_max + 2  # rows a store read may take
        self._window = config.recover_window

    def start(
        self, conn: Connection, name: str, meta: bytes, watch: bool, ref: Any, since: str, now: float
    ) -> History | None:
        """Join ``name`` recovering from ``since``; returns the store read to ask for, if one is needed."""
        rooms = self._rooms
        target = rooms.by_name.get(name)
        if target is not None and conn in target.present:  # joined already: joined again, nothing recovered
            rooms.enter(conn, name, meta, watch, ref, now)
            return None
        waiting = self._waiting.get((conn.id, name))
        if waiting is not None:  # joined again while the store is read: answered with the first
            waiting.refs.append(ref)
            return None
        recovery = Recovery(conn.id, name, since, meta, watch, ref)
        in_ring = bool(since) and target is not None and target.recent.knows(since)
        if not in_ring and (not since or self.count(conn) >= RECOVERIES_IN_FLIGHT):
            # nothing to look for, or this connection already has its share of the store: recovered
            # false at once (the client pages history, which is bounded by --history-max per request)
            recovery.page = []  # found stays False
        if in_ring or recovery.page is not None:
            rooms.enter(conn, name, meta, watch, ref, now, recovery)
            return None
        self._waiting[(conn.id, name)] = recovery
        rooms.hold(name)
        # from recover_window before since (who published around it), since, the recover_max after it, one more
        return History(conn.id, name, self._limit, None, _read_from(since, self._window), recovery)

    def answered(
        self, recovery: Recovery, messages: list[Mapping[str, Any]] | None, conn: Connection | None, now: float,
    ) -> None:
        """The store's answer (None: the read failed, recovered false): the join goes on, unless the
        connection left the room or closed meanwhile."""
        key = (recovery.conn_id, recovery.room)
        rooms = self._rooms
        if self._waiting.get(key) is not recovery:
            rooms.release(recovery.room)
            return
        del self._waiting[key]
        try:
            if conn is None or conn.state is not _OPEN:
                return
            since, dumps, page = recovery.since, conn.config.codec.dumps, []
            recovery.truncated = messages is not None and len(messages) >= self._limit
            for message in messages or ():
                message_id = message.get("id") if isinstance(message, Mapping) else None
                if not isinstance(message_id, str):
                    continue
                if message_id < since:
                    recovery.near.append(message_id)
                elif message_id == since:
                    recovery.found = True
                else:
                    page.append((message_id, dumps(message), 0))
            recovery.page = page
            first, *more = recovery.refs
            rooms.enter(conn, recovery.room, recovery.meta, recovery.watch, first, now, recovery)
            for ref in more:
                rooms.enter(conn, recovery.room, recovery.meta, recovery.watch, ref, now)
        finally:
            rooms.release(recovery.room)

    def waiting(self, conn: Connection, name: str) -> bool:
        return bool(self._waiting) and (conn.id, name) in self._waiting

    def count(self, conn: Connection) -> int:
        waiting = self._waiting
        return sum(1 for conn_id, _ in waiting if conn_id == conn.id) if waiting else 0

    def cancel(self, conn: Connection, name: str) -> bool:
        """``conn`` leaves ``name`` before the store answered (True: it was waiting; the answer finds it gone)."""
        return self._waiting.pop((conn.id, name), None) is not None


class RingBudget:
    """The bytes every room's ``Recent`` holds, together, against ``limit`` (``--recover-memory``)."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0


class Recent:
    """A room's newest messages as encoded, in the order its members here received them: what a short
    reconnect recovers (``join`` with ``since``) without reading the store, and what covers the
    messages that arrive while a longer recovery reads it. At most ``count`` messages and ``size``
    bytes; ``evicted`` is the greatest id that left (None: nothing has), which tells whether the
    ring still holds everything after a given id. Its bytes count in the shared ``budget`` too: past
    that, the ring that gets a message halves first.

    It keeps each message as the frame that went out (its plain, unmasked text frame: a bytes object of
    its own size, already made), not the encoder's output, which orjson leaves in a buffer of about
    4 KiB; the accessors give the message itself (``_unframe``)."""

    __slots__ = ("budget", "bytes", "count", "entries", "evicted", "size")

    def __init__(self, count: int, size: int, budget: RingBudget) -> None:
        self.entries: deque[tuple[str, bytes, int]] = deque()  # (id, frame, sender connection id or 0), oldest first
        self.bytes = 0  # of the frames in entries
        self.count = count
        self.size = size
        self.budget = budget
        self.evicted: str | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, message_id: str, frame: bytes, sender: int = 0) -> None:
        """Keep a message as the plain frame that went out."""
        self.entries.append((message_id, frame, sender))
        self.bytes += len(frame)
        budget = self.budget
        budget.used += len(frame)
        if self.bytes > self.size or len(self.entries) > self.count or budget.used > budget.limit:
            self._evict()

    def _evict(self) -> None:
        """Drop the oldest down to three quarters of ``count`` and ``size`` (so that a full ring pays for
        this once per quarter, not once per message), and to half its bytes while the budget is over
        its limit."""
        entries, budget = self.entries, self.budget
        count = self.count * 3 // 4 if len(entries) > self.count else self.count
        size = self.size * 3 // 4 if self.bytes > self.size else self.size
        if budget.used > budget.limit:
            size = min(size, self.bytes // 2)
        while entries and (len(entries) > count or self.bytes > size):
            old_id, old, _ = entries.popleft()
            self.bytes -= len(old)
            budget.used -= len(old)
            if self.evicted is None or old_id > self.evicted:
                self.evicted = old_id

    def clear(self) -> None:
        """The room goes: its bytes leave the budget."""
        self.budget.used -= self.bytes
        self.bytes = 0
        self.entries.clear()

    def knows(self, message_id: str) -> bool:
        return any(entry[0] == message_id for entry in self.entries)

    def since(self, message_id: str) -> list[tuple[str, bytes, int]] | None:
        """What came after ``message_id``, oldest first, in this room's order here (id, message, sender);
        None: not held."""
        later: list[tuple[str, bytes, int]] = []
        for entry in reversed(self.entries):  # from the newest: the cost is what was missed
            if entry[0] == message_id:
                later.reverse()
                return [(later_id, _unframe(frame), sender) for later_id, frame, sender in later]
            later.append(entry)
        return None

    def after(self, boundary: str, known: Collection[str]) -> list[tuple[str, bytes, int]] | None:
        """The messages with an id greater than ``boundary`` and not in ``known``, oldest first; None when
        one such may have left the ring already."""
        if self.evicted is not None and self.evicted > boundary:
            return None
        return [(message_id, _unframe(frame), sender) for message_id, frame, sender in self.entries
                if message_id > boundary and message_id not in known]

    def newest(self, count: int) -> list[tuple[str, bytes, int]]:
        kept = list(self.entries)[-count:] if count > 0 else []
        return [(message_id, _unframe(frame), sender) for message_id, frame, sender in kept]


def _unframe(frame: bytes) -> bytes:
    """The payload of a plain (unmasked, unfragmented) frame the server made."""
    n = frame[1] & 0x7F
    return frame[2:] if n < 126 else frame[4:] if n == 126 else frame[10:]


class Room:
    """One named room: who is in it, what was broadcast to it in this pass, and its presence window.

    Broadcasts of one pass (one input, or one ``tick``) collect in the room's batch, one list of
    frames per compression group, and leave as one bytes object shared by every member of the
    group (``Server.take_shared``): a pipelining sender's messages cost each recipient one write
    per pass, not one per message. Members that must not take the whole batch (the sender it
    excludes, a member that joined mid-pass or got output of its own in between) are *detached*
    for the rest of the pass and get frames one by one; so are members of several rooms, whose
    frames must keep their order across rooms.

    Presence: every connection in the room is *present*, with its metadata (``present``, as
    encoded JSON; ``{}`` for v1 chat members), and ``users`` counts each user's connections.
    ``watchers`` are the members that receive presence events (``/ws`` members that did not ask
    ``"presence": false``). Joins, leaves and metadata changes of a window collect in the room and
    go out together when it ends (``Rooms.end_window``): one diff for the watchers, and to each
    ``pending`` joiner its ``joined`` with the whole state, both encoded once. Members of v1's
    ``/presence`` route (``v1_watchers``) get v1's events instead: user names that came or went,
    and, for those that joined in the window, the state at its end.

    Recovery: ``recent`` holds its newest messages (``Recent``); ``recoveries`` the joiners with
    ``since`` whose ``joined`` will carry what they missed, computed when they become members;
    ``holds`` counts store reads for a recovery that keep the room (and its ring) alive meanwhile."""

    __slots__ = (
        "_batch",
        "_changes",
        "_detached",
        "_log",
        "_multi",
        "_newcomers",
        "groups",
        "holds",
        "members",
        "name",
        "pending",
        "present",
        "recent",
        "recoveries",
        "users",
        "v1_watchers",
        "watchers",
        "window_ends",
    )

    def __init__(self, name: str, recent: Recent) -> None:
        self.name = name
        self.recent = recent
        self.recoveries: dict[Connection, Recovery] = {}
        self.holds = 0
        self.members: dict[Connection, None] = {}  # the connections its broadcasts go to
        self.groups: dict[int | None, dict[Connection, None]] = {}  # deflate window bits (None: off) -> members
        self.present: dict[Connection, bytes] = {}  # connection -> its metadata here (members and pending joiners)
        self.users: dict[str, int] = {}  # user -> its connections present here
        self.watchers: dict[Connection, None] = {}  # members that receive v2 presence events
        self.v1_watchers: dict[Connection, None] = {}  # members that receive v1's (the /presence route's)
        self.pending: dict[Connection, list[Any]] = {}  # joiners whose ``joined`` waits for the window's end: refs
        self.window_ends: float | None = None  # when the open presence window ends (None: none is open)
        self._batch: dict[int | None, list[bytes]] | None = None  # this pass's frames per group, while open
        self._detached: dict[Connection, None] = {}  # members served one frame at a time until the pass ends
        self._multi: dict[Connection, None] = {}  # members of other rooms too: detached in every pass
        self._log: list[tuple[str, bool]] = []  # v1: (user, came) in this window
        self._newcomers: dict[Connection, None] = {}  # v1: joined in this window, their state comes at its end
        self._changes: list[tuple[str, bytes, int]] = []  # (user, metadata, +1 came / -1 went) in this window

    # -- membership -------------------------------------------------------------

    def add(self, conn: Connection) -> bool:
        """Make ``conn`` a member, one broadcasts go to (False: it already was). One that joins
        mid-pass does not get what was broadcast before it joined."""
        if conn in self.members:
            return False
        self.members[conn] = None
        group = self.groups.get(conn.deflate_bits)
        if group is None:
            group = self.groups[conn.deflate_bits] = {}
        group[conn] = None
        if self._batch is not None:
            self._detached[conn] = None
        return True

    def remove(self, conn: Connection) -> None:
        """``conn`` is no longer in the room; what was broadcast to it earlier in this pass is its still."""
        if conn.state is not _CLOSED:
            self.detach_if_batching(conn)
        self.members.pop(conn, None)
        group = self.groups.get(conn.deflate_bits)
        if group is not None:
            group.pop(conn, None)
            if not group:
                del self.groups[conn.deflate_bits]
        self._detached.pop(conn, None)
        self._multi.pop(conn, None)
        self._newcomers.pop(conn, None)
        self.watchers.pop(conn, None)
        self.v1_watchers.pop(conn, None)
        self.pending.pop(conn, None)
        self.recoveries.pop(conn, None)

    def mark_multi(self, conn: Connection) -> None:
        """``conn`` is in other rooms too: from now on it takes this room's frames one by one."""
        if conn in self.members:
            self._multi[conn] = None
            self.detach_if_batching(conn)

    @property
    def empty(self) -> bool:
        """Nobody is here (and no presence window is open): the room can go."""
        return not self.present and not self.members and self.window_ends is None and not self.holds

    # -- this pass's batch --------------------------------------------------------

    @property
    def batching(self) -> bool:
        """A batch is open: something was broadcast in this pass."""
        return self._batch is not None

    def broadcast(self, message: OutboundMessage, excluded: Collection[Connection]) -> int:
        """One message for every member but ``excluded``; returns how many get it."""
        batch = self._batch
        if batch is None:
            batch = self._batch = {}
            if self._multi:
                self._detached.update(self._multi)
        detached = self._detached
        members = self.members
        count = len(members)
        for conn in excluded:
            if conn in members:
                count -= 1
                if conn not in detached:
                    self.detach(conn)
        for bits in self.groups:
            frame = message.plain if bits is None else message.frame_for(bits)  # most groups: no deflate
            frames = batch.get(bits)
            if frames is None:
                batch[bits] = [frame]
            else:
                frames.append(frame)
        for member in detached:
            if member not in excluded:
                member.append(message.frame_for(member.deflate_bits))
        return count

    def detach(self, conn: Connection) -> None:
        """From now until the pass ends, ``conn`` takes this room's frames one by one (it gets the
        frames batched so far at once), so its own output and exclusions keep their order."""
        assert self._batch is not None
        self._detached[conn] = None
        frames = self._batch.get(conn.deflate_bits)
        if frames:
            conn.append(frames[0] if len(frames) == 1 else b"".join(frames))

    def detach_if_batching(self, conn: Connection) -> None:
        if self._batch is not None and conn not in self._detached and conn in self.members:
            self.detach(conn)

    def exclude(self, conn: Connection) -> None:
        """``conn`` takes nothing more of this pass's batch (it is being closed as a slow consumer)."""
        if self._batch is not None:
            self._detached[conn] = None

    def take(self, shared: list[tuple[bytes, list[Connection]]]) -> None:
        """Close this pass's batch: add (bytes, the members that take exactly those bytes) to ``shared``."""
        batch, self._batch = self._batch, None
        detached = self._detached
        if detached:
            self._detached = {}
        if batch is None:
            return
        for bits, frames in batch.items():
            group = self.groups.get(bits)
            if not group:
                continue
            members = list(group)
            for member in detached:  # few: this pass's senders, late joiners, multi-room members
                if member in group:
                    members.remove(member)
            if members:
                shared.append((frames[0] if len(frames) == 1 else b"".join(frames), members))

    # -- presence -------------------------------------------------------------

    def enter(self, conn: Connection, meta: bytes) -> int:
        """``conn`` is present here with ``meta``; returns how many connections its user had here before."""
        self.present[conn] = meta
        user = conn.user
        count = self.users.get(user, 0)
        self.users[user] = count + 1
        if self.watchers or self.pending:  # news only to someone who watches
            self._changes.append((user, meta, 1))
        return count

    def exit(self, conn: Connection) -> int:
        """``conn`` is no longer present; returns how many connections its user still has here."""
        meta = self.present.pop(conn, None)
        if meta is None:
            return self.users.get(conn.user, 0)
        user = conn.user
        count = self.users.get(user, 0) - 1
        if count > 0:
            self.users[user] = count
        else:
            self.users.pop(user, None)
        if self.watchers or self.pending:
            self._changes.append((user, meta, -1))
        return max(count, 0)

    def update(self, conn: Connection, meta: bytes) -> None:
        """``conn``'s metadata here is now ``meta`` (it leaves with the old and comes with the new)."""
        old = self.present.get(conn)
        if old is None or old == meta:
            return
        self.present[conn] = meta
        if self.watchers or self.pending:
            self._changes += [(conn.user, old, -1), (conn.user, meta, 1)]

    def remote(self, user: str, meta: bytes, delta: int) -> None:
        """A connection of ``user`` came (``delta`` 1) or went (-1) on another instance."""
        self._changes.append((user, meta, delta))

    def log(self, user: str, came: bool) -> None:
        """v1: a user that is news to the room, for this window's diff of user names."""
        self._log.append((user, came))

    def add_newcomer(self, conn: Connection) -> None:
        self._newcomers[conn] = None

    def end_window(self) -> tuple[list[str], list[str], dict[Connection, None], dict[str, list[bytes]],
                                  dict[str, list[bytes]]]:
        """Close the presence window: v1's net user joins and leaves and its newcomers; v2's net
        joins and leaves of metadata, by user (a connection that came and went within it is in
        neither)."""
        net: dict[str, int] = {}
        for user, came in self._log:
            net[user] = net.get(user, 0) + (1 if came else -1)
        v1_joins = sorted(u for u, n in net.items() if n > 0)
        v1_leaves = sorted(u for u, n in net.items() if n < 0)
        newcomers = self._newcomers
        counts: dict[tuple[str, bytes], int] = {}
        for user, meta, delta in self._changes:
            counts[(user, meta)] = counts.get((user, meta), 0) + delta
        joins: dict[str, list[bytes]] = {}
        leaves: dict[str, list[bytes]] = {}
        for (user, meta), n in counts.items():
            if n:
                (joins if n > 0 else leaves).setdefault(user, []).extend([meta] * abs(n))
        self._log = []
        self._newcomers = {}
        self._changes = []
        self.window_ends = None
        return v1_joins, v1_leaves, newcomers, joins, leaves

    def local_metas(self) -> dict[str, list[bytes]]:
        """This instance's users here, each with one metadata per connection."""
        by_user: dict[str, list[bytes]] = {}
        for conn, meta in self.present.items():
            metas = by_user.get(conn.user)
            if metas is None:
                by_user[conn.user] = [meta]
            else:
                metas.append(meta)
        return by_user


def _metas_json(users: Mapping[str, Iterable[bytes]], dumps: Callable[[Any], bytes]) -> bytes:
    """``{USER: [META, ...]}`` from metadata already encoded: joined, never re-encoded."""
    return b"{" + b",".join(dumps(user) + b":[" + b",".join(metas) + b"]" for user, metas in users.items()) + b"}"


class Rooms:
    """Every room of one server, by name: joins and leaves (with presence), broadcasts, the rooms
    with a batch open in this pass, and the end of presence windows. Membership is kept on both
    sides, the room's and the connection's ``rooms``, and only here."""

    __slots__ = ("_batched", "_budget", "_changed", "_cluster", "_config", "_timers", "by_name")

    def __init__(self, config: Config, timers: Timers, cluster: Cluster, changed: Callable[[], None]) -> None:
        self.by_name: dict[str, Room] = {}
        self._config = config
        self._timers = timers
        self._cluster = cluster
        self._changed = changed  # this instance's presence changed (the broker should hear of it)
        self._batched: list[Room] = []  # rooms with broadcasts in this pass
        self._budget = RingBudget(config.recover_memory)  # every room's ring, together

    def _room(self, name: str) -> Room:
        room = self.by_name.get(name)
        if room is None:
            config = self._config
            room = self.by_name[name] = Room(name, Recent(config.recover_ring, config.recover_ring_bytes, self._budget))
        return room

    def _become_member(self, conn: Connection, room: Room) -> None:
        room.add(conn)
        if len(conn.rooms) > 1:
            for each in conn.rooms:
                each.mark_multi(conn)

    def join(self, conn: Connection, name: str, presence: bool, now: float) -> Room:
        """v1's join: a member at once, present with no metadata; with ``presence`` it gets v1's presence
        events (the ``/presence`` route's): the state at the end of the window it joined in, then diffs."""
        room = self._room(name)
        if conn in room.present:
            return room
        conn.rooms.append(room)
        self._become_member(conn, room)
        self._arrive(conn, room, NO_META, now)
        if presence:
            room.v1_watchers[conn] = None
            room.add_newcomer(conn)
            self._open_window(room, now)
        return room

    def _arrive(self, conn: Connection, room: Room, meta: bytes, now: float) -> None:
        """``conn`` is present in ``room``: news for its presence watchers, and for the other instances."""
        user = conn.user
        if room.enter(conn, meta) == 0 and room.v1_watchers and user not in self._cluster.users(room.name):
            room.log(user, True)
            self._open_window(room, now)
        if room.watchers or room.pending:
            self._open_window(room, now)
        self._changed()

    def enter(
        self, conn: Connection, name: str, meta: bytes, watch: bool, ref: Any, now: float,
        recovery: Recovery | None = None,
    ) -> None:
        """v2's join: present with ``meta``. A watcher's ``joined`` (with the whole room's presence) goes
        out when the presence window ends, and its messages start there; one that does not watch is
        answered and a member at once. Joining a room it is in answers ``joined`` again. With a
        ``recovery``, the first ``joined`` carries what was missed (``recovery_json``), computed
        at the moment the live messages start."""
        room = self._room(name)
        if conn in room.present:
            if conn in room.pending:
                room.pending[conn].append(ref)  # answered with the first, at the window's end
            else:
                self.send_joined(conn, room, ref, self.state_json(room) if conn in room.watchers else None)
            return
        conn.rooms.append(room)
        if recovery is not None:
            room.recoveries[conn] = recovery
        if watch:
            room.pending[conn] = [ref]
        else:
            self._become_member(conn, room)
            self.send_joined(conn, room, ref, None)
        self._arrive(conn, room, meta, now)

    def send_joined(self, conn: Connection, room: Room, ref: Any, presence: bytes | None) -> None:
        """``{"event":"joined","room":R,"ref":X,"presence":{...}}``, the presence spliced in as encoded."""
        dumps = self._config.codec.dumps
        parts = [b'{"event":"joined","room":', dumps(room.name)]
        if ref is not None:
            parts += [b',"ref":', dumps(ref)]
        if presence is not None:
            parts += [b',"presence":', presence]
        recovery = room.recoveries.pop(conn, None)
        if recovery is not None:
            parts.append(self.recovery_json(room, recovery))
        conn.queue_reply(encode_frame(_TEXT, b"".join(parts) + b"}") if conn.deflate_bits is None else
                         OutboundMessage(_TEXT, b"".join(parts) + b"}", self._config.compression_min_size,
                                         self._config.compression_level).frame_for(conn.deflate_bits))

    def recovery_json(self, room: Room, recovery: Recovery) -> bytes:
        """``,"recovered":B,"messages":[...]`` for a joiner that becomes a member now: every message of the
        room after ``since`` in the order the members here got them, from the ring, or from the store's
        page followed by what the ring got after it. ``recovered`` is false when that cannot be promised
        (``since`` unknown here, the gap over ``recover_max`` or over half of ``max_buffer`` as encoded,
        the ring lost part of it meanwhile, or another instance published within ``recover_window`` of
        ``since``, whose order around it the client's old instance may have had otherwise): then
        ``messages`` holds the newest the ring has."""
        config = self._config
        cap = config.recover_max
        recent = room.recent
        missed: list[tuple[str, bytes, int]] | None
        around = [entry[0] for entry in recent.entries]  # who published around since, here
        if recovery.page is None:  # the ring held ``since`` at the join
            missed = recent.since(recovery.since)
        elif not recovery.found or recovery.truncated or len(recovery.page) > cap:
            missed = None
        else:
            page = recovery.page
            tail = recent.after(page[-1][0] if page else recovery.since, {entry[0] for entry in page})
            missed = None if tail is None else page + tail
            around += recovery.near + [entry[0] for entry in page]
        if missed is not None and _uncertain(recovery.since, around, config.recover_window, self._cluster.coexists):
            missed = None
        if missed is not None:  # what this connection itself published while it waited is not news to it
            missed = [entry for entry in missed if entry[2] != recovery.conn_id]
        budget = config.max_buffer // 2
        if missed is not None and (len(missed) > cap or sum(len(entry[1]) + 1 for entry in missed) > budget):
            missed = None
        recovered = missed is not None
        if missed is None:
            missed, size = [], 0
            for entry in reversed(recent.newest(cap)):
                if entry[2] == recovery.conn_id:
                    continue
                size += len(entry[1]) + 1
                if size > budget:
                    break
                missed.append(entry)
            missed.reverse()
        return (b',"recovered":' + (b"true" if recovered else b"false") + b',"messages":['
                + b",".join(entry[1] for entry in missed) + b"]")

    def publish(
        self, name: str, message_id: str, message: OutboundMessage, excluded: Collection[Connection], sender: int = 0
    ) -> int:
        """A chat message for room ``name`` (``broadcast``), kept in its ring for recovery with the id of
        the connection that ``sent`` it here (0: another instance, or the API)."""
        room = self.by_name.get(name)
        if room is None:
            return 0
        room.recent.add(message_id, message.plain, sender)
        if not room.batching:
            self._batched.append(room)
        return room.broadcast(message, excluded)

    def _drop(self, room: Room) -> None:
        """An empty room goes, and its ring's memory with it."""
        del self.by_name[room.name]
        room.recent.clear()

    @property
    def ring_bytes(self) -> int:
        """What every room's ring holds together (``--recover-memory`` bounds it)."""
        return self._budget.used

    def hold(self, name: str) -> None:
        """Keep room ``name`` (and its ring) while a recovery reads the store for it."""
        self._room(name).holds += 1

    def release(self, name: str) -> None:
        room = self.by_name.get(name)
        if room is not None:
            room.holds -= 1
            if room.empty:
                self._drop(room)

    def leave(self, conn: Connection, name: str, now: float) -> bool:
        """``conn`` leaves room ``name`` (False: it was not in it)."""
        room = self.by_name.get(name)
        if room is None or conn not in room.present:
            return False
        conn.rooms.remove(room)
        self._depart(conn, room, now)
        return True

    def leave_all(self, conn: Connection, now: float) -> None:
        """``conn`` stops being anywhere (it is closing)."""
        rooms, conn.rooms = conn.rooms, []
        for room in rooms:
            self._depart(conn, room, now)

    def _depart(self, conn: Connection, room: Room, now: float) -> None:
        room.remove(conn)
        user = conn.user
        if room.exit(conn) == 0 and room.v1_watchers and user not in self._cluster.users(room.name):
            room.log(user, False)
            self._open_window(room, now)
        if room.watchers or room.pending:
            self._open_window(room, now)
        self._changed()
        if room.empty and self.by_name.get(room.name) is room:
            self._drop(room)

    def update(self, conn: Connection, name: str, meta: bytes, now: float) -> bool:
        """``conn``'s metadata in room ``name`` is now ``meta`` (False: it is not in it)."""
        room = self.by_name.get(name)
        if room is None or conn not in room.present:
            return False
        room.update(conn, meta)
        self._changed()
        if room.watchers or room.pending:
            self._open_window(room, now)
        return True

    def broadcast(self, name: str, message: OutboundMessage, excluded: Collection[Connection]) -> int:
        """``message`` for every member of room ``name`` but ``excluded``, batched for this pass."""
        room = self.by_name.get(name)
        if room is None:
            return 0
        if not room.batching:
            self._batched.append(room)
        return room.broadcast(message, excluded)

    def take_batches(self) -> list[tuple[bytes, list[Connection]]]:
        """Every batch of this pass, as (bytes, the members that take exactly those bytes)."""
        shared: list[tuple[bytes, list[Connection]]] = []
        for room in self._batched:
            room.take(shared)
        self._batched.clear()
        return shared

    def exclude(self, conn: Connection) -> None:
        for room in conn.rooms:
            room.exclude(conn)

    def heartbeat(self, node: str, rooms: Mapping[str, Any] | None, now: float) -> None:
        """Another instance's presence heartbeat (None: its goodbye), told to the rooms it changes."""
        if rooms is None:
            changes = self._cluster.goodbye(node)
        else:
            changes = self._cluster.heartbeat(node, rooms, now, self._config.codec.dumps)
            self._timers.schedule(self._cluster.deadline(node), TimerKind.NODE_EXPIRY, node)
        for change in changes:
            self.remote_change(*change, now)

    def expire_node(self, node: str, now: float) -> None:
        """``node``'s heartbeat may be overdue: if it is, its users leave."""
        for change in self._cluster.expire(node, now):
            self.remote_change(*change, now)

    def remote_change(self, name: str, appeared: Iterable[str], vanished: Iterable[str],
                      metas: Iterable[tuple[str, bytes, int]], now: float) -> None:
        """What changed in room ``name`` on the other instances: users now present cluster-wide that were
        not and the other way round (v1's events), and connections' metadata that came and went (v2's)."""
        room = self.by_name.get(name)
        if room is None:
            return
        if room.v1_watchers:
            for user, came in [(u, True) for u in appeared] + [(u, False) for u in vanished]:
                if user not in room.users:
                    room.log(user, came)
                    self._open_window(room, now)
        if room.watchers or room.pending:
            for user, meta, delta in metas:
                room.remote(user, meta, delta)
                self._open_window(room, now)

    def _open_window(self, room: Room, now: float) -> None:
        if room.window_ends is None:
            room.window_ends = now + self._config.presence_window
            self._timers.schedule(room.window_ends, TimerKind.PRESENCE, room)

    def end_window(self, room: Room) -> None:
        """End a presence window. v2: the watchers get its net joins and leaves (one shared diff); the
        joiners it held get their ``joined`` with the room's whole presence (encoded once), and from
        now on its messages. v1: members get the diff of user names, those who came during it the
        state instead. Whatever the burst (a reconnect storm of thousands), a window costs one state,
        one diff and one write per member."""
        v1_joins, v1_leaves, newcomers, joins, leaves = room.end_window()
        config = self._config
        if v1_joins or v1_leaves:
            diff = text_message({"event": "presence_diff", "joins": v1_joins, "leaves": v1_leaves}, config)
            if len(room.v1_watchers) == len(room.members):  # v1's /presence room as it always was: one batch
                self.broadcast(room.name, diff, newcomers)
            else:
                for conn in room.v1_watchers:
                    if conn not in newcomers:
                        conn.queue(diff.frame_for(conn.deflate_bits))
        if newcomers:
            state = text_message({"event": "presence_state", "users": self.presence(room.name)}, config)
            for conn in newcomers:
                conn.queue_reply(state.frame_for(conn.deflate_bits))
        dumps = config.codec.dumps
        if room.watchers and (joins or leaves):
            body = (b'{"event":"presence_diff","room":' + dumps(room.name) + b',"joins":'
                    + _metas_json(joins, dumps) + b',"leaves":' + _metas_json(leaves, dumps) + b"}")
            diff_message = OutboundMessage(_TEXT, body, config.compression_min_size, config.compression_level)
            for conn in room.watchers:
                conn.queue(diff_message.frame_for(conn.deflate_bits))
        if room.pending:
            pending, room.pending = room.pending, {}
            state = self.state_json(room)
            for conn, refs in pending.items():
                for ref in refs:
                    self.send_joined(conn, room, ref, state)
                self._become_member(conn, room)
                room.watchers[conn] = None
        if room.empty and self.by_name.get(room.name) is room:
            self._drop(room)

    def state_json(self, room: Room) -> bytes:
        """``{USER: [META, ...]}``: everyone in ``room`` on this instance and the others."""
        users = room.local_metas()
        for user, metas in self._cluster.metas(room.name).items():
            users.setdefault(user, []).extend(metas)
        return _metas_json(users, self._config.codec.dumps)

    def presence(self, name: str) -> list[str]:
        """Users present in room ``name`` on this instance and the others, sorted."""
        room = self.by_name.get(name)
        local = room.users.keys() if room is not None else ()
        remote = self._cluster.users(name)
        if not remote:
            return sorted(local)
        return sorted(remote.keys() | local)

    def local_presence(self) -> dict[str, Any]:
        """This instance's own presence, what its heartbeats tell the others: per room each user's
        metadata, one per connection, or (where nobody has any) a user name per connection."""
        loads = self._config.codec.loads
        out: dict[str, Any] = {}
        for name, room in self.by_name.items():
            present = room.present
            if not present:
                continue
            if all(meta == NO_META for meta in present.values()):  # the short form: a name per connection
                out[name] = sorted(conn.user for conn in present)
            else:
                out[name] = {user: [loads(meta) for meta in metas] for user, metas in room.local_metas().items()}
        return out


# ---------------------------------------------------------------------------
# Cluster: the other instances, as their heartbeats describe them
# ---------------------------------------------------------------------------


class RemoteNode:
    """Another instance: its users per room, each with one metadata per connection (encoded), until
    ``deadline`` passes without a heartbeat."""

    __slots__ = ("deadline", "rooms")

    def __init__(self) -> None:
        self.rooms: dict[str, dict[str, tuple[bytes, ...]]] = {}
        self.deadline = 0.0


Change = tuple[str, frozenset[str], frozenset[str], list[tuple[str, bytes, int]]]
"""(room, users now present cluster-wide that were not, users no longer present anywhere else,
[(user, metadata, +1 came / -1 went)])."""


class Cluster:
    """The other instances of this deployment: their presence (users per room, counted across
    instances, and each connection's metadata), when each one's heartbeats are due, and the newest
    message id delivered from each (a publisher that replays after a broker outage may resend what
    already arrived)."""

    __slots__ = ("_last_id", "_nodes", "_users", "node", "ttl")

    def __init__(self, node: str, ttl: float) -> None:
        self.node = node
        self.ttl = ttl
        self._nodes: dict[str, RemoteNode] = {}
        self._users: dict[str, dict[str, int]] = {}  # room -> user -> instances listing them
        self._last_id: dict[str, str] = {}  # node -> newest message id delivered from it

    @property
    def instances(self) -> int:
        """Instances known, this one included."""
        return len(self._nodes) + 1

    def users(self, room: str) -> Mapping[str, int]:
        """Users of ``room`` on other instances (with how many list them)."""
        return self._users.get(room) or {}

    def metas(self, room: str) -> dict[str, list[bytes]]:
        """Users of ``room`` on other instances, each with one metadata per connection."""
        out: dict[str, list[bytes]] = {}
        if room in self._users:
            for remote in self._nodes.values():
                for user, metas in remote.rooms.get(room, {}).items():
                    out.setdefault(user, []).extend(metas)
        return out

    def coexists(self, node: str) -> bool:
        """``node`` is this instance, or one whose messages reached it: they ran at the same time."""
        return node == self.node or node in self._last_id

    def duplicate(self, node: str, message_id: Any) -> bool:
        """True for a message from ``node`` no newer than the last one delivered from it."""
        if not isinstance(message_id, str):
            return False
        last = self._last_id.get(node)
        if last is not None and message_id <= last:
            return True
        self._last_id[node] = message_id
        return False

    def heartbeat(self, node: str, rooms: Mapping[str, Any], now: float, dumps: Callable[[Any], bytes]) -> list[Change]:
        """``node``'s whole presence now (per room a list of users, or user -> metadata objects); its
        users count until ``now + ttl`` (see ``expire``). ValueError for a malformed one."""
        new: dict[str, dict[str, tuple[bytes, ...]]] = {}
        for room, users in rooms.items():
            if not isinstance(room, str):
                raise ValueError("a room name that is not a string")
            if isinstance(users, list):  # the short form: a user name per connection, none with metadata
                listed: dict[str, tuple[bytes, ...]] = {}
                for user in users:
                    listed[_user_name(user)] = (*listed.get(user, ()), NO_META)
                new[room] = listed
            elif isinstance(users, dict):
                new[room] = {_user_name(user): tuple(compact(dumps(_meta(m))) for m in metas)  # kept until the next
                             for user, metas in users.items()}
            else:
                raise ValueError("a room's presence is neither a list nor an object")
        remote = self._nodes.get(node)
        if remote is None:
            remote = self._nodes[node] = RemoteNode()
        old = remote.rooms
        remote.rooms = new
        remote.deadline = now + self.ttl
        changes = []
        for room in old.keys() | new.keys():
            before, after = old.get(room, {}), new.get(room, {})
            if before != after:
                changes.append(self._count(room, before, after))
        return changes

    def deadline(self, node: str) -> float:
        return self._nodes[node].deadline

    def expire(self, node: str, now: float) -> list[Change]:
        """``node`` leaves if its deadline passed without a heartbeat."""
        remote = self._nodes.get(node)
        if remote is None or remote.deadline > now:
            return []
        return self.goodbye(node)

    def goodbye(self, node: str) -> list[Change]:
        """``node`` is gone (it said so, or its heartbeats stopped): its users leave."""
        remote = self._nodes.pop(node, None)
        self._last_id.pop(node, None)
        if remote is None:
            return []
        return [self._count(room, users, {}) for room, users in remote.rooms.items()]

    def _count(self, room: str, before: Mapping[str, tuple[bytes, ...]],
               after: Mapping[str, tuple[bytes, ...]]) -> Change:
        counts = self._users.setdefault(room, {})
        appeared, vanished, metas = [], [], []
        for user in after.keys() - before.keys():
            n = counts.get(user, 0)
            counts[user] = n + 1
            if n == 0:
                appeared.append(user)
        for user in before.keys() - after.keys():
            n = counts.get(user, 0) - 1
            if n > 0:
                counts[user] = n
            else:
                counts.pop(user, None)
                vanished.append(user)
        for user in before.keys() | after.keys():
            old, new = list(before.get(user, ())), list(after.get(user, ()))
            for meta in new:
                if meta in old:
                    old.remove(meta)
                else:
                    metas.append((user, meta, 1))
            metas += [(user, meta, -1) for meta in old]
        if not counts:
            del self._users[room]
        return room, frozenset(appeared), frozenset(vanished), metas


def _user_name(user: Any) -> str:
    if not isinstance(user, str):
        raise ValueError("a user name that is not a string")
    return user


def _meta(meta: Any) -> Any:
    if not isinstance(meta, dict):
        raise ValueError("a presence metadata that is not an object")
    return meta


# ---------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------


def history_page(room: str, messages: list[Mapping[str, Any]], budget: int) -> dict[str, Any]:
    """A ``history`` event of at most ``budget`` bytes: the newest messages that fit, oldest first,
    with ``"truncated": true`` when older ones had to be left out (the client pages on with
    ``before`` set to the first id). Sixty 60 KB messages must not make a reply no client can take."""
    page: dict[str, Any] = {"event": "history", "room": room, "messages": messages}
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


def http_answer(reply: HttpReply, head: bool) -> bytes:
    """A plain HTTP route's reply as a response (``Cache-Control: no-store`` unless it set its own)."""
    status, body, content_type, *own = reply
    extra = list(own[0]) if own else []
    if not any(name.lower() == "cache-control" for name, _ in extra):
        extra.append(("Cache-Control", "no-store"))
    response = http_response(status, body, content_type, headers=extra)
    return response[: len(response) - len(body)] if head else response


def _reader(conn: Connection) -> RequestReader:
    """The request reader of a connection in its handshake (it has one until it opens or closes)."""
    reader = conn.request
    assert reader is not None, f"{conn!r} has no request reader"
    return reader


class Handshakes:
    """Every connection until it is a WebSocket, and the server API's HTTP exchanges.

    It carries out the ``Gatekeeper``'s decisions (refuse, serve a plain HTTP route, call an
    ``HttpEndpoint``, upgrade), owns each handshake's deadline and each client address's count of
    open sockets, and answers an ``HttpEndpoint``'s request when its backend does (keep-alive: the
    connection's next request then, pipelined ones included).

    The ``Server`` owns it and hands it the connections in ``State.HANDSHAKE``: ``start``,
    ``receive``, ``serve``, ``expire``, ``answer``, ``refuse``, ``forget``. It hands them back
    through the server's ``abort`` and the ``accept`` and ``closed`` callbacks the server gave it.
    A token's life after the handshake is here too, by the same rules: its expiry timers
    (``schedule_expiry``) and the checks of a ``refresh`` (``verify``, ``renew``).
    """

    __slots__ = ("_accept", "_addresses", "_closed", "_deadlines", "_failed", "_gate", "_server", "_timers")

    def __init__(
        self,
        server: Server,
        gate: Gatekeeper,
        timers: Timers,
        accept: Callable[[Connection, Upgrade, bytes], None],
        closed: Callable[[Connection], None],
        failed: Callable[[str, Connection | None, Exception], None],
    ) -> None:
        """``accept`` opens an upgraded connection as a WebSocket, ``closed`` ends one whose answer is
        queued, ``failed`` counts a contained exception (the server's, which logs it)."""
        self._server = server
        self._gate = gate
        self._timers = timers
        self._accept = accept
        self._closed = closed
        self._failed = failed
        self._addresses: dict[Any, int] = {}  # client address -> its sockets still open (handshakes included)
        # Connections still in their handshake, with their deadlines: oldest first, as every one gets the same
        # timeout (a dict, not a timer each: the entry goes as soon as the handshake ends, and costs less)
        self._deadlines: dict[Connection, float] = {}

    def start(self, conn: Connection, now: float) -> None:
        """A new socket: it counts against its address, and its request is due within the handshake timeout."""
        addresses = self._addresses
        addresses[conn.address] = addresses.get(conn.address, 0) + 1
        self._deadlines[conn] = now + self._server.config.handshake_timeout

    def forget(self, conn: Connection) -> None:
        """The connection is about to be CLOSED (called once it is decided, before ``Connection.finish``):
        no deadline any more, and its address has one socket less."""
        if conn.state is not _CLOSED:
            addresses = self._addresses
            left = addresses.get(conn.address, 1) - 1
            if left > 0:
                addresses[conn.address] = left
            else:
                addresses.pop(conn.address, None)
        self._deadlines.pop(conn, None)

    @property
    def next_deadline(self) -> float | None:
        """The oldest handshake's deadline (None: no connection is in its handshake)."""
        return next(iter(self._deadlines.values())) if self._deadlines else None

    def expire(self, now: float) -> None:
        """Drop the handshakes that ran out of time (an ``HttpEndpoint``'s body that never completed: 408)."""
        deadlines = self._deadlines
        while deadlines:
            conn, deadline = next(iter(deadlines.items()))
            if deadline > now:
                break
            exchange = conn.exchange
            if exchange is not None:
                name = exchange.call.endpoint.name
                self.refuse(conn, Refuse(408, "the request body did not arrive in time", json=True, endpoint=name))
            else:
                self._server.abort(conn)  # it never finished its request (or its next one); abort forgets it

    def receive(self, conn: Connection, data: bytes) -> None:
        """Bytes of the connection's request (or requests, or a request body); ``b""``: the peer closed."""
        if not data:
            self._server.abort(conn)
            return
        exchange = conn.exchange
        if exchange is None:
            self.serve(conn, data)
        elif exchange.waiting:  # a pipelined request behind one whose answer is awaited: kept for after it
            if not _reader(conn).buffer_request(data):
                self._server.abort(conn)
        elif self._read_body(conn, data):
            self.serve(conn, b"")

    def serve(self, conn: Connection, data: bytes = b"") -> None:
        """The connection's requests, one after another while each is answered at once and keeps the
        connection alive (pipelined API requests): at most ``frames_per_pass`` of them per pass, like
        frames; the rest waits for ``Server.resume`` (which calls this with no new bytes)."""
        conn.backlogged = False
        budget = self._server.config.frames_per_pass
        reader = _reader(conn)
        while True:
            request = reader.read_request(data)
            data = b""
            if request is None:
                return
            if isinstance(request, Refuse):
                decision: Decision = request
            else:
                decision = self._gate.decide(request, self._addresses.get(conn.address, 0), self._server.open_count)
            if isinstance(decision, CallEndpoint):
                reader.begin_exchange(conn.id, decision)
                if not self._read_body(conn, b""):
                    return
            elif isinstance(decision, Upgrade):
                self._deadlines.pop(conn, None)
                self._accept(conn, decision, reader.trailing)
                return
            elif isinstance(decision, ServeHttp):
                self._serve_http(conn, decision)
                return
            else:
                self.refuse(conn, decision)
                return
            budget -= 1
            if not reader.trailing:
                return
            if budget <= 0:
                conn.backlogged = True
                return

    def answer(self, conn: Connection, status: int, body: bytes) -> None:
        """A backend's answer to the connection's waiting ``HttpEndpoint`` request; then its pipelined
        requests, if it sent some meanwhile."""
        exchange = conn.exchange
        if exchange is not None and exchange.waiting and self._answer_exchange(conn, status, body):
            self.serve(conn, b"")

    def answer_late(self, conn: Connection, exchange: Exchange) -> None:
        """``ANSWER_DUE``: the backend has not answered the request in ``BACKEND_TIMEOUT``: 504."""
        if conn.exchange is exchange:
            self.answer(conn, 504, json_error("timeout", "the backend did not answer in time"))

    def refuse(self, conn: Connection, refusal: Refuse) -> None:
        """Refuse with a real HTTP response, then close: never accept-then-close."""
        if refusal.failure is not None:
            self._failed("verifier", None, refusal.failure)
        status = refusal.status
        metrics = self._server.metrics
        if refusal.json:
            body = json_error(_STATUS_CODES.get(status, "bad_request"), refusal.reason)
            response = http_response(status, body, "application/json", refusal.headers)
            counts = metrics.http
            key = (refusal.endpoint, status)
            counts[key] = counts.get(key, 0) + 1
        else:
            response = http_response(status, (refusal.reason + "\n").encode(), headers=refusal.headers)
        _reader(conn).end_exchange()
        conn.answer(status, response)
        rejections = metrics.rejections
        rejections[status] = rejections.get(status, 0) + 1
        self._closed(conn)

    def verify(self, token: str) -> Refuse | tuple[str, Mapping[str, Any], float | None]:
        """A token's (user, claims, expiry), checked as at the handshake, or its 401."""
        if self._gate.verifier is None:
            return Refuse(401, "tokens are not in use here (no --jwt-secret or --jwt-public-key)")
        checked = self._gate.verify(token)
        if isinstance(checked, Refuse) and checked.failure is not None:
            self._failed("verifier", None, checked.failure)
        return checked

    def renew(self, conn: Connection, claims: Mapping[str, Any], expires: float | None) -> None:
        """``conn`` goes on with a new token's claims: the old token's timers no longer count."""
        conn.claims = claims
        conn.token_number += 1
        conn.expires = None
        if expires is not None:
            self.schedule_expiry(conn, expires)

    def schedule_expiry(self, conn: Connection, expires: float) -> None:
        """The connection's token expires at ``expires``: close 1008 then, and (if its route warns)
        ``token_expiring`` before."""
        conn.expires = expires
        self._timers.schedule(expires, TimerKind.TOKEN_EXPIRY, conn.id, conn.token_number)
        endpoint = conn.endpoint
        if endpoint is not None and endpoint.warns_expiry:
            warn_at = expires - min(30.0, (expires - self._server.now) / 2)
            self._timers.schedule(warn_at, TimerKind.TOKEN_EXPIRING, conn.id, conn.token_number)

    def _read_body(self, conn: Connection, data: bytes) -> bool:
        """Body bytes for the connection's ``HttpEndpoint`` request; once it is whole, the endpoint is
        called. True when it was answered and the connection waits for its next request."""
        body = _reader(conn).read_body(data)
        if body is None:
            return False
        if isinstance(body, Refuse):
            self.refuse(conn, body)
            return False
        exchange = conn.exchange
        assert exchange is not None
        call = exchange.call
        request = HttpRequest(call.method, call.path, call.query, call.headers, body)
        try:
            reply = call.endpoint.handler(conn, request)
        except HttpError as exc:
            return self._answer_exchange(conn, exc.status, json_error(exc.code, exc.detail), exc.headers)
        except Exception as exc:  # the endpoint's bug: 500 for this request, the server goes on
            self._failed("http", conn, exc)
            return self._answer_exchange(conn, 500, json_error("internal", "internal error"))
        if reply is None:  # a backend answers: ack, history_reply or their failures
            exchange.waiting = True
            self._deadlines.pop(conn, None)
            self._timers.schedule(self._server.now + BACKEND_TIMEOUT, TimerKind.ANSWER_DUE, exchange)
            return False
        status, reply_body, content_type, *own = reply
        return self._answer_exchange(conn, status, reply_body, own[0] if own else (), content_type)

    def _answer_exchange(
        self,
        conn: Connection,
        status: int,
        body: bytes,
        headers: Iterable[tuple[str, str]] = (),
        content_type: str = "application/json",
    ) -> bool:
        """Answer the connection's ``HttpEndpoint`` request; True when the connection stays open for the
        next one (keep-alive, and the client is reading its answers)."""
        exchange = conn.exchange
        if exchange is None:
            return False  # answered already (a late backend reply after a 504)
        call = exchange.call
        _reader(conn).end_exchange()
        server = self._server
        keep_alive = call.keep_alive and conn.outbound_size <= server.config.max_buffer
        extra = list(headers)
        if not any(name.lower() == "cache-control" for name, _ in extra):
            extra.append(("Cache-Control", "no-store"))
        conn.answer(status, http_response(status, body, content_type, extra, keep_alive))
        counts = server.metrics.http
        key = (call.endpoint.name, status)
        counts[key] = counts.get(key, 0) + 1
        if not keep_alive:
            self._closed(conn)
            return False
        deadlines = self._deadlines  # the next request has the handshake timeout to arrive
        deadlines.pop(conn, None)
        deadlines[conn] = server.now + server.config.handshake_timeout
        return True

    def _serve_http(self, conn: Connection, serve: ServeHttp) -> None:
        try:
            reply = serve.route(self._server, serve.headers)
            conn.answer(reply[0], http_answer(reply, serve.head))
        except Exception as exc:  # a route's bug: 500 for this request, the server goes on
            self._failed("http", conn, exc)
            self.refuse(conn, Refuse(500, "internal error"))
            return
        self._closed(conn)


def _ack_events(acks: Iterable[Ack]) -> list[dict[str, Any]]:
    """The ``ack`` events of these acks (none for an ack without a ref): ``/ws``'s carry the ``ts``."""
    return [{"event": "ack", "ref": ref, "id": message_id} if ts is None else
            {"event": "ack", "ref": ref, "id": message_id, "ts": ts}
            for _, ref, message_id, ts, _ in acks if ref is not None]


class IdClock:
    """Message ids: unique and time-ordered, milliseconds then a sequence within the millisecond,
    then this instance's node tag (so instances never collide)."""

    __slots__ = ("_ms", "_node", "_prefix", "_seq")

    def __init__(self, node: str) -> None:
        self._node = node
        self._ms = 0
        self._seq = 0
        self._prefix = ""

    def next(self, ms: int) -> str:
        """The id of a message at ``ms`` (Unix time in milliseconds: the caller has it for the ``ts`` too)."""
        if ms > self._ms:
            self._ms, self._seq = ms, 0
            self._prefix = f"{ms:012x}"  # once per millisecond, not per message
            return f"{self._prefix}000000{self._node}"
        seq = self._seq = self._seq + 1
        if seq < 0x1000000:  # six hex digits, zero-padded: hex() with a 1 bit above them, cut off, costs
            return f"{self._prefix}{hex(seq | 0x1000000)[3:]}{self._node}"  # half of a format spec's f"{seq:06x}"
        return f"{self._prefix}{seq:x}{self._node}"


def _for_members(message: Mapping[str, Any]) -> Mapping[str, Any]:
    """A message as its room's members get it: without the publisher's idempotency ``key`` (which the
    store and ``PublishKeys`` keep; no member sees another's key)."""
    return message if "key" not in message else {name: value for name, value in message.items() if name != "key"}


class Messages:
    """A message's way through this instance, and what the backends answer about it.

    It owns the message ids (``IdClock``), the publish keys (``PublishKeys``), the joins with
    ``since`` waiting for the store (``Recoveries``), the publishes waiting for a sequencing
    broker's order, and the pass's effects, the work for the shell's backends, in the order it
    arose. It does ``publish`` (a handler's, through its connection) and takes the backends'
    answers: the broker's ``deliver`` and ``deliver_sequenced`` (``order_through_broker`` says
    whether it orders), the store's ``ack`` and ``unavailable`` for writes, ``history_reply`` and
    ``history_failed`` for reads. The ``Server``
    owns it and forwards the shell's calls; it reaches the server through its public API and the
    ``contain`` and ``settle`` steps the server gave it.
    """

    __slots__ = (
        "_backends",
        "_cluster",
        "_connections",
        "_contain",
        "_effects",
        "_handshakes",
        "_ids",
        "_keys",
        "_ordering",
        "_recoveries",
        "_rooms",
        "_sequencing",
        "_server",
        "_settle",
        "config",
        "metrics",
    )

    def __init__(
        self,
        server: Server,
        rooms: Rooms,
        cluster: Cluster,
        handshakes: Handshakes,
        backends: Mapping[str, bool],
        contain: Callable[[str, Connection | None, Exception], None],
        settle: Callable[[], None],
    ) -> None:
        """``backends``: the server's word on each backend (read only here: a message the store cannot
        keep is refused); ``contain`` ends the connection a contained exception was working for;
        ``settle`` fails the slow consumers an input produced (both the server's)."""
        self._server = server
        self.config = config = server.config
        self.metrics = server.metrics
        self._connections = server.connections  # read only: the server adds and removes them
        self._rooms = rooms
        self._cluster = cluster
        self._handshakes = handshakes
        self._backends = backends
        self._contain = contain
        self._settle = settle
        self._effects: list[Effect] = []
        self._ids = IdClock(config.node)
        self._keys = PublishKeys(config.idempotency_keys)
        self._recoveries = Recoveries(rooms, config)
        self._sequencing = False  # the broker orders publishes (order_through_broker)
        # the publishes it orders, by their id here, until they come back: (room, message, ack)
        self._ordering: dict[str, tuple[str, dict[str, Any], Ack]] = {}

    def emit(self, effect: Effect) -> None:
        """Work for the shell's backends (``Server.effects`` hands it over, in order)."""
        self._effects.append(effect)

    def take_effects(self) -> list[Effect]:
        effects, self._effects = self._effects, []
        return effects

    def deliver(self, room: str, payload: Mapping[str, Any], node: str | None = None) -> int | None:
        """A message from the broker (another instance) for the local members of ``room``.

        Returns how many members it went to, or None when it was dropped as already delivered.
        A ``"key"`` in ``payload`` (the publisher's idempotency key) is remembered and left out of what
        the members get; the shell stores the payload with it (the store keeps it apart from the body,
        in its unique index, so that a repeat stored elsewhere meanwhile is not kept twice).

        With the publishing instance's ``node`` tag, each message is delivered once and in
        order: our own messages coming back are ignored (we delivered them when they were
        sent), and so is any id not newer than the last one delivered from that node.
        """
        if node is not None:
            if node == self.config.node:
                return None
            if self._cluster.duplicate(node, payload.get("id")):
                self.metrics.duplicates += 1
                return None
        if room == CONTROL_ROOM:
            try:
                self._control(payload)
            except Exception as exc:
                self._contain("deliver", None, exc)
            self._settle()
            return None
        key = payload.get("key")  # for PublishKeys and the store's unique index, not for the members
        message_id = payload.get("id")
        try:
            visible = _for_members(payload)
            out = text_message(visible, self.config)
            if isinstance(message_id, str):
                count: int | None = self._rooms.publish(room, message_id, out, ())
                if isinstance(key, str):
                    self._keys.known((room, payload.get("user"), key), message_id, payload.get("ts"))
            else:
                count = self._rooms.broadcast(room, out, ())
            self.metrics.deliveries += count or 0
        except Exception as exc:  # a message we cannot re-encode costs that message, not the stream
            self._contain("deliver", None, exc)
            count = None
        self._settle()
        return count

    def deliver_sequenced(self, room: str, payload: dict[str, Any], node: str, position: str) -> int | None:
        """A message the broker ordered, at its place in the room's order: ``position`` (18 hex digits) makes
        its id (with ``SEQUENCED_TAG``), which replaces the one it had on its instance, so that ids follow
        the order. Another instance's is delivered as ``deliver`` does; one of ours (``node`` is this
        instance) is delivered to the room but its sender, stored, and acked with the new id once stored.

        Returns how many members it went to, or None when it was one of ours no longer awaited (delivered
        here already, during an outage: ``order_through_broker``; or a repeat). ``payload`` is the broker's
        own decoded copy: its ``id`` is replaced in place."""
        message_id = position + SEQUENCED_TAG
        count: int | None = None
        try:
            if node == self.config.node:
                ours = payload.get("id")
                waiting = self._ordering.pop(ours, None) if isinstance(ours, str) else None
                if waiting is None:
                    return None
                _, message, ack = waiting
                if "key" in message:
                    first = self._keys.lookup((room, message.get("user"), message["key"]))
                    if isinstance(first, tuple):  # the same key reached the order first from elsewhere
                        self._keys.superseded(ack.id)
                        self._ack_one_safely(ack._replace(id=first[0], ts=first[1] if ack.ts is not None else None))
                        self._settle()
                        return None
                    self._keys.renamed(ack.id, message_id)
                message["id"] = message_id
                count = self._deliver_own(room, message, ack._replace(id=message_id))
            else:
                payload["id"] = message_id
                key = payload.get("key")
                if isinstance(key, str):
                    # one order everywhere: the first of a key is kept and a repeat dropped alike on every instance
                    keyed = (room, payload.get("user"), key)
                    first = self._keys.lookup(keyed)
                    if isinstance(first, tuple) and first[0] != message_id:
                        self.metrics.duplicates += 1
                        self._settle()
                        return None
                    self._keys.known(keyed, message_id, payload.get("ts"))
                    for waiter in first if isinstance(first, list) else ():  # repeats here waiting for ours, second
                        self._ack_one_safely(waiter._replace(id=message_id, ts=payload.get("ts")))
                visible = _for_members(payload)
                count = self._rooms.publish(room, message_id, text_message(visible, self.config), ())
                self.metrics.deliveries += count
        except Exception as exc:  # a message we cannot re-encode costs that message, not the stream
            self._contain("deliver", None, exc)
            count = None
        self._settle()
        return count

    def _ack_one_safely(self, ack: Ack) -> None:
        conn = self._connections.get(ack.conn_id)
        if conn is not None:
            self._ack_one(conn, ack)

    def _deliver_own(self, room: str, message: dict[str, Any], ack: Ack) -> int:
        """One of our publishes that waited for the broker: to the room but its sender, then to the store."""
        sender = self._connections.get(ack.conn_id)
        visible = _for_members(message)
        count = self._rooms.publish(room, message["id"], text_message(visible, self.config),
                                    (sender,) if sender is not None else (), ack.conn_id)
        self.metrics.deliveries += count
        self._effects.append(_new_tuple(Stored, (room, message, ack)))
        return count

    def order_through_broker(self, on: bool) -> None:
        """The broker started (True) or stopped (False: down past its grace) ordering publishes. Once it
        stops, the publishes still waiting for it are delivered here now, in the order they came, with the
        ids they got here, stored and acked, as every publish is until it orders again; the broker sends
        them on unordered when it is back."""
        self._sequencing = on
        if on or not self._ordering:
            return
        waiting, self._ordering = self._ordering, {}
        for room, message, ack in waiting.values():
            try:
                self._deliver_own(room, message, ack)
            except Exception as exc:
                self._contain("deliver", self._connections.get(ack.conn_id), exc)
        self._settle()

    def ack(self, acks: Iterable[Ack]) -> None:
        """The store committed these messages: tell each sender that is still connected (and the
        repeats of a keyed one that waited for it). A sender's acks in a row go out as one write."""
        connections = self._connections
        keys = self._keys
        run: list[Ack] = []  # the acks in a row of one connection, not sent yet (``_ack_run``)
        for ack in acks:
            if run and run[0].conn_id != ack.conn_id:
                self._ack_run(run)
                run = []
            run.append(ack)
            if keys.waiting:
                waiters = keys.stored(ack.id, ack.ts)
                if waiters:
                    self._ack_run(run)
                    run = []
                for waiter in waiters:
                    conn = connections.get(waiter.conn_id)
                    if conn is not None:
                        self._ack_one(conn, waiter._replace(id=ack.id, ts=ack.ts))
        self._ack_run(run)
        self._settle()

    def _ack_run(self, run: list[Ack]) -> None:
        """Acks in a row for one connection (a pipelining sender's store batch is all its own): a
        WebSocket's are queued as one write, each encoded on its own, so one that cannot be costs that
        connection only what ``_ack_one`` would (those before it are sent, then it is closed 1011)."""
        if not run:
            return
        conn = self._connections.get(run[0].conn_id)
        if conn is None:
            return
        if len(run) == 1 or conn.state is not _OPEN:
            for ack in run:
                self._ack_one(conn, ack)
            return
        try:
            conn.send_many(_ack_events(run))
        except Exception as exc:  # one sender's ack must not cost the rest of the batch theirs
            self._contain("ack", conn, exc)

    def _ack_one(self, conn: Connection, ack: Ack) -> None:
        """One sender's ack (its HTTP answer for an ``HttpEndpoint``'s publish); nothing without a ref."""
        _, ref, message_id, ts, _ = ack
        if ref is None:
            return
        try:
            if conn.state is _HANDSHAKE:  # an HttpEndpoint's publish
                self._handshakes.answer(conn, 200, self.config.codec.dumps({"id": message_id, "ts": ts}))
            else:
                conn.send_many(_ack_events((ack,)))
        except Exception as exc:  # one sender's ack must not cost the rest of the batch theirs
            self._contain("ack", conn, exc)

    def unavailable(self, acks: Iterable[Ack], detail: str) -> None:
        """The store could not keep these messages: each sender gets an ``unavailable`` error (and the
        repeats of a keyed one that waited for it; the key is free again)."""
        acks = list(acks)
        for ack in list(acks):
            acks += [waiter._replace(id=ack.id) for waiter in self._keys.lost(ack.id)]
        for ack in acks:
            conn = self._connections.get(ack.conn_id)
            if conn is not None and conn.state is _HANDSHAKE:
                self._handshakes.answer(conn, 503, json_error("unavailable", detail))
            elif conn is not None:
                error = {"event": "error", "code": "unavailable", "detail": detail, "id": ack.id}
                if ack.ref is not None:
                    error["ref"] = ack.ref
                if ack.room is not None:
                    error["room"] = ack.room
                self._answer_safely(conn, error)
        self._settle()

    def _answer_safely(self, conn: Connection, payload: Mapping[str, Any], where: str = "ack") -> None:
        """One backend answer to one connection: its failure costs that connection, not the batch."""
        try:
            conn.send(payload)
        except Exception as exc:
            self._contain(where, conn, exc)

    def history_reply(self, conn_id: int, room: str, messages: list[Mapping[str, Any]], ref: Any = None) -> None:
        """The store's answer to a ``History`` effect (with the request's ``ref``, if it had one)."""
        if isinstance(ref, Recovery):
            self._recovered(ref, messages)
            return
        conn = self._connections.get(conn_id)
        if conn is not None:
            try:
                page = history_page(room, messages, self.config.max_buffer)
                if conn.state is _HANDSHAKE:  # an HttpEndpoint's request: {"room", "messages"}
                    del page["event"]
                    self._handshakes.answer(conn, 200, self.config.codec.dumps(page))
                    self._settle()
                    return
                if ref is not None:
                    page["ref"] = ref
                conn.reply(page)
            except Exception as exc:
                self._contain("history", conn, exc)
            self._settle()

    def history_failed(self, conn_id: int, detail: str, ref: Any = None, room: str | None = None) -> None:
        """The store could not answer a ``History`` effect."""
        if isinstance(ref, Recovery):
            self._recovered(ref, None)  # the join goes on, recovered false
            return
        conn = self._connections.get(conn_id)
        if conn is not None:
            if conn.state is _HANDSHAKE:
                self._handshakes.answer(conn, 503, json_error("unavailable", detail))
            else:
                conn.error("unavailable", detail, ref=ref, room=room)
            self._settle()

    def publish(
        self, conn: Connection, room: str, message: dict[str, Any], ref: Any, v2: bool = False,
        key: str | None = None,
    ) -> str | None:
        """``Connection.publish``: the broadcast (encoded once, batched for the pass) and the two
        effects that take the message to the broker and the store; with a ``key``, a repeat is only
        acked (``PublishKeys``)."""
        if key is not None:
            keyed = (room, message.get("user"), key)
            seen = self._keys.lookup(keyed)
            if seen is not None:
                ack = Ack(conn.id, ref, "", None, room)
                if isinstance(seen, list):
                    seen.append(ack)  # acked when the original is stored
                    return None
                self._ack_one(conn, ack._replace(id=seen[0], ts=seen[1]))
                return seen[0]
        if not self._backends.get("store", True):
            conn.error("unavailable", "the message store is unreachable: not sent", ref, room if v2 else None)
            return None
        ts = int(self._server.now * 1000)
        message["id"] = message_id = self._ids.next(ts)
        message["ts"] = ts
        config = self.config
        body = config.codec.dumps(message)
        if v2 and len(body) > config.max_message_size:
            raise EventError("bad_field", f"the message would be over {config.max_message_size} bytes", ref, room)
        if self._sequencing:
            return self._publish_ordered(conn, room, message, ref, v2, key)
        out = OutboundMessage(_TEXT, body, config.compression_min_size, config.compression_level)
        count = self._rooms.publish(room, message_id, out, (conn,), conn.id)
        self.metrics.deliveries += count
        effects = self._effects
        # the named tuples' own __new__ is a Python function; tuple.__new__ builds the same values in C
        ack = _new_tuple(Ack, (conn.id, ref, message_id, ts, room) if v2 else (conn.id, ref, message_id, None, None))
        if key is not None:  # the other instances learn it, and the store keeps it apart from the body
            self._keys.storing(keyed, message_id)
            message = {**message, "key": key}
        effects.append(_new_tuple(Publish, (room, message)))
        effects.append(_new_tuple(Stored, (room, message, ack)))
        return message_id

    def _publish_ordered(
        self, conn: Connection, room: str, message: dict[str, Any], ref: Any, v2: bool, key: str | None
    ) -> str:
        """``publish`` while the broker orders: the message goes to the broker only (``PublishOrdered``) and
        waits, under the id it got here, until it comes back in the room's order (``deliver_sequenced``)."""
        message_id, ts = message["id"], message["ts"]
        ack = _new_tuple(Ack, (conn.id, ref, message_id, ts, room) if v2 else (conn.id, ref, message_id, None, None))
        if key is not None:
            self._keys.storing((room, message.get("user"), key), message_id)
            message = {**message, "key": key}
        self._ordering[message_id] = (room, message, ack)
        self._effects.append(_new_tuple(PublishOrdered, (room, message)))
        return message_id

    def enter(self, conn: Connection, room: str, meta: bytes, watch: bool, ref: Any, since: str | None = None) -> None:
        """v2's join (``Rooms.enter``); with ``since``, ``Recoveries.start`` (perhaps a store read first)."""
        if conn.state is not _OPEN:
            raise UsageError(f"cannot join {room!r}: connection {conn.id} is {conn.state.value}")
        if since is None:
            self._rooms.enter(conn, room, meta, watch, ref, self._server.now)
            return
        read = self._recoveries.start(conn, room, meta, watch, ref, since, self._server.now)
        if read is not None:
            self._effects.append(read)

    def remember_keys(self, keys: Iterable[tuple[str, str, str, str, Any]]) -> None:
        """Publish keys the store kept, (room, user, key, id, ts) oldest first: a restarted server knows them."""
        for room, user, key, message_id, ts in keys:
            self._keys.known((room, user, key), message_id, ts)

    def published(self, room: str, user: str, key: str) -> tuple[str, Any] | list[Ack] | None:
        """What ``PublishKeys`` knows of this key: the stored message's (id, ts), or the repeats waiting."""
        return self._keys.lookup((room, user, key))

    def recovering(self, conn: Connection, room: str) -> bool:
        """``conn`` joins ``room`` with ``since`` and waits for the store's answer."""
        return self._recoveries.waiting(conn, room)

    def joining(self, conn: Connection) -> int:
        """How many joins with ``since`` of ``conn`` wait for the store's answer."""
        return self._recoveries.count(conn)

    def _recovered(self, recovery: Recovery, messages: list[Mapping[str, Any]] | None) -> None:
        """The store's answer for a join with ``since`` (None: it failed): the join goes on."""
        conn = self._connections.get(recovery.conn_id)
        try:
            self._recoveries.answered(recovery, messages, conn, self._server.now)
        except Exception as exc:
            self._contain("recover", conn, exc)
        self._settle()

    def leave(self, conn: Connection, room: str) -> bool:
        return self._recoveries.cancel(conn, room) or self._rooms.leave(conn, room, self._server.now)

    def new_id(self) -> str:
        """A unique, time-ordered message id (``IdClock``)."""
        return self._ids.next(int(self._server.now * 1000))

    def disconnect(self, user: str, room: str | None = None, everywhere: bool = True) -> int:
        """Remove ``user``'s connections here, and (``everywhere``) tell the other instances to: with
        ``room``, a ``/ws`` connection leaves it (``left``, reason ``removed``) and a v1 member of it is
        closed; without, every connection of the user is closed with 4001. Returns how many were here."""
        removed = 0
        for conn in list(self._connections.values()):
            if conn.user != user or conn.state is not _OPEN:
                continue
            if room is None:
                self._server.send_close(conn, CLOSE_REMOVED, "disconnected by the server")
            elif not conn.in_room(room):
                continue
            elif conn.endpoint is not None and conn.endpoint.joins:
                self.leave(conn, room)  # a join still waiting for the store is cancelled too
                conn.send({"event": "left", "room": room, "reason": "removed"})
            else:
                self._server.send_close(conn, CLOSE_REMOVED, "removed from the room")
            removed += 1
        if everywhere:
            command = {"event": "disconnect", "user": user, "room": room, "id": self.new_id()}
            self.emit(Publish(CONTROL_ROOM, command))
        return removed

    def _control(self, command: Mapping[str, Any]) -> None:
        """A command from another instance, on ``CONTROL_ROOM``."""
        user, room = command.get("user"), command.get("room")
        if command.get("event") == "disconnect" and isinstance(user, str) and (room is None or isinstance(room, str)):
            self.disconnect(user, room, everywhere=False)



def healthz(server: Server, headers: Mapping[bytes, bytes]) -> HttpReply:
    """``GET /healthz``: counts only (never content), 503 while a backend is down."""
    stats = server.stats()
    status = 200 if stats["status"] == "ok" else 503
    return status, (_encode_json(stats) + "\n").encode(), "application/json"


class Server:
    """All connections and rooms of one hubbub instance: the shell's API, frame dispatch, the
    timers and the close lifecycle; the rest belongs to the parts it ties together
    (``Handshakes``, ``Messages``, ``Timers``, ``Connection``, ``Rooms``, ``Cluster``).

    The shell calls: ``connect``, ``receive``, ``resume``, ``tick``, ``pending``, ``take_shared``,
    ``enqueue``, ``effects``, ``close_all``; the backends' answers ``ack``, ``unavailable``,
    ``history_reply``, ``history_failed``, ``deliver``, ``deliver_sequenced``,
    ``order_through_broker``, ``remember_keys`` (each handed to ``Messages``), ``remote_presence``,
    ``local_presence``, ``set_available``. Metrics read
    ``metrics``, ``stats()`` and ``available()``. Handlers reach the server only through their
    ``Connection`` (which reaches ``messages`` and ``handshakes`` for them).

    Closing, after websockets: ``send_close`` starts the closing handshake (our close frame, then
    the peer's, or ``close_timeout``); ``fail`` sends a close frame and is done at once (a protocol
    violation, a slow consumer, an internal error); ``abort`` drops the socket without a word (it is
    gone, or never finished its handshake). Each leaves the connection's rooms and runs the route's
    ``on_close`` once.
    """

    def __init__(
        self,
        router: Router,
        config: Config | None = None,
        http_routes: Mapping[str, HttpRoute] | None = None,
        verifier: Verifier | None = None,
        fast_path: bool = True,
        unmask: Callable[[bytes, bytes], bytes] | None = None,
    ) -> None:
        """``verifier`` turns on token authentication: every WebSocket handshake must carry a token
        (``?token=`` or ``Authorization: Bearer``) it accepts, and its ``sub`` claim is the user.
        ``fast_path`` False reads every frame through wsproto (the receive fast path's reference).
        ``unmask(payload, key)`` XORs a client frame's payload with its 4-byte mask key on the fast path
        (None: the core's own integer XOR; the shell passes websockets' C ``apply_mask``, which does it
        in a quarter of the instructions, ``hubbub.server.UNMASK``)."""
        self.fast_path = fast_path
        self.unmask = unmask or _unmask
        self.router = router
        self.config = config = config or Config()
        self.connections: dict[int, Connection] = {}
        self.open_count = 0
        self.metrics = Metrics()
        gate = Gatekeeper(router, config, {"/healthz": healthz, **(http_routes or {})}, verifier)
        self._timers = timers = Timers()
        self.handshakes = Handshakes(self, gate, timers, self._accept, self._closed, self._count_failure)
        """The HTTP side, and the tokens' checks after it (``Connection`` reaches it for ``refresh``)."""
        self._cluster = Cluster(config.node, config.presence_ttl)
        self._rooms = Rooms(config, self._timers, self._cluster, self._presence_changed)
        self._outbox = Outbox()
        self._presence_dirty = False
        self._backends: dict[str, bool] = {}  # "store"/"broker" -> reachable, as the shell last saw it
        self.messages = Messages(
            self, self._rooms, self._cluster, self.handshakes, self._backends, self._contain, self._settle
        )
        """Publishing, the broker's deliveries and the store's answers (``Connection`` reaches it)."""
        self._next_id = 1
        self.now = 0.0
        """The time of the input being handled, as the shell passed it (Unix seconds); only the server sets it."""

    # -- the shell's API --------------------------------------------------------

    def connect(self, peer: Any, now: float) -> Connection:
        """A new TCP connection: it must send its HTTP request within the handshake timeout."""
        self.now = now
        conn = Connection(self, self._outbox, self._next_id, peer, now)
        self._next_id += 1
        self.connections[conn.id] = conn
        self.handshakes.start(conn, now)
        return conn

    def receive(self, conn: Connection, data: bytes, now: float) -> None:
        """Feed bytes from the peer (``b""`` when it closed its side). Never raises for peer input."""
        self.now = now
        self.metrics.bytes_in += len(data)
        state = conn.state
        try:
            if state is _OPEN or state is _CLOSING:
                self._receive_frames(conn, data)
            elif state is _HANDSHAKE:
                self.handshakes.receive(conn, data)
        except Exception as exc:  # our bug, triggered by this peer's input: it costs this connection only
            self._contain("receive", conn, exc)
        self._settle()

    def resume(self, conn: Connection, now: float) -> None:
        """Handle the next budget of a backlogged connection's buffered input.

        After ``receive`` leaves a connection ``backlogged`` (it had more frames than
        ``Config.frames_per_pass``), the shell stops reading its socket and calls this in a
        later loop pass, after the other connections had their turn; it reads the socket
        again once the connection is no longer ``backlogged``."""
        self.now = now
        try:
            if conn.backlogged:
                if conn.state is _HANDSHAKE:
                    self.handshakes.serve(conn)
                else:
                    self._process_frames(conn, self.config.frames_per_pass)
        except Exception as exc:
            self._contain("receive", conn, exc)
        self._settle()

    def tick(self, now: float) -> float | None:
        """Run every timer that is due, and drop the handshakes that ran out of time; return when the
        next deadline is (None: none)."""
        self.now = now
        self.handshakes.expire(now)
        timers = self._timers
        while (due := timers.pop_due(now)) is not None:
            kind, target, seq = due
            try:
                self._fire(kind, target, seq, now)
            except Exception as exc:  # one timer's failure must not cost the others
                self._contain("timer", self.connections.get(target) if isinstance(target, int) else None, exc)
        self._settle()
        return self.next_deadline

    def pending(self) -> list[Connection]:
        """Connections that gained output or closed since the last call.

        Room broadcasts not taken with ``take_shared`` are queued to each member first,
        so a shell that only calls ``pending`` and ``data_to_send`` sees everything."""
        for data, members in self._rooms.take_batches():
            for member in members:
                member.append(data)
        self._settle()
        pending = self._outbox.pending
        if not pending:
            return []
        conns = list(pending)
        pending.clear()
        return conns

    def take_shared(self) -> list[tuple[bytes, list[Connection]]]:
        """This pass's room broadcasts: (bytes, the connections that take exactly those bytes).

        The fast write path: one bytes object per room and compression group, written as it
        is to each listed connection's socket. Call it before ``pending``: output a connection
        gained before its room's first broadcast of the pass is in ``pending`` and must be
        written first; anything later was queued in order there and the connection is not
        listed here. A connection whose socket cannot take the bytes now gets them through
        ``enqueue``."""
        shared = self._rooms.take_batches()
        for data, members in shared:
            self.metrics.bytes_out += len(data) * len(members)
        return shared

    def enqueue(self, conn: Connection, data: bytes) -> None:
        """Queue shared bytes the shell could not write now (its socket is full), behind the
        connection's own output; they count against ``max_buffer`` (``pending`` closes it with 1013)."""
        if conn.state is _OPEN:
            conn.append(data)

    def effects(self) -> list[Effect]:
        """Work for the shell's backends since the last call (store, history, broker, logs)."""
        return self.messages.take_effects()

    def close_all(self, code: int = CloseReason.GOING_AWAY, reason: str = "server shutting down") -> None:
        """Queue a close for every client (1001 on shutdown) and drop unfinished handshakes."""
        for conn in list(self.connections.values()):
            if conn.state is _OPEN:
                self.send_close(conn, code, reason)
            elif conn.state is _HANDSHAKE:
                self.abort(conn)
        self._settle()

    @property
    def next_deadline(self) -> float | None:
        """When ``tick`` next has work to do (None: no timer is set)."""
        deadline = self._timers.next_deadline
        first = self.handshakes.next_deadline
        if first is not None and (deadline is None or first < deadline):
            return first
        return deadline

    @property
    def rooms(self) -> Mapping[str, Room]:
        """The rooms with members (or a presence window still open), by name."""
        return self._rooms.by_name

    # -- what the backends answer ---------------------------------------------------

    def deliver(self, room: str, payload: Mapping[str, Any], node: str | None = None) -> int | None:
        """A message from the broker for the local members of ``room`` (``Messages.deliver``)."""
        return self.messages.deliver(room, payload, node)

    def deliver_sequenced(self, room: str, payload: dict[str, Any], node: str, position: str) -> int | None:
        """A message the broker ordered, at ``position`` in the room's order (``Messages.deliver_sequenced``)."""
        return self.messages.deliver_sequenced(room, payload, node, position)

    def order_through_broker(self, on: bool) -> None:
        """The broker started or stopped ordering publishes (``Messages.order_through_broker``)."""
        self.messages.order_through_broker(on)

    def ack(self, acks: Iterable[Ack]) -> None:
        """The store committed these messages (``Messages.ack``)."""
        self.messages.ack(acks)

    def unavailable(self, acks: Iterable[Ack], detail: str) -> None:
        """The store could not keep these messages (``Messages.unavailable``)."""
        self.messages.unavailable(acks, detail)

    def history_reply(self, conn_id: int, room: str, messages: list[Mapping[str, Any]], ref: Any = None) -> None:
        """The store's answer to a ``History`` effect (``Messages.history_reply``)."""
        self.messages.history_reply(conn_id, room, messages, ref)

    def history_failed(self, conn_id: int, detail: str, ref: Any = None, room: str | None = None) -> None:
        """The store could not answer a ``History`` effect (``Messages.history_failed``)."""
        self.messages.history_failed(conn_id, detail, ref, room)

    def remember_keys(self, keys: Iterable[tuple[str, str, str, str, Any]]) -> None:
        """Publish keys the store kept, oldest first (``Messages.remember_keys``)."""
        self.messages.remember_keys(keys)

    def set_available(self, backend: str, up: bool) -> None:
        """The shell's latest word on a backend ("store", "broker"); /healthz answers 503 while one is down."""
        self._backends[backend] = up

    def available(self, backend: str) -> bool:
        """False only after the shell said ``backend`` is down (handlers refuse to write then)."""
        return self._backends.get(backend, True)

    def local_presence(self) -> dict[str, list[str]]:
        """This instance's own users per presence room: what its heartbeats tell the others."""
        return self._rooms.local_presence()

    def remote_presence(self, node: str, rooms: Mapping[str, Iterable[str]] | None, now: float) -> None:
        """Another instance's heartbeat: its users per presence room (None: it said goodbye).

        Its users count as present until ``presence_ttl`` passes without another heartbeat.
        """
        if node == self.config.node:
            return
        self.now = now
        try:
            self._rooms.heartbeat(node, rooms, now)
        except Exception as exc:  # a malformed heartbeat costs that heartbeat
            self._contain("presence", None, exc)
        self._settle()

    def stats(self) -> dict[str, Any]:
        """Counts only, never content: what /healthz reports."""
        by_route: dict[str, int] = {}
        for conn in self.connections.values():
            if conn.state is _OPEN and conn.endpoint is not None:
                by_route[conn.endpoint.name] = by_route.get(conn.endpoint.name, 0) + 1
        rooms = self._rooms.by_name
        down = sorted(name for name, up in self._backends.items() if not up)
        return {
            "status": "unavailable" if down else "ok",
            "backends": {name: "up" if up else "down" for name, up in sorted(self._backends.items())},
            "instances": self._cluster.instances,
            "connections": self.open_count,
            "sockets": len(self.connections),
            "rooms": len(rooms),
            "presence_users": len(set().union(*(r.users for r in rooms.values()))),  # distinct, anywhere here
            "recovery_ring_bytes": self._rooms.ring_bytes,
            "routes": by_route,
        }

    # -- what handlers reach through their connection ----------------------------------

    def join(self, conn: Connection, room: str, presence: bool) -> Room:
        if conn.state is not _OPEN:
            raise UsageError(f"cannot join {room!r}: connection {conn.id} is {conn.state.value}")
        return self._rooms.join(conn, room, presence, self.now)

    def broadcast(self, room: str, payload: Mapping[str, Any], exclude: Connection | None = None) -> int:
        """Send one JSON event to every member of ``room`` but ``exclude``; returns the recipients.

        The event is serialised once (and compressed once per window size) and added to the
        room's batch for this pass; see ``Room`` and ``take_shared``. Nothing here is per recipient
        but the members detached for this pass.
        """
        count = self._rooms.broadcast(room, text_message(payload, self.config), (exclude,) if exclude else ())
        self.metrics.deliveries += count
        return count

    def emit(self, effect: Effect) -> None:
        self.messages.emit(effect)

    def joining(self, conn: Connection) -> int:
        """How many joins with ``since`` of ``conn`` wait for the store's answer."""
        return self.messages.joining(conn)

    def disconnect(self, user: str, room: str | None = None, everywhere: bool = True) -> int:
        """Remove ``user``'s connections here and (``everywhere``) on the other instances (``Messages.disconnect``)."""
        return self.messages.disconnect(user, room, everywhere)

    def presence(self, room: str) -> list[str]:
        """Users present in a room on this instance and the others, sorted."""
        return self._rooms.presence(room)

    def update_meta(self, conn: Connection, room: str, meta: bytes) -> bool:
        return self._rooms.update(conn, room, meta, self.now)

    def presence_json(self, room: str) -> bytes:
        """``{USER: [META, ...]}`` of ``room`` on every instance, as encoded JSON."""
        target = self._rooms.by_name.get(room)
        if target is None:
            return _metas_json(self._cluster.metas(room), self.config.codec.dumps)
        return self._rooms.state_json(target)

    def _presence_changed(self) -> None:
        """This instance's presence changed: the shell hears of it (``PresenceChanged``) once per
        presence window at most, however many joins and leaves it held (a heartbeat holds every
        room's presence, so a storm of joins must not make one each)."""
        if not self._presence_dirty:
            self._presence_dirty = True
            self._timers.schedule(self.now + self.config.presence_window, TimerKind.ANNOUNCE, None)

    # -- the WebSocket opens ----

    def _accept(self, conn: Connection, upgrade: Upgrade, trailing: bytes) -> None:
        cfg = self.config
        conn.open(upgrade)
        self.open_count += 1
        if upgrade.expires is not None:
            self.handshakes.schedule_expiry(conn, upgrade.expires)
        if cfg.ping_interval > 0:
            self._timers.schedule(self.now + cfg.ping_interval, TimerKind.PING, conn.id)
        endpoint = upgrade.endpoint
        if endpoint.on_open is not None:
            self._call(conn, endpoint.on_open, conn)
        if trailing and conn.state is _OPEN:
            self._receive_frames(conn, trailing)

    # -- frames ----------------------------------------------------------------------

    def _receive_frames(self, conn: Connection, data: bytes) -> None:
        if not data:
            if conn.backlogged:  # what the peer sent before it closed still counts
                self._process_frames(conn, None)
            if conn.state is not _CLOSED:
                self.abort(conn)
            return
        conn.feed(data)
        self._process_frames(conn, self.config.frames_per_pass)

    def _process_frames(self, conn: Connection, budget: int | None) -> None:
        """Handle what the connection has buffered, at most ``budget`` frames of it (None: all)."""
        for item in conn.read_frames(budget):
            if type(item) is CloseConnection:  # not isinstance: wsproto's events are ABCs, slow to test
                self._on_close_frame(conn, item)
            elif conn.state is _OPEN:
                self._on_message(conn, item)

    def _on_close_frame(self, conn: Connection, event: CloseConnection) -> None:
        state = conn.ws_state
        if state is WSState.REMOTE_CLOSING:  # the peer starts the closing handshake: answer it
            conn.send_frame(CloseConnection(event.code))
            was_open = conn.state is _OPEN
            self._closed(conn)
            if was_open:
                self._end(conn, event.code, event.reason)
        elif state is WSState.CLOSED:  # the peer answered our close
            self._closed(conn)
        elif conn.state is _OPEN:  # wsproto found a protocol violation (1002, 1007, 1009): fail it
            reason = event.reason
            if event.code == CloseReason.INVALID_FRAME_PAYLOAD_DATA:
                # the decoder's words name the bad byte's position in the piece it was reading, which is
                # where the reads happened to cut the stream: the same stream must get the same close
                reason = "invalid UTF-8 in a text message"
            self.fail(conn, event.code, reason)
        else:  # a violation while we wait for the peer's close: its parser has stopped, so fail it now
            self._closed(conn)

    def _on_message(self, conn: Connection, message: str | bytes) -> None:
        endpoint = conn.endpoint
        assert endpoint is not None
        counts = self.metrics.messages_in
        counts[endpoint.name] = counts.get(endpoint.name, 0) + 1
        if endpoint.on_raw is not None:
            self._call(conn, endpoint.on_raw, conn, message)
            return
        routed = route_event(endpoint, message, self.config.codec.loads)  # type: ignore[arg-type]
        if type(routed) is tuple:
            try:
                routed[0](conn, routed[1])
            except EventError as exc:
                conn.error(exc.code, exc.detail, exc.ref, exc.room)
            except Exception as exc:  # a handler's bug must not take the server down with it
                self._contain("handler", conn, exc)
        else:
            conn.error(routed.code, routed.detail, routed.ref, routed.room)  # type: ignore[union-attr]

    def _call(self, conn: Connection, fn: Callable[..., None], *args: Any) -> None:
        """Run application code: EventError answers the client; anything else closes 1011."""
        try:
            fn(*args)
        except EventError as exc:
            conn.error(exc.code, exc.detail, exc.ref, exc.room)
        except Exception as exc:  # a handler's bug must not take the server down with it
            self._contain("handler", conn, exc)

    def _count_failure(self, where: str, conn: Connection | None, exc: Exception) -> None:
        failures = self.metrics.failures
        failures[where] = failures.get(where, 0) + 1
        self.messages.emit(Failure(conn.id if conn is not None else None, exc, where))

    def _contain(self, where: str, conn: Connection | None, exc: Exception) -> None:
        """An exception escaped one step (``where``): count it, hand it to the shell's log as a
        ``Failure``, and end the connection it was working for (if any): 1011, or 500 during the
        handshake. Nothing else of the pass is lost: the caller goes on with its next item."""
        self._count_failure(where, conn, exc)
        if conn is None:
            return
        if conn.state is _OPEN:
            self.fail(conn, CloseReason.INTERNAL_ERROR, "internal error")
        elif conn.state is _HANDSHAKE:
            self.handshakes.refuse(conn, Refuse(500, "internal error"))
        elif conn.state is _CLOSING:
            self._closed(conn)

    # -- closing -----------------------------------------------------------------------

    def send_close(self, conn: Connection, code: int, reason: str = "") -> None:
        """Start the closing handshake: our close frame now, the socket once the peer answers
        (or ``close_timeout`` passes)."""
        if conn.state is not _OPEN:
            return
        if conn.ws_open:
            conn.send_frame(CloseConnection(code, reason))
        conn.state = _CLOSING
        self._timers.schedule(self.now + self.config.close_timeout, TimerKind.CLOSE, conn.id)
        self._end(conn, code, reason)

    def fail(self, conn: Connection, code: int, reason: str = "") -> None:
        """Send a close frame and be done with the connection at once (the shell writes what is
        queued, then closes the socket): a protocol violation, a slow consumer, a timeout."""
        if conn.state is not _OPEN:
            return
        if conn.ws_open:
            conn.send_frame(CloseConnection(code, reason))
        self._closed(conn)
        self._end(conn, code, reason)

    def abort(self, conn: Connection, code: int = CloseReason.ABNORMAL_CLOSURE) -> None:
        """Drop the connection without a word: its socket is gone, or it never finished its handshake."""
        was_open = conn.state is _OPEN
        if conn.state is not _CLOSED:
            conn.drop_output()
            self._closed(conn)
        if was_open:
            self._end(conn, code, "")

    def _end(self, conn: Connection, code: int, reason: str) -> None:
        """The connection has left OPEN (it is CLOSING or CLOSED already): it leaves its rooms and
        its route's ``on_close`` runs, once."""
        conn.close_code, conn.close_reason = code, reason
        self.open_count -= 1
        self._rooms.leave_all(conn, self.now)
        endpoint = conn.endpoint
        if endpoint is not None and endpoint.on_close is not None:
            self._call(conn, endpoint.on_close, conn)

    def _closed(self, conn: Connection) -> None:
        """The connection is CLOSED: its protocol is over, its socket is the shell's to close."""
        self.handshakes.forget(conn)
        conn.finish()
        self.connections.pop(conn.id, None)

    def _settle(self) -> None:
        """After each input: fail the slow consumers it produced."""
        slow_list = self._outbox.slow
        while slow_list:
            slow = list(slow_list)
            slow_list.clear()
            for conn in slow:
                if conn.over_limit():
                    # It is not reading: drop what it has not taken (its rooms' batches of this
                    # pass included) and fail it with 1013.
                    self._rooms.exclude(conn)
                    conn.drop_output()
                    self.metrics.slow_consumers += 1
                    self.fail(conn, CloseReason.TRY_AGAIN_LATER, "slow consumer: outbound buffer full")

    # -- timers ------------------------------------------------------------------------

    def _fire(self, kind: TimerKind, target: Any, seq: int, now: float) -> None:
        if kind is TimerKind.PRESENCE:
            self._rooms.end_window(target)
            return
        if kind is TimerKind.NODE_EXPIRY:
            self._rooms.expire_node(target, now)
            return
        if kind is TimerKind.ANNOUNCE:
            self._presence_dirty = False
            self.messages.emit(PresenceChanged())
            return
        if kind is TimerKind.ANSWER_DUE:
            conn = self.connections.get(target.conn_id)
            if conn is not None:
                self.handshakes.answer_late(conn, target)
            return
        conn = self.connections.get(target)
        if conn is None:
            return  # closed since: nothing to do
        if kind is TimerKind.CLOSE:
            if conn.state is _CLOSING:
                self._closed(conn)
        elif kind is TimerKind.PING:
            if conn.state is _OPEN and conn.ws_open:
                cfg = self.config
                number = conn.ping()
                self._timers.schedule(now + cfg.ping_timeout, TimerKind.PONG_DUE, conn.id, number)
                self._timers.schedule(now + max(cfg.ping_interval, cfg.ping_timeout), TimerKind.PING, conn.id)
        elif kind is TimerKind.PONG_DUE:
            if conn.state is _OPEN and conn.pong_late(seq):
                self.fail(conn, CloseReason.INTERNAL_ERROR, "keepalive ping timeout")
        elif kind is TimerKind.TOKEN_EXPIRY:
            if conn.state is _OPEN and seq == conn.token_number:
                self.send_close(conn, CloseReason.POLICY_VIOLATION, "token expired")
        elif kind is TimerKind.TOKEN_EXPIRING:
            if conn.state is _OPEN and seq == conn.token_number and conn.expires is not None:
                conn.send({"event": "token_expiring", "in": max(0, round(conn.expires - now))})
