"""Frame reading and the byte-level frame edits, as pure unit tests: valid
streams in every chunking, arbitrary bytes (hypothesis), which must give
consistent frames or a 501 FRAME_ERROR and nothing else, and the read
buffer's reuse, which must never change a frame already handed out."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import commands, frame, header

from amqplex.protocol.constants import (
    FRAME_BODY,
    FRAME_END,
    FRAME_HEADER,
    FRAME_HEARTBEAT,
    FRAME_METHOD,
    FRAME_OVERHEAD,
    HEARTBEAT_FRAME,
    ReplyCode,
)
from amqplex.protocol.errors import ConnectionException
from amqplex.protocol.framing import (
    DELIVERIES,
    LARGE_BODY,
    MAX_READ,
    MIN_READ,
    ROUTED,
    FrameReader,
    FrameSplitter,
    channel_bytes,
    cut,
    cut_routed,
    rewrite_channel,
    split_body,
)

FRAME_TYPES = (FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT)


def make_frame(frame_type: int, channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", frame_type, channel, len(payload)) + payload + bytes((FRAME_END,))


def sample_stream() -> list[bytes]:
    """A few real frames of every type: method, content header, body, heartbeat."""
    return [
        frame.marshal(commands.Basic.Publish(exchange="", routing_key="q"), 3),
        frame.marshal(header.ContentHeader(0, 11, commands.Basic.Properties()), 3),
        make_frame(FRAME_BODY, 3, b"hello world"),
        HEARTBEAT_FRAME,
        make_frame(FRAME_BODY, 65535, b""),
        frame.marshal(
            commands.Channel.Close(reply_code=200, reply_text="bye", class_id=0, method_id=0), 7
        ),
    ]


def assert_consistent(frames: list, frame_max: int) -> None:
    """Each frame's type, channel and size agree with its own bytes."""
    for frame_type, channel, raw in frames:
        assert frame_type in FRAME_TYPES
        assert raw[0] == frame_type
        assert int.from_bytes(raw[1:3]) == channel
        assert int.from_bytes(raw[3:7]) == len(raw) - FRAME_OVERHEAD
        assert raw[-1] == FRAME_END
        assert len(raw) <= frame_max


def feed(reader: FrameReader | FrameSplitter, data: bytes, cuts: list[int]) -> list:
    """Feed `data` in the pieces the sorted offsets `cuts` make: through the
    reader's buffer, or to the splitter as the loop's bytes."""
    read = reader.feed if isinstance(reader, FrameReader) else reader.split
    frames = []
    start = 0
    for point in [*cuts, len(data)]:
        frames.extend(read(data[start:point]))
        start = point
    return frames


def outcome(data: bytes, frame_max: int, cuts: list[int], kind: type = FrameReader) -> tuple:
    """("frames", frames, buffered) or ("error", code), fed in those pieces."""
    reader = kind(frame_max)
    try:
        frames = feed(reader, data, cuts)
    except ConnectionException as error:
        return ("error", error.code)
    return ("frames", frames, reader.buffered)


# -- valid frames ------------------------------------------------------------------


def test_whole_stream_gives_every_frame():
    stream = sample_stream()
    frames = FrameReader(4096).feed(b"".join(stream))
    assert [raw for _, _, raw in frames] == stream
    assert [(t, c) for t, c, _ in frames] == [(1, 3), (2, 3), (3, 3), (8, 0), (3, 65535), (1, 7)]


def test_stream_split_at_every_byte_boundary_reassembles():
    stream = sample_stream()
    data = b"".join(stream)
    for point in range(len(data) + 1):
        reader = FrameReader(4096)
        frames = reader.feed(data[:point]) + reader.feed(data[point:])
        assert [raw for _, _, raw in frames] == stream, point
        assert reader.buffered == 0


def test_stream_fed_one_byte_at_a_time_reassembles():
    stream = sample_stream()
    data = b"".join(stream)
    reader = FrameReader(4096)
    frames = feed(reader, data, list(range(1, len(data))))
    assert [raw for _, _, raw in frames] == stream
    assert reader.buffered == 0


def test_incomplete_frame_is_held_back():
    data = make_frame(FRAME_BODY, 1, b"x" * 100)
    reader = FrameReader(4096)
    assert reader.feed(data[:50]) == []
    assert reader.buffered == 50
    assert reader.feed(data[50:]) == [(FRAME_BODY, 1, data)]
    assert reader.buffered == 0


def test_frame_of_exactly_frame_max_is_accepted():
    data = make_frame(FRAME_BODY, 1, b"x" * (4096 - FRAME_OVERHEAD))
    assert FrameReader(4096).feed(data) == [(FRAME_BODY, 1, data)]


