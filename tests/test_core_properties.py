"""Properties of the core over large input spaces (hypothesis)."""

from __future__ import annotations

import ast
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, Message

from tests.hub import Hub, upgrade_request

ROOT = Path(__file__).resolve().parent.parent


def client_session(messages: list[str]) -> bytes:
    """The bytes a real client sends: handshake request, messages to /echo, a close."""
    client = Connection(ConnectionType.CLIENT)
    data = upgrade_request("/echo")
    for text in messages:
        data += client.send(Message(data=text))
    return data + client.send(CloseConnection(1000))


def run_split(data: bytes, cuts: list[int]) -> bytes:
    hub = Hub(rate_limit=0)
    conn = hub.server.connect(peer=None, now=hub.now)
    out = b""
    points = sorted({min(c, len(data)) for c in cuts})
    for start, end in zip([0, *points], [*points, len(data)], strict=True):
        if end > start:  # b"" would mean EOF
            hub.server.receive(conn, data[start:end], hub.now)
            out += conn.data_to_send()
    return out


@settings(max_examples=200, deadline=None)
@given(
    messages=st.lists(st.text(max_size=300), max_size=5),
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=20),
)
def test_the_same_bytes_split_anywhere_give_the_same_output(messages: list[str], cuts: list[int]) -> None:
    data = client_session(messages)
    whole = run_split(data, [])
    assert run_split(data, cuts) == whole
    # and the output is a 101, the echoes and the close reply
    assert whole.startswith(b"HTTP/1.1 101 ") and whole.endswith(b"\x88\x02\x03\xe8")


@settings(max_examples=300, deadline=None)
@given(junk=st.binary(max_size=2000), cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=10))
def test_arbitrary_bytes_after_the_upgrade_never_raise_and_stay_bounded(junk: bytes, cuts: list[int]) -> None:
    hub = Hub(max_buffer=4096)
    conn = hub.server.connect(peer=None, now=hub.now)
    hub.server.receive(conn, upgrade_request("/chat"), hub.now)
    conn.data_to_send()
    points = sorted({min(c, len(junk)) for c in cuts})
    for start, end in zip([0, *points], [*points, len(junk)], strict=True):
        if end > start:
            hub.server.receive(conn, junk[start:end], hub.now)
        assert conn.outbound_size <= 4096 + 256  # bounded; control frames are tiny
    hub.server.receive(conn, b"", hub.now)
    assert conn.closed


@settings(max_examples=300, deadline=None)
@given(junk=st.binary(max_size=3000))
def test_arbitrary_bytes_as_a_request_never_raise(junk: bytes) -> None:
    hub = Hub()
    conn = hub.server.connect(peer=None, now=hub.now)
    hub.server.receive(conn, junk, hub.now)
    hub.server.receive(conn, b"", hub.now)
    assert conn.closed


def test_core_imports_no_io_module() -> None:
    tree = ast.parse((ROOT / "hubbub" / "core.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    io = {"socket", "asyncio", "anyio", "trio", "threading", "selectors", "time", "sqlite3", "redis", "os",
          "subprocess", "ssl"}
    assert not imported & io
    assert imported <= {"__future__", "base64", "binascii", "enum", "heapq", "json", "re", "struct", "zlib",
                        "collections", "dataclasses", "typing", "urllib", "h11", "wsproto", "fnmatch"}
