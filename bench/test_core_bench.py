"""Micro-benchmarks of hubbub's sans-io core, driven with bytes exactly as a shell drives it.

No sockets and no event loop: what is measured is the core's own CPU per operation, the part
of a server's cost that the shell (anyio, asyncio, uvloop) cannot make up for. Each benchmark
covers one path a production server runs all the time:

- **handshake**: one browser-like upgrade request in, the 101 out (with and without a
  permessage-deflate offer), including the join of ``/chat`` that accepting it implies;
- **json codec**: ``json.loads`` of an inbound event and the core's ``_encode_json`` of an
  outbound one (a chat message, and the ``presence_state`` a newcomer gets at 10,000 users);
- **fan-out, one message**: one masked chat frame from wsproto's client, routed by
  ``Server.receive`` and handed to 10 / 1,000 / 10,000 recipients of one room by the shell's
  part of the pass as ``server.py`` runs it (``take_shared``: one bytes object for the room,
  then one hand-over per recipient), to plain and to permessage-deflate recipients (compressed
  once for all of them); ``extra_info`` carries ``per_recipient_ns``, the figure that compares
  across sizes;
- **fan-out, pipelined burst**: 64 messages in one read to 1,000 recipients, then one pass:
  what a sender pipelining at full speed produces (``per_delivery_ns``);
- **receive path, room of 3**: 64-byte chat messages from one member of a room of 3 (two
  recipients), 64 complete frames in one ``receive`` call and one frame per call, each call
  followed by its pass: the cost per inbound message where fan-out is no excuse, which decides
  in small rooms (the race's ``small`` workloads); ``extra_info`` carries ``per_frame_ns``;
- **presence**: one user joining or leaving ``/presence`` while 10,000 are present, through
  the ``presence_diff`` flush that ``tick`` runs when the window closes (``per_member_ns``).

Each benchmark also asserts what it measured (the bytes every recipient got, decoded by a
wsproto client; the deliveries the core counted), so ``pytest bench/ --benchmark-disable``,
which runs each body once, is a test. Rooms of 10,000 are built once per module, and every
round leaves them as it found them: effects drained, outbound buffers emptied.
"""

from __future__ import annotations

import gc
import itertools
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import pytest
from pytest_benchmark.fixture import BenchmarkFixture
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Event, Message, Request, TextMessage
from wsproto.extensions import PerMessageDeflate

from hubbub import core
from hubbub.handlers import build_router
from tests.hub import upgrade_request

Outbox = dict[core.Connection, bytes]
"""What the shell wrote in one pass: the bytes each connection got, its own output then its rooms' batches."""

NOW = 1_700_000_000.0
_peers = itertools.count(1)
HOST = "localhost:8765"
CHAT_ROOM = "bench"
# Room sizes over the default 10,000 connections; no keepalive pings, which would otherwise fire
# for every member of a room in the middle of a measurement once the clock passes 20 s.
CONFIG = core.Config(max_connections=100_000, ping_interval=0)
# A chat line long enough (with the message's other fields) to pass compression_min_size.
TEXT = (
    "Deploy is green in all three regions and p99 latency is back under 20 ms. I am moving the canary "
    "to 50 percent now and will watch the error budget for an hour before going to 100. Shout if you see "
    "anything odd."
)
BROWSER_HEADERS = [
    (b"Origin", b"http://" + HOST.encode()),
    (b"User-Agent", b"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0"),
    (b"Accept-Encoding", b"gzip, deflate, br"),
    (b"Accept-Language", b"en-GB,en;q=0.9"),
    (b"Cache-Control", b"no-cache"),
    (b"Pragma", b"no-cache"),
]


