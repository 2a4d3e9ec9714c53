"""A whole publish checked and renumbered (amqplex/worker/whole_publish.py):
the compiled check (_walk.whole_publish) against the Python reference, on
publishes as pamqp encodes them, bent and cut, and on frames of nearly the
right shape: the same bytes wherever the compiled one takes a message, and
every message the reference takes but a headers table taken."""

from __future__ import annotations

import datetime
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import body, commands, frame, header

from amqplex.protocol import constants, content, framing
from amqplex.protocol.errors import ConnectionException
from amqplex.worker import whole_publish

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
