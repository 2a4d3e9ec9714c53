"""The compiled frame walkers (amqplex/protocol/_walk.c) against framing.py's
Python ones, the reference: on arbitrary bytes and on broker-like streams,
the same frames (bytes or memoryview alike), the same position, the same
bytes left in the buffer, the same counts, or the same FRAME_ERROR."""

from __future__ import annotations

import datetime
import struct
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import body, commands, frame, header

from amqplex.protocol import constants, content, framing
from amqplex.protocol.errors import ConnectionException
from amqplex.worker import whole_publish
from tests.protocol.test_framing import (
    FRAME_TYPES,
    WATCHED,
    broker_streams,
    frame_maxes,
    make_frame,
    streams,
)


def test_the_compiled_walkers_are_built_and_serve():
    assert framing._walk is not None, "setup.py could not build _walk.c: is gcc installed?"
    assert framing.cut is not framing.reference_cut
    assert framing.cut_routed is not framing.reference_cut_routed


def test_the_compiled_walkers_share_framings_constants():
    walk = framing._walk
    assert walk.LARGE_BODY == framing.LARGE_BODY
    assert walk.ROUTED == framing.ROUTED
    assert walk.FRAME_END == constants.FRAME_END
    assert walk.FRAME_HEADER_SIZE == constants.FRAME_HEADER_SIZE


def outcome(walker, buf, *args) -> tuple:
    """What a walk gives, comparable across the two walkers: each item with
    the kind of object its bytes come in, and the buffer afterwards; or the
    error."""
    try:
        result = walker(buf, *args)
    except ConnectionException as error:
        return ("refused", error.code, error.text)
    items = [(first, second, type(raw).__name__, bytes(raw)) for first, second, raw in result[0]]
    return (items, *result[1:], bytes(buf))


@st.composite
def mixed_streams(draw) -> bytes:
    """Valid frames of every type (large bodies among them) with noise,
    shorn frames or a bad end octet somewhere, at any offset."""
    pieces = [draw(st.binary(max_size=3))]
    for _ in range(draw(st.integers(0, 8))):
        frame_type = draw(st.sampled_from(FRAME_TYPES))
        payload = draw(
            st.one_of(
                st.binary(min_size=4, max_size=30),
                st.just(b"b" * (framing.LARGE_BODY + draw(st.integers(0, 2)))),
            )
        )
        pieces.append(make_frame(frame_type, draw(st.integers(0, 4)), payload))
    data = b"".join(pieces)
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return data


walked_streams = st.one_of(streams, mixed_streams())
kinds = st.sampled_from([bytes, bytearray, memoryview])


@settings(max_examples=600, deadline=None)
@given(
    data=walked_streams,
    frame_max=frame_maxes,
    slack=st.sampled_from([0, 8]),
    kind=kinds,
    start=st.integers(0, 12),
)
def test_cut_gives_what_the_reference_gives(data, frame_max, slack, kind, start):
    frame_max = max(frame_max, 4096) if len(data) > 2000 else frame_max
    start = min(start, len(data))

    def walk(walker):
        buf = kind(bytearray(data)) if kind is memoryview else kind(data)
        return outcome(walker, buf, start, len(data), frame_max, slack)

    assert walk(framing.cut) == walk(framing.reference_cut)


@settings(max_examples=600, deadline=None)
@given(
    data=st.one_of(walked_streams, broker_streams().map(b"".join)),
    frame_max=st.sampled_from([16, 4096, 131072]),
    routed_channels=st.sets(st.integers(0, 4)),
    high=st.integers(0, 255),
)
def test_cut_routed_gives_and_rewrites_what_the_reference_does(
    data, frame_max, routed_channels, high
):
    routes = {ch: (high, 100 + ch, f"client {ch}") for ch in routed_channels}

    def walk(walker):
        return outcome(walker, bytearray(data), 0, len(data), frame_max, 0, routes, WATCHED)

    assert walk(framing.cut_routed) == walk(framing.reference_cut_routed)


def test_a_walk_leaves_its_buffer_free_to_grow():
    """The walker gives back the buffer it borrowed: a bytearray with a view
    still exported cannot be resized (BufferError)."""
    buf = bytearray(make_frame(constants.FRAME_BODY, 1, b"x" * 10) * 3)
    framing.cut(buf, 0, len(buf), 4096, 0)
    framing.cut_routed(buf, 0, len(buf), 4096, 0, {1: (0, 2, "c")}, WATCHED)
    buf.extend(b"more")
    assert len(buf) == 3 * 18 + 4


def test_a_large_body_piece_keeps_the_buffer_viewed():
    """FrameReader reuses its buffer only when no piece of it is alive
    (framing._viewed, by refcount): a large body's memoryview must hold it."""
    body = make_frame(constants.FRAME_BODY, 1, b"b" * (framing.LARGE_BODY + 1))
    buf = bytearray(body)
    items, _, _, _ = framing.cut_routed(buf, 0, len(buf), 131072, 0, {1: (0, 2, "c")}, WATCHED)
    assert type(items[0][2]) is memoryview
    assert framing._viewed(sys.getrefcount(buf))
    del items
    assert not framing._viewed(sys.getrefcount(buf))