# -- the read buffer -----------------------------------------------------------------


def body(size: int, fill: int) -> bytes:
    return make_frame(FRAME_BODY, 1, bytes((fill,)) * size)


def test_large_body_is_a_view_of_the_read_buffer_not_a_copy():
    data = body(LARGE_BODY + 1, 0x61)
    [(_, _, frame)] = FrameReader(1 << 20).feed(data)
    assert type(frame) is memoryview
    assert frame == data


def test_frame_held_elsewhere_is_never_written_over():
    """A body still queued for a peer keeps its bytes while reads go on,
    including the reads that make the reader start its buffer over."""
    reader = FrameReader(1 << 20)
    first = body(10_000, 0x61)
    [(_, _, held)] = reader.feed(first)
    for fill in range(0x62, 0x72):
        frames = reader.feed(body(3_000, fill) + body(50_000, fill)[:20_000])
        frames += reader.feed(body(50_000, fill)[20_000:])
        assert [bytes(frame) for _, _, frame in frames] == [body(3_000, fill), body(50_000, fill)]
        del frames
    assert held == first


def pump(reader: FrameReader, stream: bytes, kept: list | None = None) -> list[tuple[int, int]]:
    """Read `stream` as from a fast peer: every read fills what is offered.
    Returns (which buffer, how many bytes) each read was offered; the frames
    go to `kept`, or are dropped at once, as a peer that took them all would."""
    offered = []
    while stream:
        space = reader.get_buffer()
        offered.append((id(space.obj), len(space)))
        taken = min(len(space), len(stream))
        space[:taken] = stream[:taken]
        space.release()
        reader.received(taken)
        if kept is None:
            reader.frames()
        else:
            kept.extend(reader.frames())
        stream = stream[taken:]
    return offered


def test_buffer_is_read_into_again_once_no_frame_points_into_it():
    offered = pump(FrameReader(1 << 20), body(100_000, 0x61) * 100)
    assert len({buffer for buffer, _ in offered[-10:]}) == 1


def test_buffer_a_frame_points_into_is_not_read_into_again():
    kept: list = []
    offered = pump(FrameReader(1 << 20), body(100_000, 0x61) * 100, kept)
    assert len({buffer for buffer, _ in offered[-10:]}) == 10
    assert all(frame == body(100_000, 0x61) for _, _, frame in kept)
    assert len(kept) == 100


def test_reads_grow_with_a_stream_and_shrink_when_it_stops():
    reader = FrameReader(1 << 20)
    offered = pump(reader, body(100_000, 0x61) * 40)
    assert max(size for _, size in offered) > MAX_READ // 2
    reader.feed(HEARTBEAT_FRAME)
    assert len(reader.get_buffer()) <= MIN_READ


def test_a_quiet_reader_still_takes_a_burst_of_deliveries_in_one_read():
    """The event loop reads again whenever a read fills the buffer: a
    quiet upstream's buffer must hold what a burst brings (256 B deliveries
    arrive some 2 to 10 KB a read), or each burst costs a second read."""
    reader = FrameReader(131072)
    reader.feed(HEARTBEAT_FRAME)
    assert len(reader.get_buffer()) >= 32 * 1024


def test_bytes_after_a_bad_frame_are_dropped():
    reader = FrameReader(4096)
    with pytest.raises(ConnectionException):
        reader.feed(make_frame(9, 1, b"abc") + b"x" * 5000)
    assert reader.buffered == 0
    assert len(reader.get_buffer()) <= MIN_READ


# -- errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(make_frame(FRAME_BODY, 1, b"x" * 4089), id="frame-max-plus-one"),
        pytest.param(make_frame(FRAME_BODY, 1, b"abc")[:-1] + b"\x00", id="bad-frame-end"),
        pytest.param(make_frame(9, 1, b"abc"), id="unknown-type"),
        pytest.param(make_frame(0, 0, b""), id="type-zero"),
        pytest.param(b"HTTP/1.1 200 OK\r\n", id="text"),
        pytest.param(struct.pack(">BHI", 3, 1, 0xFFFFFFFF) + b"\xce", id="huge-size"),
    ],
)
def test_bad_frames_are_frame_error(data):
    with pytest.raises(ConnectionException) as raised:
        FrameReader(4096).feed(data)
    assert raised.value.code == ReplyCode.FRAME_ERROR
    assert raised.value.text.startswith("FRAME_ERROR - ")


