"""The receive fast path and wsproto agree (hypothesis): the same random stream of client frames, cut at
random points, through a server with the fast path and one that reads every frame with wsproto, gives
the same HTTP answer, the same frames byte for byte and the same close code, on every route, with and
without permessage-deflate. (Only a close frame's reason text may differ: wsproto words an invalid
UTF-8 message by where its incremental decoder was, which depends on how the frame was cut.) The
fast path takes the common frames itself and hands the first odd one, and everything after it, to
wsproto; this is the proof that nobody can tell."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hubbub import core
from hubbub.handlers import build_router
from hubbub.server import UNMASK
from tests.hub import upgrade_request
from tests.wire import frame

LIMITS = {"max_message_size": 1000, "max_echo_message_size": 1000, "max_buffer": 8192, "rate_limit": 50.0,
          "frames_per_pass": 7}
OFFER = "permessage-deflate; client_max_window_bits"


def run(data: bytes, cuts: list[int], fast: bool) -> tuple[list[bytes], int | None, bool]:
    """Feed ``data`` in the pieces ``cuts`` make (resuming a backlogged connection as a shell does),
    then EOF; what the server had written after each piece (so the paths must agree on when, not
    only on what: a text frame that is not UTF-8 fails as its bad byte arrives), the close code,
    and whether it ever took wsproto's path."""
    config = core.Config(**LIMITS)  # type: ignore[arg-type]
    server = core.Server(build_router(config), config, fast_path=fast)
    now = 1_700_000_000.0
    conn = server.connect(peer=("10.0.0.1", 4000), now=now)
    output = b""
    steps = []
    reader = None  # its FrameReader, kept: the connection drops it when it closes
    points = sorted({min(c, len(data)) for c in cuts})
    for start, end in zip([0, *points], [*points, len(data)], strict=True):
        if end <= start:
            continue
        now += 0.001
        server.receive(conn, data[start:end], now)
        reader = reader or conn.frames
        while conn.backlogged:
            server.resume(conn, now)
        server.pending()
        output += conn.data_to_send()
        steps.append(output)
    server.receive(conn, b"", now)
    server.pending()
    output += conn.data_to_send()
    steps.append(output)
    return steps, conn.close_code, reader is not None and reader._ws is not None


def frames_of(output: bytes) -> tuple[bytes, list[tuple[int, bytes]]]:
    """The server's output as its HTTP head and its frames (opcode byte, payload; a close: its code)."""
    head, _, rest = output.partition(b"\r\n\r\n")
    out = []
    pos = 0
    while pos < len(rest):
        b0, n = rest[pos], rest[pos + 1] & 0x7F
        start = pos + 2
        if n == 126:
            n, start = int.from_bytes(rest[pos + 2 : pos + 4], "big"), pos + 4
        elif n == 127:
            n, start = int.from_bytes(rest[pos + 2 : pos + 10], "big"), pos + 10
        payload = rest[start : start + n]
        out.append((b0, payload[:2] if b0 == 0x88 else payload))
        pos = start + n
    return head, out


def assert_same(fast: tuple[list[bytes], int | None, bool], slow: tuple[list[bytes], int | None, bool]) -> None:
    assert [frames_of(step) for step in fast[0]] == [frames_of(step) for step in slow[0]]
    assert fast[1] == slow[1]


payloads = st.one_of(
    st.sampled_from([b'{"event":"message","text":"hi","ref":1}', b'{"event":"history","limit":5}',
                     b'{"event":"list"}', b'{"event":"message","text":"\\ud800"}', b"", b"\x03\xe8", b"\x03\xf3bye",
                     b"\xce\xba\xed\xa0\x80", b"\xff", "héllo wörld".encode()]),
    st.binary(max_size=130),
    st.binary(min_size=126, max_size=1100),  # 16-bit lengths, some past the 1,000-byte limit
    st.text(max_size=60).map(str.encode),
)


@st.composite
def frames(draw: st.DrawFn, deflate: bool) -> bytes:
    """Mostly frames the fast path takes, often ones it does not (fragments, closes, reserved bits)."""
    payload = draw(payloads)
    opcode = draw(st.sampled_from([0x1, 0x1, 0x1, 0x2, 0x9, 0xA, 0x0, 0x8, 0x3]))
    fin = draw(st.sampled_from([True] * 6 + [False]))
    rsv = draw(st.sampled_from([0] * 8 + [4, 2]))
    masked = draw(st.sampled_from([True] * 19 + [False]))
    return frame(payload, opcode=opcode, fin=fin, rsv=rsv, masked=masked, key=draw(st.binary(min_size=4, max_size=4)))


@st.composite
def compressed_streams(draw: st.DrawFn) -> bytes:
    """Messages compressed as a browser does (one context across messages), mixed with plain frames."""
    compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
    out = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["compressed", "compressed", "plain", "odd"]))
        if kind == "compressed":
            text = draw(payloads)
            body = compressor.compress(text) + compressor.flush(zlib.Z_SYNC_FLUSH)
            body = body[:-4] if body.endswith(b"\x00\x00\xff\xff") else body
            if draw(st.booleans()) and body:
                body = body[: draw(st.integers(0, len(body) - 1))] + b"\xff"  # corrupt: wsproto's 1007 then
            out.append(frame(body, opcode=draw(st.sampled_from([0x1, 0x2])), rsv=4,
                             key=draw(st.binary(min_size=4, max_size=4))))
        elif kind == "plain":
            out.append(frame(draw(payloads), key=draw(st.binary(min_size=4, max_size=4))))
        else:
            out.append(draw(frames(True)))
    return b"".join(out)


