"""Per-pass room batches: a room's broadcasts of one pass leave as one shared bytes object.

Whatever happens in a pass (several senders, members with output of their own, members
joining and leaving mid-pass, members of several rooms, compression groups, closes), every connection must
receive exactly the bytes, in exactly the order, that one frame per message per recipient
would have given it; through ``take_shared`` (the shell's fast path) and through
``pending`` alone (the simple path) alike.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from hubbub import core
from hubbub.handlers import build_router
from tests.hub import upgrade_request

ROOMS = ("a", "b", "c")
OFFERS = (None, "permessage-deflate", "permessage-deflate; server_max_window_bits=10")
CLOSE_1000 = b"\x88\x02\x03\xe8"


class World:
    """One server, its connections, what each received, and what each should have received."""

    def __init__(self, specs: list[tuple[int, int]]) -> None:
        self.config = core.Config(compression_min_size=64, ping_interval=0, rate_limit=0)
        self.server = core.Server(build_router(self.config), self.config)
        self.conns: list[core.Connection] = []
        self.got: dict[core.Connection, bytearray] = {}
        self.want: dict[core.Connection, bytearray] = {}
        self.members: dict[str, list[core.Connection]] = {room: [] for room in ROOMS}
        for room_index, offer_index in specs:
            conn = self.server.connect(("127.0.0.1", 1), 1.0)
            offer = OFFERS[offer_index]
            extra = {"Sec_WebSocket_Extensions": offer} if offer else {}
            self.server.receive(conn, upgrade_request(f"/chat/{ROOMS[room_index]}", **extra), 1.0)
            assert conn.state is core.State.OPEN and (conn.deflate_bits is None) == (offer is None)
            self.conns.append(conn)
            self.members[ROOMS[room_index]].append(conn)
            self.got[conn] = bytearray()
            self.want[conn] = bytearray()
        for conn in self.server.pending():
            conn.data_to_send()  # the 101 responses

    def frame(self, payload: dict[str, Any], conn: core.Connection) -> bytes:
        return core.text_message(payload, self.config).frame_for(conn.deflate_bits)

    def apply(self, op: tuple[Any, ...], n: int) -> None:
        kind = op[0]
        payload = {"event": "message", "n": n, "text": "x" * op[-1]}
        if kind == "broadcast":
            room, sender = ROOMS[op[1]], self.conns[op[2] % len(self.conns)]
            exclude = sender if sender in self.members[room] else None
            for member in self.members[room]:
                if member is not exclude:
                    self.want[member] += self.frame(payload, member)
            self.server.broadcast(room, payload, exclude=exclude)
        elif kind == "send":
            conn = self.conns[op[1] % len(self.conns)]
            if conn.state is core.State.OPEN:
                self.want[conn] += self.frame(payload, conn)
            conn.send(payload)
        elif kind == "join":
            conn, room = self.conns[op[1] % len(self.conns)], ROOMS[op[2]]
            if conn.state is core.State.OPEN and conn not in self.members[room]:
                self.members[room].append(conn)
                conn.join(room)
        elif kind == "leave":
            conn, room = self.conns[op[1] % len(self.conns)], ROOMS[op[2]]
            if conn in self.members[room]:
                self.members[room].remove(conn)
                assert conn.leave(room)
        elif kind == "close":
            conn = self.conns[op[1] % len(self.conns)]
            if conn.state is core.State.OPEN:
                self.want[conn] += CLOSE_1000
                for members in self.members.values():
                    if conn in members:
                        members.remove(conn)
                conn.close(1000)

    def end_pass(self, shared_path: bool) -> None:
        """What a shell does at the end of a loop pass."""
        server = self.server
        if shared_path:
            shared = server.take_shared()
            for conn in server.pending():
                self.got[conn] += conn.data_to_send()
            for data, members in shared:
                for conn in members:
                    self.got[conn] += data
        else:
            for conn in server.pending():
                self.got[conn] += conn.data_to_send()


message_size = st.sampled_from([5, 200])
ops = st.one_of(
    st.tuples(st.just("broadcast"), st.integers(0, 2), st.integers(0, 20), message_size),
    st.tuples(st.just("send"), st.integers(0, 20), message_size),
    st.tuples(st.just("join"), st.integers(0, 20), st.integers(0, 2), message_size),
    st.tuples(st.just("join"), st.integers(0, 20), st.integers(0, 2), message_size),  # often: members of several
    st.tuples(st.just("leave"), st.integers(0, 20), st.integers(0, 2), message_size),
    st.tuples(st.just("close"), st.integers(0, 20), message_size),
)
specs = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2)), min_size=1, max_size=8)
passes = st.lists(st.lists(ops, max_size=12), min_size=1, max_size=4)


@settings(max_examples=300, deadline=None)
@given(specs=specs, passes=passes, shared_path=st.booleans())
def test_every_connection_gets_its_frames_in_order(
    specs: list[tuple[int, int]], passes: list[list[tuple[Any, ...]]], shared_path: bool
) -> None:
    world = World(specs)
    n = 0
    for one_pass in passes:
        for op in one_pass:
            n += 1
            world.apply(op, n)
        world.end_pass(shared_path)
    for conn in world.conns:
        assert bytes(world.got[conn]) == bytes(world.want[conn]), conn


def test_one_pass_of_a_pipelining_sender_is_one_shared_write() -> None:
    world = World([(0, 0)] * 4)
    sender, *others = world.conns
    bytes_before = world.server.metrics.bytes_out
    for n in range(50):
        world.server.broadcast("a", {"event": "message", "n": n}, exclude=sender)
    shared = world.server.take_shared()
    assert world.server.pending() == []
    assert len(shared) == 1
    data, members = shared[0]
    assert members == others
    assert data == b"".join(core.text_message({"event": "message", "n": n}, world.config).plain for n in range(50))
    assert world.server.metrics.deliveries == 150
    assert world.server.metrics.bytes_out - bytes_before == 3 * len(data)


def test_compression_groups_share_their_own_bytes() -> None:
    world = World([(0, 0), (0, 1), (0, 1), (0, 2)])
    payload = {"event": "message", "text": "y" * 300}
    world.server.broadcast("a", payload)
    shared = world.server.take_shared()
    by_members = {tuple(c.deflate_bits for c in members): data for data, members in shared}
    assert set(by_members) == {(None,), (15, 15), (10,)}
    for data, members in shared:
        assert data == world.frame(payload, members[0])


def test_a_slow_consumer_loses_its_share_of_the_batch_and_gets_1013() -> None:
    world = World([(0, 0)] * 3)
    reader, _, stalled = world.conns
    for n in range(3):
        world.server.broadcast("a", {"event": "message", "n": n}, exclude=reader)
    shared = world.server.take_shared()
    (data, _), = shared
    world.server.enqueue(stalled, b"\x81\x00" * (world.config.max_buffer // 2 + 1))  # its socket is full
    world.server.enqueue(stalled, data)
    pending = world.server.pending()
    assert stalled in pending and stalled.close_code == 1013
    assert stalled.data_to_send().startswith(b"\x88")  # only the close frame: its backlog was dropped


def test_a_member_joining_mid_pass_gets_only_what_follows() -> None:
    world = World([(0, 0), (0, 0), (1, 0)])
    first, second, newcomer = world.conns
    world.apply(("broadcast", 0, 0, 5), 1)
    world.apply(("join", 2, 0, 5), 2)
    world.apply(("broadcast", 0, 0, 5), 3)
    world.end_pass(shared_path=True)
    assert bytes(world.got[newcomer]) == bytes(world.want[newcomer]) == world.frame(
        {"event": "message", "n": 3, "text": "xxxxx"}, newcomer
    )
    assert bytes(world.got[second]) == bytes(world.want[second])
    assert world.got[first] == b""


# Members of several rooms, joining and leaving between messages: the ops above, with joins and leaves
# weighted so that most connections are in two or three rooms at once and change rooms every pass.
churn = st.one_of(
    st.tuples(st.just("broadcast"), st.integers(0, 2), st.integers(0, 20), message_size),
    st.tuples(st.just("broadcast"), st.integers(0, 2), st.integers(0, 20), message_size),
    st.tuples(st.just("join"), st.integers(0, 20), st.integers(0, 2), message_size),
    st.tuples(st.just("join"), st.integers(0, 20), st.integers(0, 2), message_size),
    st.tuples(st.just("leave"), st.integers(0, 20), st.integers(0, 2), message_size),
    st.tuples(st.just("send"), st.integers(0, 20), message_size),
)


@settings(max_examples=300, deadline=None)
@given(specs=specs, passes=st.lists(st.lists(churn, max_size=16), min_size=1, max_size=5),
       joins=st.lists(st.tuples(st.integers(0, 20), st.integers(0, 2)), max_size=12))
def test_members_of_several_rooms_get_each_rooms_messages_once_in_order_one_write_per_room(
    specs: list[tuple[int, int]], passes: list[list[tuple[Any, ...]]], joins: list[tuple[int, int]]
) -> None:
    """Each connection gets each of its rooms' messages once and in order (exactly the bytes one frame per
    message would give), and per pass at most one shared write per room it was in during the pass (a room's
    broadcasts of the pass, encoded once per compression group) besides its own output (one write)."""
    world = World(specs)
    for conn_index, room_index in joins:  # start in several rooms
        world.apply(("join", conn_index, room_index, 5), 0)
    world.end_pass(shared_path=True)
    n = 0
    for one_pass in passes:
        was_in = {conn: {room for room, members in world.members.items() if conn in members} for conn in world.conns}
        broadcast_rooms = set()
        for op in one_pass:
            n += 1
            world.apply(op, n)
            if op[0] == "join":
                conn = world.conns[op[1] % len(world.conns)]
                if conn in world.members[ROOMS[op[2]]]:
                    was_in[conn].add(ROOMS[op[2]])
            elif op[0] == "broadcast":
                broadcast_rooms.add(ROOMS[op[1]])
        shared = world.server.take_shared()
        groups = {conn.deflate_bits for conn in world.conns}
        assert len(shared) <= len(broadcast_rooms) * len(groups)  # encoded once per room and compression group
        for conn in world.server.pending():  # its own output and what did not fit a shared batch: one write,
            world.got[conn] += conn.data_to_send()  # first, as the shell does
        writes: dict[core.Connection, int] = {}
        for data, members in shared:
            assert len(members) == len(set(members))
            for conn in members:
                writes[conn] = writes.get(conn, 0) + 1
                world.got[conn] += data
        for conn, count in writes.items():
            assert count <= len(was_in[conn] & broadcast_rooms), (conn, count, was_in[conn])
    for conn in world.conns:
        assert bytes(world.got[conn]) == bytes(world.want[conn]), conn