class Client:
    """A wsproto client: its upgrade request, the frames it masks, and the server's bytes it decodes.

    Every recipient of a room gets the same bytes, so one client decodes them in any member's place.
    """

    def __init__(self, target: str, deflate: bool = False, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.ws = WSConnection(ConnectionType.CLIENT)
        extensions = [PerMessageDeflate()] if deflate else []
        self.request = self.ws.send(
            Request(host=HOST, target=target, extensions=extensions, extra_headers=headers or [])
        )

    def accept(self, response: bytes) -> tuple[AcceptConnection, list[Any]]:
        """Take the server's answer to ``request``, a 101, and the JSON events that came with it."""
        self.ws.receive_data(response)
        events = self.ws.events()
        accepted = next(events)
        assert isinstance(accepted, AcceptConnection), accepted
        return accepted, self._decode(events)

    def open(self, server: core.Server, now: float) -> core.Connection:
        """Connect through the core's handshake; the 101 (and what came with it, such as a
        ``presence_state``) is taken here, and the connection stays pending."""
        conn = server.connect(peer(), now)
        server.receive(conn, self.request, now)
        self.accept(conn.data_to_send())
        return conn

    def frame(self, event: dict[str, Any]) -> bytes:
        """One JSON event as the masked text frame a browser would send."""
        return self.ws.send(Message(data=json.dumps(event, separators=(",", ":"))))

    def events(self, data: bytes) -> list[Any]:
        """The JSON events in a server's bytes (unmasked frames, inflated if deflate was negotiated)."""
        self.ws.receive_data(data)
        return self._decode(self.ws.events())

    @staticmethod
    def _decode(events: Iterator[Event]) -> list[Any]:
        decoded: list[Any] = []
        parts: list[str] = []
        for event in events:
            assert isinstance(event, TextMessage), event
            parts.append(event.data)
            if event.message_finished:
                decoded.append(json.loads("".join(parts)))
                parts.clear()
        return decoded


def peer() -> tuple[str, int]:
    """A client address of its own for each connection, as members of a real room have: a room of 10,000 from
    one address would meet the core's per-address connection limit (127.0.0.0/8, so no address is anyone's)."""
    i = next(_peers)
    return f"127.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 40000


def connect(server: core.Server, request: bytes, now: float) -> core.Connection:
    """One member through the core's handshake; its 101 stays queued for the next pass."""
    conn = server.connect(peer(), now)
    server.receive(conn, request, now)
    assert conn.status == 101, conn.data_to_send()
    return conn


@contextmanager
def gc_paused() -> Iterator[None]:
    """For building rooms: 10,000 connections are hundreds of thousands of new objects and no garbage,
    which the cyclic collector would only walk again and again (a quarter of the build's time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def shell_pass(server: core.Server) -> Outbox:
    """The shell's part of a pass, as ``server.py`` runs it, with a dict in place of the sockets: take
    the effects (a real shell stores and publishes them), take the rooms' shared batches, write what
    every pending connection gained of its own, then each shared batch to each of its members."""
    server.effects()
    shared = server.take_shared()
    out = {conn: conn.data_to_send() for conn in server.pending()}
    for data, members in shared:
        for conn in members:
            out[conn] = out[conn] + data if conn in out else data
    return out


def report_per(benchmark: BenchmarkFixture, unit: str, count: int) -> None:
    """Record the mean cost per recipient (delivery, member) in extra_info: the figure that compares."""
    benchmark.extra_info[f"{unit}_count"] = count
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info[f"per_{unit}_ns"] = round(benchmark.stats.stats.mean * 1e9 / count, 1)


# ---------------------------------------------------------------------------
# Handshake
# ---------------------------------------------------------------------------


class Handshakes:
    """One connection at a time on a production-default server: each round opens one, and the
    setup of the next closes it and runs its timers out, so rounds never accumulate."""

    def __init__(self, request: bytes) -> None:
        config = core.Config()
        self.server = core.Server(build_router(config), config)
        self.request = request
        self.now = NOW
        self.conn: core.Connection | None = None

    def setup(self) -> None:
        if self.conn is not None:
            self.server.receive(self.conn, b"", self.now)
        self.now += 60.0  # past the closed connection's handshake and ping timers
        self.server.tick(self.now)
        shell_pass(self.server)

    def handshake(self) -> Outbox:
        self.conn = self.server.connect(peer(), self.now)
        self.server.receive(self.conn, self.request, self.now)
        return shell_pass(self.server)


@pytest.mark.benchmark(group="handshake")
@pytest.mark.parametrize("deflate", [False, True], ids=["plain", "permessage-deflate"])
def test_handshake(benchmark: BenchmarkFixture, deflate: bool) -> None:
    client = Client("/chat?user=alice", deflate=deflate, headers=BROWSER_HEADERS)
    handshakes = Handshakes(client.request)
    out = benchmark.pedantic(handshakes.handshake, setup=handshakes.setup, rounds=2000, warmup_rounds=100)
    assert handshakes.conn is not None and out.keys() == {handshakes.conn}
    accepted, events = client.accept(out[handshakes.conn])
    assert [type(e) for e in accepted.extensions] == ([PerMessageDeflate] if deflate else [])
    assert events == []


# ---------------------------------------------------------------------------
# JSON codec
# ---------------------------------------------------------------------------

INBOUND = {"event": "message", "text": TEXT, "ref": 1}
OUTBOUND = {
    "chat-message": {
        "event": "message",
        "room": CHAT_ROOM,
        "user": "alice",
        "text": TEXT,
        "id": "018bcfe5680000000000",
        "ts": 1_700_000_000_000,
    },
    "presence-state-10000-users": {"event": "presence_state", "users": [f"u{i:05d}" for i in range(10_000)]},
}


@pytest.mark.benchmark(group="json codec")
def test_json_decode_inbound_chat_message(benchmark: BenchmarkFixture) -> None:
    text = json.dumps(INBOUND, separators=(",", ":"))  # a text frame's payload, as wsproto hands it over
    assert benchmark(json.loads, text) == INBOUND


@pytest.mark.benchmark(group="json codec")
@pytest.mark.parametrize("name", list(OUTBOUND))
def test_json_encode_outbound(benchmark: BenchmarkFixture, name: str) -> None:
    payload = OUTBOUND[name]
    assert json.loads(benchmark(core._encode_json, payload)) == payload


# ---------------------------------------------------------------------------
# Fan-out
# ---------------------------------------------------------------------------


class ChatRoom:
    """``/chat/bench``: alice sends; ``recipients`` members receive, the first through a wsproto
    client (the probe) whose request the others repeat byte for byte."""

    def __init__(self, recipients: int, deflate: bool) -> None:
        self.server = server = core.Server(build_router(CONFIG), CONFIG)
        self.deflate = deflate
        self.now = NOW
        self.probe = Client(f"/chat/{CHAT_ROOM}?user=bob", deflate=deflate)
        with gc_paused():
            self.recipients = [self.probe.open(server, self.now)]
            self.recipients += [connect(server, self.probe.request, self.now) for _ in range(recipients - 1)]
        self.alice = Client(f"/chat/{CHAT_ROOM}?user=alice")
        self.sender = self.alice.open(server, self.now)
        shell_pass(server)
        self.passes = 0

    def send(self, data: bytes) -> Outbox:
        """One read from alice's socket, then the pass that writes it out."""
        self.now += 1.0  # a second per pass: alice's rate limit (100 messages a second) never bites
        self.server.receive(self.sender, data, self.now)
        self.passes += 1
        return shell_pass(self.server)

    def assert_delivered(self, out: Outbox, texts: list[str]) -> None:
        """Every recipient, and no one else, got the same bytes: ``texts`` from alice, in order."""
        assert out.keys() == set(self.recipients)
        data = out[self.recipients[0]]
        assert all(other == data for other in out.values())
        assert data[0] == (0xC1 if self.deflate else 0x81)  # FIN, RSV1 when compressed, text
        events = self.probe.events(data)
        assert [e["text"] for e in events] == texts
        assert {(e["event"], e["room"], e["user"]) for e in events} == {("message", CHAT_ROOM, "alice")}


class ChatRooms:
    """Rooms built on first use and kept for the module: 10,000 handshakes are not paid per test."""

    def __init__(self) -> None:
        self._rooms: dict[tuple[int, bool], ChatRoom] = {}

    def get(self, recipients: int, deflate: bool) -> ChatRoom:
        key = (recipients, deflate)
        if key not in self._rooms:
            self._rooms[key] = ChatRoom(recipients, deflate)
        return self._rooms[key]


@pytest.fixture(scope="module")
def chat_rooms() -> ChatRooms:
    return ChatRooms()


@pytest.mark.benchmark(group="fan-out, one message")
@pytest.mark.parametrize(
    ("recipients", "deflate"),
    [
        pytest.param(n, deflate, id=f"{n}-recipients-{'deflate' if deflate else 'plain'}")
        for n in (10, 1_000, 10_000)
        for deflate in (False, True)
    ],
)
def test_fanout_one_message(benchmark: BenchmarkFixture, chat_rooms: ChatRooms, recipients: int, deflate: bool) -> None:
    room = chat_rooms.get(recipients, deflate)
    frame = room.alice.frame({"event": "message", "text": TEXT})
    deliveries, passes = room.server.metrics.deliveries, room.passes
    with mock.patch.object(core, "deflate", wraps=core.deflate) as compress:
        room.assert_delivered(room.send(frame), [TEXT])
    assert compress.call_count == (1 if deflate else 0)  # once per message, not per recipient

    room.assert_delivered(benchmark(room.send, frame), [TEXT])
    assert room.server.metrics.deliveries - deliveries == recipients * (room.passes - passes)
    report_per(benchmark, "recipient", recipients)


@pytest.mark.benchmark(group="fan-out, pipelined burst")
def test_fanout_burst_of_64_messages_to_1000_recipients(benchmark: BenchmarkFixture, chat_rooms: ChatRooms) -> None:
    room = chat_rooms.get(1_000, False)
    texts = [f"message {i} of a burst" for i in range(64)]
    data = b"".join(room.alice.frame({"event": "message", "text": text}) for text in texts)
    deliveries, passes = room.server.metrics.deliveries, room.passes

    room.assert_delivered(benchmark(room.send, data), texts)
    assert room.server.metrics.deliveries - deliveries == len(texts) * 1_000 * (room.passes - passes)
    report_per(benchmark, "delivery", len(texts) * 1_000)


# ---------------------------------------------------------------------------
# Receive path
# ---------------------------------------------------------------------------

SMALL_TEXT = "small room chat line, sixty-four bytes long: {:>019d}"  # 64 characters with its number


@pytest.mark.benchmark(group="receive path, room of 3")
@pytest.mark.parametrize("frames", [64, 1], ids=["64-frames-per-receive", "1-frame-per-receive"])
def test_receive_64_byte_messages_in_a_room_of_3(benchmark: BenchmarkFixture, chat_rooms: ChatRooms,
                                                 frames: int) -> None:
    room = chat_rooms.get(2, False)
    texts = [SMALL_TEXT.format(i) for i in range(frames)]
    assert {len(text) for text in texts} == {64}
    data = b"".join(room.alice.frame({"event": "message", "text": text}) for text in texts)
    deliveries, passes = room.server.metrics.deliveries, room.passes

    room.assert_delivered(benchmark(room.send, data), texts)
    assert room.server.metrics.deliveries - deliveries == frames * 2 * (room.passes - passes)
    report_per(benchmark, "frame", frames)


# ---------------------------------------------------------------------------
# Presence
# ---------------------------------------------------------------------------

PRESENCE_MEMBERS = 10_000


class PresenceRoom:
    """``/presence`` with ``members`` users present (the probe, a wsproto client, among them),
    and a newcomer who joins and leaves; each ends with the window's flush and its pass."""

    def __init__(self, members: int) -> None:
        self.server = server = core.Server(build_router(CONFIG), CONFIG)
        self.now = NOW
        self.probe = Client("/presence?user=probe")
        with gc_paused():  # one window: they all get one shared presence_state when it closes
            self.members = [connect(server, self.probe.request, self.now)]
            for i in range(members - 1):
                self.members.append(connect(server, upgrade_request(f"/presence?user=u{i:05d}"), self.now))
        self.now += CONFIG.handshake_timeout  # let the members' handshake timers run out now, not in a round
        self.probe.accept(self._flush()[self.members[0]])
        self.users = server.presence("presence")
        assert len(self.users) == members
        self.newcomer_request = upgrade_request("/presence?user=newcomer")
        self.newcomer: core.Connection | None = None

    def _flush(self) -> Outbox:
        """Close the presence window: ``tick`` sends its diff; then the pass writes it out."""
        self.now += 2 * CONFIG.presence_window
        self.server.tick(self.now)
        return shell_pass(self.server)

    def join(self) -> Outbox:
        assert self.newcomer is None
        self.newcomer = self.server.connect(peer(), self.now)
        self.server.receive(self.newcomer, self.newcomer_request, self.now)
        return self._flush()

    def leave(self) -> Outbox:
        newcomer, self.newcomer = self.newcomer, None
        assert newcomer is not None
        self.server.receive(newcomer, b"", self.now)  # its socket is gone
        return self._flush()

    def reset(self) -> None:
        """Setup of a join: the newcomer is away."""
        if self.newcomer is not None:
            self.leave()

    def joined(self) -> None:
        """Setup of a leave: the newcomer is present, and its join is flushed."""
        self.reset()
        self.join()

    def assert_diff(self, out: Outbox, joins: list[str], leaves: list[str]) -> bytes:
        """Every member got the same diff; return what the newcomer (the only other connection) got."""
        members = set(self.members)
        (newcomer,) = out.keys() - members
        data = out[self.members[0]]
        assert all(out[member] == data for member in members)
        assert self.probe.events(data) == [{"event": "presence_diff", "joins": joins, "leaves": leaves}]
        return out[newcomer]


@pytest.fixture(scope="module")
def presence_room() -> PresenceRoom:
    return PresenceRoom(PRESENCE_MEMBERS)


@pytest.mark.benchmark(group="presence, 10,000 members")
def test_presence_join_at_10000_members(benchmark: BenchmarkFixture, presence_room: PresenceRoom) -> None:
    out = benchmark.pedantic(presence_room.join, setup=presence_room.reset, rounds=30, warmup_rounds=2)
    head, _, frames = presence_room.assert_diff(out, ["newcomer"], []).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    users = sorted([*presence_room.users, "newcomer"])
    assert presence_room.probe.events(frames) == [{"event": "presence_state", "users": users}]
    report_per(benchmark, "member", PRESENCE_MEMBERS)


@pytest.mark.benchmark(group="presence, 10,000 members")
def test_presence_leave_at_10000_members(benchmark: BenchmarkFixture, presence_room: PresenceRoom) -> None:
    out = benchmark.pedantic(presence_room.leave, setup=presence_room.joined, rounds=30, warmup_rounds=2)
    assert presence_room.assert_diff(out, [], ["newcomer"]) == b""  # closed: nothing more to write
    report_per(benchmark, "member", PRESENCE_MEMBERS)