def test_oversized_frame_is_refused_from_its_header_alone():
    """No need to buffer a frame that can never be valid."""
    data = make_frame(FRAME_BODY, 1, b"x" * 10000)
    with pytest.raises(ConnectionException) as raised:
        FrameReader(4096).feed(data[:7] + b"x")
    assert raised.value.code == ReplyCode.FRAME_ERROR


# -- properties on arbitrary bytes -----------------------------------------------------

frame_maxes = st.sampled_from([8, 9, 16, 64, 4096, 131072])


@st.composite
def nearly_frames(draw) -> bytes:
    """Byte streams made of frame-shaped pieces, some valid, some slightly off,
    so the reader's checks are reached far more often than by pure noise."""
    pieces = []
    for _ in range(draw(st.integers(0, 6))):
        frame_type = draw(st.sampled_from([*FRAME_TYPES, 0, 4, 206, 255]))
        payload = draw(st.binary(max_size=40))
        size = draw(st.one_of(st.just(len(payload)), st.integers(0, 2**32 - 1)))
        end = draw(st.sampled_from([FRAME_END, FRAME_END, FRAME_END, 0, 0xCD]))
        channel = draw(st.integers(0, 65535))
        pieces.append(struct.pack(">BHI", frame_type, channel, size) + payload + bytes((end,)))
    pieces.append(draw(st.binary(max_size=12)))
    return b"".join(pieces)


streams = st.one_of(st.binary(max_size=300), nearly_frames())


@st.composite
def cut_points(draw, data: bytes) -> list[int]:
    return sorted(draw(st.lists(st.integers(0, len(data)), max_size=10)))


@settings(max_examples=500, deadline=None)
@given(data=streams, frame_max=frame_maxes)
def test_arbitrary_bytes_give_consistent_frames_or_frame_error(data, frame_max):
    reader = FrameReader(frame_max)
    try:
        frames = reader.feed(data)
    except ConnectionException as error:
        assert error.code == ReplyCode.FRAME_ERROR
        return
    assert_consistent(frames, frame_max)
    consumed = sum(len(raw) for _, _, raw in frames)
    assert b"".join(raw for _, _, raw in frames) == data[:consumed]
    assert reader.buffered == len(data) - consumed
    # What is held back is never a complete frame.
    assert reader.buffered < FRAME_OVERHEAD or (
        int.from_bytes(data[consumed + 3 : consumed + 7]) + FRAME_OVERHEAD > reader.buffered
    )


@settings(max_examples=500, deadline=None)
@given(data=st.data(), stream=streams, frame_max=frame_maxes)
def test_any_chunking_gives_the_same_outcome(data, stream, frame_max):
    cuts = data.draw(cut_points(stream))
    whole = outcome(stream, frame_max, [])
    chunked = outcome(stream, frame_max, cuts)
    assert chunked == whole


@settings(max_examples=500, deadline=None)
@given(data=st.data(), stream=streams, frame_max=frame_maxes)
def test_splitter_gives_what_the_reader_gives(data, stream, frame_max):
    cuts = data.draw(cut_points(stream))
    assert outcome(stream, frame_max, cuts, FrameSplitter) == outcome(stream, frame_max, [])


def test_splitter_holds_back_only_the_frame_that_spans_reads():
    reader = FrameSplitter(1 << 20)
    first, second = body(10_000, 0x61), body(10_000, 0x62)
    frames = reader.split(first + second[:100])
    assert reader.buffered == 100
    frames += reader.split(second[100:] + HEARTBEAT_FRAME)
    assert reader.buffered == 0
    assert [bytes(frame) for _, _, frame in frames] == [first, second, HEARTBEAT_FRAME]


@st.composite
def valid_frames(draw, max_payload: int = 200) -> bytes:
    """Any frame type on any channel; a method frame's payload holds at
    least a method id."""
    frame_type = draw(st.sampled_from(FRAME_TYPES))
    least = 4 if frame_type == FRAME_METHOD else 0
    payload = draw(st.binary(min_size=least, max_size=max(least, max_payload)))
    return make_frame(frame_type, draw(st.integers(0, 65535)), payload)


@st.composite
def valid_streams(draw) -> list[bytes]:
    return draw(st.lists(valid_frames(), max_size=8))


@settings(max_examples=300, deadline=None)
@given(data=st.data(), stream=valid_streams())
def test_valid_stream_in_any_chunking_gives_every_frame(data, stream):
    joined = b"".join(stream)
    cuts = data.draw(cut_points(joined))
    reader = FrameReader(4096)
    frames = feed(reader, joined, cuts)
    assert [raw for _, _, raw in frames] == stream
    assert reader.buffered == 0
    assert_consistent(frames, 4096)