cuts = st.lists(st.integers(min_value=0, max_value=3000), max_size=10)


@settings(max_examples=600, deadline=None)
@given(target=st.sampled_from(["/chat/r", "/echo", "/presence"]), stream=st.lists(frames(False), max_size=25),
       cuts=cuts)
def test_both_paths_give_the_same_bytes_and_close_code(target: str, stream: list[bytes], cuts: list[int]) -> None:
    data = upgrade_request(target) + b"".join(stream)
    assert_same(run(data, cuts, fast=True), run(data, cuts, fast=False))


@settings(max_examples=300, deadline=None)
@given(target=st.sampled_from(["/chat/r", "/echo"]), stream=compressed_streams(), cuts=cuts)
def test_both_paths_agree_on_compressed_streams(target: str, stream: bytes, cuts: list[int]) -> None:
    data = upgrade_request(target, Sec_WebSocket_Extensions=OFFER) + stream
    assert_same(run(data, cuts, fast=True), run(data, cuts, fast=False))


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=3000), key=st.binary(min_size=4, max_size=4))
def test_the_shells_c_unmasker_gives_what_the_cores_xor_gives(payload: bytes, key: bytes) -> None:
    """The shell runs the fast path with websockets' C ``apply_mask`` (``Server(unmask=...)``); it unmasks
    every payload as the core's own XOR does, so the properties above hold for the server as it runs."""
    if UNMASK is None:
        pytest.skip("websockets was built without its C speedup here: the shell runs the core's own XOR")
    assert UNMASK(payload, key) == core._unmask(payload, key)


def test_the_common_frames_never_wake_wsproto() -> None:
    """A session of pipelined messages, pings and pongs, cut anywhere: wsproto is never even made."""
    body = b"".join(frame(b"message %d" % i) for i in range(40))
    data = upgrade_request("/echo") + body + frame(b"1", opcode=0x9) + frame(b"1", opcode=0xA)
    steps, code, used_wsproto = run(data, [70, 71, 300, 301, 999], fast=True)
    assert not used_wsproto and code == 1006  # the EOF
    _, sent = frames_of(steps[-1])
    assert sent == [(0x81, b"message %d" % i) for i in range(40)] + [(0x8A, b"1")]


# -- the request fast path -------------------------------------------------------------------------

NAMES = [b"Host", b"Upgrade", b"Connection", b"Sec-WebSocket-Key", b"Origin", b"X-Odd"]
VALUES = [b"localhost", b"websocket", b"Upgrade", b" padded ", b"a\tb", b"", b"\x80obs", b"12", b"chunked"]
header_names = st.one_of(*[st.sampled_from(NAMES)] * 8, st.sampled_from([b"Content-Length", b"Transfer-Encoding"]),
                         st.binary(min_size=0, max_size=8))
header_values = st.one_of(*[st.sampled_from(VALUES)] * 4, st.binary(max_size=12))
separators = st.sampled_from([b": "] * 6 + [b":", b":\t", b" :", b":  "])


@st.composite
def heads(draw: st.DrawFn) -> bytes:
    """Request heads that are mostly ordinary and often subtly not (h11 is the judge of those)."""
    method = draw(st.sampled_from([b"GET"] * 6 + [b"HEAD", b"POST", b"G T", b"", b"get"]))
    target = draw(st.sampled_from([b"/chat?user=a"] * 4 + [b"/", b"/chat/%FE", b"/a b", b"*", b"/\x7f"]))
    version = draw(st.sampled_from([b"HTTP/1.1"] * 8 + [b"HTTP/1.0", b"HTTP/2.0", b"http/1.1"]))
    lines = [method + b" " + target + b" " + version]
    for _ in range(draw(st.integers(0, 6))):
        lines.append(draw(header_names) + draw(separators) + draw(header_values))
    eol = draw(st.sampled_from([b"\r\n"] * 20 + [b"\n"]))
    if draw(st.integers(0, 3)):
        lines.append(b"Host: localhost")
    if draw(st.integers(0, 9)) == 0:
        lines.append(b" folded continuation")
    return eol.join(lines)


def h11_parse(head: bytes) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]] | None:
    import h11

    connection = h11.Connection(h11.SERVER)
    try:
        connection.receive_data(head + b"\r\n\r\n")
        event = connection.next_event()
    except h11.RemoteProtocolError:
        return None
    if not isinstance(event, h11.Request):
        return None
    return event.method, event.target, event.headers.raw_items()


@settings(max_examples=2000, deadline=None)
@given(head=heads())
def test_what_the_request_fast_path_takes_h11_takes_the_same_way(head: bytes) -> None:
    fast = core.parse_head(head)
    if fast is not None:
        assert h11_parse(head) == (fast.method, fast.target, fast.headers)


def test_the_request_fast_path_takes_an_ordinary_upgrade() -> None:
    head = upgrade_request("/chat?user=alice", Origin="http://localhost:8765").split(b"\r\n\r\n")[0]
    parsed = core.parse_head(head)
    assert parsed is not None and parsed == core.RequestHead(*h11_parse(head))  # type: ignore[misc]
