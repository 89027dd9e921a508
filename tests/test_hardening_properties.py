"""Properties of the core's input handling (hypothesis), beyond tests/test_core_properties.py: byte streams
split at arbitrary points, in the handshake and in framing, never raise out of ``receive()``, never grow an
inbound or outbound buffer past its limit, and give the same output however they are split.

The inbound buffers are h11's request buffer and wsproto's frame buffer, read through their private
attributes: the property is about them, and nothing public reports their size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import example, given, settings
from hypothesis import strategies as st

from hubbub import core
from tests.hub import Hub, upgrade_request
from tests.wire import frame

LIMITS = {"max_message_size": 1000, "max_echo_message_size": 1000, "max_buffer": 4096, "max_header_bytes": 1024,
          "max_headers": 16}
# wsproto keeps at most the longest frame header plus the largest control payload from earlier input (it
# hands data frames on as they arrive); on top of that, what a failed parse left of the latest piece
MAX_CONTROL_FRAME = 14 + 125


@dataclass
class Run:
    """What one split of a byte stream produced: the server's output and its largest buffers on the way."""

    output: bytes = b""
    closed: bool = False
    close_code: int | None = None
    request_buffer: int = 0
    frame_buffer_beyond_piece: int = 0
    message_parts: int = 0
    outbound: list[int] = field(default_factory=list)


def feed(data: bytes, cuts: list[int]) -> Run:
    """Feed ``data`` to a fresh connection in the pieces ``cuts`` make, then EOF; measure after each piece."""
    hub = Hub(**LIMITS)
    conn = hub.server.connect(peer=None, now=hub.now)
    run = Run()
    points = sorted({min(c, len(data)) for c in cuts})
    for start, end in zip([0, *points], [*points, len(data)], strict=True):
        if end <= start:
            continue  # b"" would mean EOF
        hub.server.receive(conn, data[start:end], hub.now)
        measure(conn, run, end - start)
        hub.server.pending()  # room broadcasts of this pass join the connection's own output
        run.output += conn.data_to_send()
    hub.server.receive(conn, b"", hub.now)
    run.output += conn.data_to_send()
    run.closed, run.close_code = conn.closed, conn.close_code
    return run


def measure(conn: core.Connection, run: Run, piece: int) -> None:
    """Take the connection's buffer sizes after it received a piece of ``piece`` bytes."""
    request, frames = conn.request, conn.frames
    if request is not None and request._http is not None:
        run.request_buffer = max(run.request_buffer, len(request._http._receive_buffer))
    if frames is not None and frames._ws is not None:
        beyond = len(frames._ws._proto._frame_decoder.buffer) - piece
        run.frame_buffer_beyond_piece = max(run.frame_buffer_beyond_piece, beyond)
    if frames is not None:
        run.message_parts = max(run.message_parts, sum(len(part) for part in frames._parts))
    run.outbound.append(conn.outbound_size)


def assert_bounded(run: Run) -> None:
    """Every buffer within its limit (wsproto's frame buffer has its own test, below)."""
    assert run.request_buffer <= LIMITS["max_header_bytes"]
    assert run.message_parts <= LIMITS["max_message_size"]
    assert max(run.outbound, default=0) <= LIMITS["max_buffer"] + 256  # our close frame may follow a full queue
    assert run.closed  # EOF closes whatever state the stream left it in


cuts = st.lists(st.integers(min_value=0, max_value=6000), max_size=12)

payloads = st.one_of(
    st.binary(max_size=130),
    st.binary(min_size=126, max_size=700),  # 16-bit lengths; a few of them pass the 1,000-byte limit
    st.text(max_size=100).map(str.encode),
    st.sampled_from([b'{"event":"message","text":"hi","ref":1}', b'{"event":"history","limit":5}',
                     b'{"event":"list"}', b"\x03\xe8", b"\x03\xf3bye", b"\xce\xba\xed\xa0\x80"]),
)


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """One client frame: mostly well-formed, sometimes with a reserved opcode, RSV bits or no mask."""
    return frame(
        draw(payloads),
        opcode=draw(st.sampled_from([0x1, 0x1, 0x2, 0x0, 0x0, 0x8, 0x9, 0x9, 0xA, 0x3, 0xB])),
        fin=draw(st.booleans()),
        rsv=draw(st.sampled_from([0, 0, 0, 0, 0, 1, 2, 4])),
        masked=draw(st.sampled_from([True] * 9 + [False])),
        key=draw(st.binary(min_size=4, max_size=4)),
    )