# -- byte-level edits ----------------------------------------------------------------


@given(original=valid_frames(max_payload=100), new=st.integers(0, 65535))
def test_rewrite_channel_changes_only_the_channel(original, new):
    rewritten = rewrite_channel(original, channel_bytes(new))
    assert rewritten == original[:1] + channel_bytes(new) + original[3:]
    assert FrameReader(4096).feed(rewritten) == [(original[0], new, rewritten)]


@settings(max_examples=300, deadline=None)
@given(
    payload=st.binary(min_size=1, max_size=20000),
    old=st.integers(0, 65535),
    new=st.integers(0, 65535),
    frame_max=st.one_of(st.integers(9, 64), st.sampled_from([4096, 4097, 8192, 131072])),
)
def test_split_body_reassembles_within_frame_max(payload, old, new, frame_max):
    frames = split_body(make_frame(FRAME_BODY, old, payload), channel_bytes(new), frame_max)
    assert frames
    assert all(len(raw) <= frame_max for raw in frames)
    parsed = FrameReader(frame_max).feed(b"".join(frames))
    assert [raw for _, _, raw in parsed] == frames
    assert all(frame_type == FRAME_BODY and channel == new for frame_type, channel, _ in parsed)
    assert all(len(raw) > FRAME_OVERHEAD for raw in frames)
    assert b"".join(raw[7:-1] for raw in frames) == payload
    # As few frames as frame_max allows: all but the last are full.
    assert all(len(raw) == frame_max for raw in frames[:-1])


def test_split_body_of_a_small_frame_is_one_frame_on_the_new_channel():
    original = make_frame(FRAME_BODY, 5, b"abc")
    assert split_body(original, channel_bytes(9), 4096) == [make_frame(FRAME_BODY, 9, b"abc")]


# -- routing a broker's stream (cut_routed) ---------------------------------------------


def deliver(channel: int) -> bytes:
    return frame.marshal(
        commands.Basic.Deliver(consumer_tag="c", delivery_tag=1, exchange="", routing_key="q"),
        channel,
    )


@st.composite
def broker_streams(draw) -> list[bytes]:
    """Frames as a broker sends them, on a few channels: deliveries and
    their content, large bodies, a method the proxy watches (CloseOk) and
    one it need not see (a confirm's Ack)."""
    channel = st.integers(0, 3)
    return draw(
        st.lists(
            st.one_of(
                st.builds(deliver, channel),
                st.builds(lambda ch: frame.marshal(commands.Channel.CloseOk(), ch), channel),
                st.builds(make_frame, st.just(FRAME_HEADER), channel, st.binary(max_size=30)),
                st.builds(
                    make_frame,
                    st.just(FRAME_BODY),
                    channel,
                    st.one_of(st.binary(max_size=30), st.just(b"b" * (LARGE_BODY + 1))),
                ),
                st.just(HEARTBEAT_FRAME),
            ),
            max_size=12,
        )
    )


WATCHED = frozenset((commands.Channel.CloseOk.index,))


def expected_routing(frames: list, routes: dict) -> list:
    """What cut_routed must give, frame by frame: (whom to, renumbered
    frame) for a routed one, ("proxy", frame) for the rest."""
    pieces = []
    for frame_type, channel, raw in frames:
        route = routes.get(channel)
        index = int.from_bytes(raw[7:11]) if frame_type == FRAME_METHOD else None
        if route is None or index in WATCHED:
            pieces.append(("proxy", bytes(raw)))
        else:
            high, low, target = route
            pieces.append((target, bytes(raw[:1]) + bytes((high, low)) + bytes(raw[3:])))
    return pieces


def merged(pieces: list) -> list:
    """Consecutive pieces for one client joined: how they reach its socket."""
    out = []
    for whom, data in pieces:
        if out and whom != "proxy" and out[-1][0] == whom:
            out[-1] = (whom, out[-1][1] + data)
        else:
            out.append((whom, data))
    return out


def routing_examples(test):
    """Broker streams, some of whose channels (1 to 3) are routed to clients."""
    examples = given(
        stream=broker_streams(), routed_channels=st.sets(st.integers(1, 3)), data=st.data()
    )
    return settings(max_examples=300, deadline=None)(examples(test))


def client_routes(channels: set[int]) -> dict:
    """Channel n goes to "client n" as channel 100 + n."""
    return {ch: (0, 100 + ch, f"client {ch}") for ch in channels}