@pytest.mark.parametrize(("pos", "end"), [(0, 9), (-1, 8), (5, 4)])
def test_pos_and_end_outside_the_buffer_are_refused(pos, end):
    data = struct.pack(">BHI", constants.FRAME_HEARTBEAT, 0, 0) + b"\xce"
    with pytest.raises(ValueError, match="within the buffer"):
        framing._walk.cut(data, pos, end, 4096, 0)


def test_the_compiled_walker_has_room_for_every_watched_method():
    from amqplex.worker.upstream import _WATCHED

    assert len(_WATCHED) <= framing._walk.MAX_INDICES
    assert len(framing.DELIVERIES) <= framing._walk.MAX_INDICES


class OctetThatEmptiesTheRoutes:
    """An octet whose conversion runs Python code that drops the route it is in."""

    def __init__(self, routes: dict) -> None:
        self.routes = routes

    def __index__(self) -> int:
        self.routes.clear()
        return 7


def test_a_route_dropped_while_it_is_read_is_still_applied_as_the_reference_does():
    data = make_frame(constants.FRAME_BODY, 1, b"x" * 10)

    def walk(walker):
        routes: dict = {}
        routes[1] = (OctetThatEmptiesTheRoutes(routes), 2, "client")
        return outcome(walker, bytearray(data), 0, len(data), 4096, 0, routes, WATCHED)

    assert walk(framing.cut_routed) == walk(framing.reference_cut_routed)


# -- whole_publish: a whole publish checked and renumbered -------------------

_WIDTH_OF_KIND = {"shortstr": 0, "table": -1, "octet": 1, "timestamp": 8}


def test_the_compiled_publish_check_walks_contents_property_layout():
    expected = tuple((mask, _WIDTH_OF_KIND[kind]) for mask, kind in content._LAYOUT)
    assert expected == framing._walk.PROPERTY_LAYOUT


def publish_outcome(frame: bytes, header: bytes, body: bytes, uid: bytes) -> tuple:
    try:
        return ("ok", whole_publish.reference_renumber(frame, header, body, uid))
    except ConnectionException as error:
        return ("refused", error.code)
    except struct.error:  # a method frame too short for its id: the session refuses it first
        return ("refused", None)


@st.composite
def whole_publishes(draw) -> tuple[bytes, bytes, bytes]:
    """Publish, content header and one body frame as clients send them, with
    any property list pamqp encodes; some of them then bent out of shape."""
    channel = draw(st.integers(1, 3))
    exchange = draw(st.sampled_from(["", "amq.direct", "x"]))
    routing_key = draw(st.text(max_size=8))
    publish = commands.Basic.Publish(
        exchange=exchange,
        routing_key=routing_key,
        mandatory=draw(st.booleans()),
        immediate=draw(st.integers(0, 5)) == 0,
    )
    method = frame.marshal(publish, channel)
    properties = commands.Basic.Properties(
        content_type=draw(st.none() | st.text(max_size=5)),
        headers=draw(
            st.none() | st.dictionaries(st.text(max_size=3), st.integers(0, 9), max_size=2)
        ),
        delivery_mode=draw(st.none() | st.integers(1, 2)),
        priority=draw(st.none() | st.integers(0, 9)),
        correlation_id=draw(st.none() | st.text(max_size=5)),
        reply_to=draw(st.none() | st.text(max_size=5)),
        expiration=draw(st.none() | st.sampled_from(["", "60000"])),
        message_id=draw(st.none() | st.text(max_size=5)),
        timestamp=draw(st.none() | st.datetimes(min_value=datetime.datetime(2000, 1, 1))),
        message_type=draw(st.none() | st.text(max_size=5)),
        user_id=draw(st.none() | st.sampled_from(["guest"])),
        app_id=draw(st.none() | st.text(max_size=5)),
    )
    size = draw(st.integers(0, 40))
    announced = draw(st.sampled_from([size, size, size, size + 1, 0]))
    content_header = frame.marshal(header.ContentHeader(0, announced, properties), channel)
    content_body = frame.marshal(body.ContentBody(bytes(size)), channel)
    parts = [method, content_header, content_body]
    if draw(st.booleans()):  # bend one octet of one frame
        which = draw(st.integers(0, 2))
        at = draw(st.integers(0, len(parts[which]) - 1))
        bent = bytearray(parts[which])
        bent[at] = draw(st.integers(0, 255))
        parts[which] = bytes(bent)
    if draw(st.integers(0, 9)) == 0:  # cut one short
        which = draw(st.integers(0, 2))
        parts[which] = parts[which][: draw(st.integers(0, len(parts[which])))]
    return tuple(parts)