frame_streams = {"target": st.sampled_from(["/chat", "/echo", "/presence"]), "stream": st.lists(frames(), max_size=30),
                 "cuts": cuts}


@settings(max_examples=300, deadline=None)
@given(**frame_streams)
# invalid UTF-8 in a fragment read in two pieces: the decoder's reason named the byte's position in its piece
@example(target="/chat", stream=[b"\x01\x82\x00\x00\x00\x00\x00\x80", *[b"\x01\x80\x00\x00\x00\x00"] * 4],
         cuts=[164])
def test_frames_split_anywhere_never_raise_stay_bounded_and_give_the_same_output(
        target: str, stream: list[bytes], cuts: list[int]) -> None:
    data = upgrade_request(target) + b"".join(stream)
    whole = feed(data, [])
    split = feed(data, cuts)
    assert_bounded(whole)
    assert_bounded(split)
    assert split.output == whole.output
    assert split.close_code == whole.close_code


BINARY_ON_CHAT = frame(b"", opcode=0x2, key=b"\x00" * 4)  # close 1003, and the server waits for ours


@settings(max_examples=300, deadline=None)
@given(**frame_streams)
@example(target="/chat", stream=[BINARY_ON_CHAT, b"\xff" * 200, b"\xff" * 200],
         cuts=[len(upgrade_request("/chat")) + len(BINARY_ON_CHAT) + k * 200 for k in range(2)])
def test_frames_split_anywhere_never_grow_the_frame_buffer(target: str, stream: list[bytes],
                                                           cuts: list[int]) -> None:
    """wsproto's buffer never holds more than the latest piece plus one frame head or control frame."""
    run = feed(upgrade_request(target) + b"".join(stream), cuts)
    assert run.frame_buffer_beyond_piece <= MAX_CONTROL_FRAME


heads = st.one_of(
    st.binary(max_size=3000),
    st.builds(
        lambda target, lines, tail: b"GET " + target + b" HTTP/1.1\r\n" + b"".join(lines) + tail,
        st.sampled_from([b"/chat", b"/echo", b"/", b"/healthz", b"/chat/" + b"r" * 2000]),
        st.lists(st.binary(max_size=300).map(lambda value: b"X-H: " + value + b"\r\n"), max_size=40),
        st.sampled_from([b"\r\n", b"", b"\r\n\r\n", b"\n"]),
    ),
)


@settings(max_examples=300, deadline=None)
@given(head=heads, cuts=cuts)
def test_requests_split_anywhere_never_raise_stay_bounded_and_give_the_same_answer(
        head: bytes, cuts: list[int]) -> None:
    """The same status however the head is split. Only the status: a refusal's body carries h11's
    diagnostic, which names whatever it noticed first in the bytes it had. And a head that is both
    malformed and over --max-header-bytes may get either 400 or 431 (the issue allows both): whichever
    the server can tell first, the malformation in a piece it parsed whole or the size of an unfinished one."""
    whole = feed(head, [])
    split = feed(head, cuts)
    assert_bounded(whole)
    assert_bounded(split)
    statuses = {split.output.split(b"\r\n", 1)[0], whole.output.split(b"\r\n", 1)[0]}
    if len(head) > LIMITS["max_header_bytes"]:
        assert statuses <= {b"HTTP/1.1 400 Bad Request", b"HTTP/1.1 431 Request Header Fields Too Large"} or \
            len(statuses) == 1, statuses
    else:
        assert len(statuses) == 1, statuses