@routing_examples
def test_routing_gives_each_client_its_frames_renumbered_and_the_proxy_the_rest_in_order(
    stream, routed_channels, data
):
    routes = client_routes(routed_channels)
    joined = b"".join(stream)
    frames, _ = cut(joined, 0, len(joined), 131072, 0)
    next_frame = make_frame(FRAME_BODY, 1, b"next")
    buf = bytearray(joined + next_frame[: data.draw(st.integers(0, len(next_frame) - 1))])
    items, pos, routed, deliveries = cut_routed(buf, 0, len(buf), 131072, 0, routes, WATCHED)
    assert pos == len(joined)
    pieces = [
        (whom, bytes(raw)) if kind == ROUTED else ("proxy", bytes(raw)) for kind, whom, raw in items
    ]
    assert merged(pieces) == merged(expected_routing(frames, routes))
    assert routed == sum(1 for whom, _ in expected_routing(frames, routes) if whom != "proxy")
    assert deliveries == sum(
        1
        for frame_type, channel, raw in frames
        if channel in routes
        and frame_type == FRAME_METHOD
        and int.from_bytes(raw[7:11]) in DELIVERIES
    )


@routing_examples
def test_routing_through_the_reader_in_any_chunking_gives_what_the_whole_stream_gives(
    stream, routed_channels, data
):
    """Reads of any size, with earlier pieces still held (as a slow client's
    transport holds them) while the reader reuses or replaces its buffer:
    no piece handed out changes, and the pieces are the same."""
    routes = client_routes(routed_channels)
    joined = b"".join(stream)
    frames, _ = cut(joined, 0, len(joined), 131072, 0)
    reader = FrameReader(131072)
    pieces, kept = [], []
    start = 0
    for point in [*data.draw(cut_points(joined)), len(joined)]:
        chunk = joined[start:point]
        start = point
        while chunk:
            space = reader.get_buffer()
            taken = min(len(space), len(chunk))
            space[:taken] = chunk[:taken]
            space.release()
            chunk = chunk[taken:]
            items, _, _ = reader.routed(taken, routes, WATCHED)
            kept.extend((kind, whom, raw, bytes(raw)) for kind, whom, raw in items)
    for kind, whom, raw, copy in kept:
        assert bytes(raw) == copy, "a piece handed out was written over"
        pieces.append((whom, copy) if kind == ROUTED else ("proxy", copy))
    assert merged(pieces) == merged(expected_routing(frames, routes))
    assert reader.buffered == 0


@settings(max_examples=500, deadline=None)
@given(stream=streams, frame_max=frame_maxes, routed_channels=st.sets(st.integers(0, 65535)))
def test_routing_refuses_what_cut_refuses(stream, frame_max, routed_channels):
    routes = {ch: (0, 1, "client") for ch in routed_channels}

    def result(fn, *args):
        try:
            return fn(bytearray(stream), 0, len(stream), frame_max, *args)[1]
        except ConnectionException as error:
            return error.code, error.text

    assert result(cut_routed, 0, routes, WATCHED) == result(cut, 0)


@pytest.mark.parametrize("payload", [b"", b"\x00", b"\x00\x3c", b"\x00\x3c\x00"])
def test_method_frame_without_a_method_id_is_the_brokers_frame_error(payload):
    data = make_frame(FRAME_METHOD, 1, payload) + HEARTBEAT_FRAME
    octets = ",".join(map(str, payload))
    for reading in (
        lambda: FrameReader(4096).feed(data),
        lambda: cut_routed(bytearray(data), 0, len(data), 4096, 0, {1: (0, 2, "c")}, WATCHED),
    ):
        with pytest.raises(ConnectionException) as raised:
            reading()
        assert raised.value.code == ReplyCode.FRAME_ERROR
        assert (
            raised.value.text == f"FRAME_ERROR - type 1, all octets = <<{octets}>>: unknown_frame"
        )


def test_bodies_held_as_views_pin_little_more_than_themselves():
    """A body handed out as a view pins its buffer; the next read still goes
    into what is left of it, so 200 reads of one 3 KB body each (a slow
    client holding them all) pin a few buffers, not one apiece."""
    reader = FrameReader(131072)
    kept = []
    frame = body(3000, 0x62)
    for _ in range(200):
        space = reader.get_buffer()
        space[: len(frame)] = frame
        space.release()
        kept.extend(reader.frames(len(frame)))
    pinned = {id(raw.obj): len(raw.obj) for _, _, raw in kept}
    assert all(bytes(raw) == frame for _, _, raw in kept)
    assert sum(pinned.values()) < 2 * 200 * len(frame)