@settings(max_examples=1500, deadline=None)
@given(whole_publishes(), st.binary(min_size=2, max_size=2))
def test_whole_publish_gives_what_the_reference_gives_and_takes_all_it_can(frames, uid):
    """Bytes only where the reference gives the same bytes; None, leaving
    it to the reference, only for what the reference refuses or leaves to
    the frame-by-frame path, or for a headers table."""
    method, content_header, content_body = frames
    compiled = framing._walk.whole_publish(method, content_header, content_body, uid)
    expected = publish_outcome(method, content_header, content_body, uid)
    if compiled is not None:
        assert expected == ("ok", compiled)
    elif expected[0] == "ok" and expected[1] is not None:
        flags = struct.unpack_from(">H", content_header, constants.FRAME_HEADER_SIZE + 12)[0]
        assert flags & 0x2000, "a publish the compiled check should have taken"


# A publish's frame header, method id and ticket; a content header's frame
# header, class and weight: what the compiled check looks for first.
_PUBLISH_START = bytes.fromhex("01000100000000003c00280000")
_HEADER_START = bytes.fromhex("02000100000000003c0000")


@st.composite
def near_publishes(draw) -> tuple[bytes, bytes, bytes]:
    """A publish and a content header that start as they should, then
    arguments and properties of the right shape, of nearly the right shape,
    or arbitrary; a body of any length, announced or not."""
    exchange, routing_key = draw(st.binary(max_size=4)), draw(st.binary(max_size=6))

    def length_octet(right: int) -> int:
        return draw(st.sampled_from([right, right, right + 1, max(right - 1, 0), 255]))

    arguments = (
        bytes([length_octet(len(exchange))])
        + exchange
        + bytes([length_octet(len(routing_key))])
        + routing_key
        + bytes([draw(st.sampled_from([0, 1, 2, 3])) | draw(st.sampled_from([0, 0, 0xFC]))])
        + draw(st.sampled_from([b"\xce", b"\xce", b"", b"\xce\xce"]))
    )
    if draw(st.integers(0, 4)) == 0:
        arguments = draw(st.binary(max_size=16))
    content_body = draw(st.binary(min_size=9, max_size=24))
    size = len(content_body) - constants.FRAME_OVERHEAD if draw(st.booleans()) else 7
    flags = draw(st.integers(0, 0xFFFF)) & draw(st.sampled_from([0xFFFF, 0xDFFC, 0x9040, 0]))
    listed = b""
    for mask, width in framing._walk.PROPERTY_LAYOUT:
        if flags & mask:
            value = draw(
                st.binary(min_size=width, max_size=width) if width > 0 else st.binary(max_size=3)
            )
            listed += value if width > 0 else bytes([length_octet(len(value))]) + value
    if draw(st.integers(0, 4)) == 0:
        listed = draw(st.binary(max_size=12))
    listed += draw(st.sampled_from([b"", b"", b"\x00"]))  # or one octet too many
    properties = struct.pack(">H", flags) + listed + b"\xce"
    content_header = _HEADER_START + struct.pack(">Q", size) + properties
    return _PUBLISH_START + arguments, content_header, content_body


@settings(max_examples=2000, deadline=None)
@given(near_publishes())
def test_whole_publish_of_nearly_right_frames_gives_what_the_reference_gives(frames):
    method, content_header, content_body = frames
    uid = b"\x00\x07"
    compiled = framing._walk.whole_publish(method, content_header, content_body, uid)
    if compiled is not None:
        assert publish_outcome(method, content_header, content_body, uid) == ("ok", compiled)


def test_whole_publish_takes_the_publishes_clients_send():
    """Plain, persistent with a content type, mandatory: all compiled."""
    for properties, mandatory in (
        (commands.Basic.Properties(), False),
        (commands.Basic.Properties(content_type="application/json", delivery_mode=2), False),
        (commands.Basic.Properties(message_id="m-1", app_id="php"), True),
    ):
        method = frame.marshal(commands.Basic.Publish(routing_key="q", mandatory=mandatory), 1)
        content_header = frame.marshal(header.ContentHeader(0, 5, properties), 1)
        content_body = frame.marshal(body.ContentBody(b"hello"), 1)
        piece = framing._walk.whole_publish(method, content_header, content_body, b"\x01\x02")
        assert piece is not None
        assert piece == whole_publish.reference_renumber(
            method, content_header, content_body, b"\x01\x02"
        )
        assert whole_publish.mandatory(method) is mandatory


def test_whole_publish_leaves_a_headers_table_to_the_reference():
    properties = commands.Basic.Properties(headers={"x": 1})
    method = frame.marshal(commands.Basic.Publish(routing_key="q"), 1)
    content_header = frame.marshal(header.ContentHeader(0, 1, properties), 1)
    content_body = frame.marshal(body.ContentBody(b"x"), 1)
    assert framing._walk.whole_publish(method, content_header, content_body, b"\x00\x01") is None
    assert whole_publish.renumber(method, content_header, content_body, b"\x00\x01") is not None
