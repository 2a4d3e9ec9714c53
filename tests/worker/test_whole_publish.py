"""A whole publish checked and renumbered (amqplex/worker/whole_publish.py):
the compiled check (_walk.whole_publishes on one message) against the
Python reference, on
publishes as pamqp encodes them, bent and cut, and on frames of nearly the
right shape: the same bytes wherever the compiled one takes a message, and
every message the reference takes but a headers table taken; and the
compiled run of them (_walk.whole_publishes) against the same check made
message by message."""

from __future__ import annotations

import datetime
import struct

import pika
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import body, commands, frame, header

from amqplex.protocol import constants, content, framing
from amqplex.protocol.errors import ConnectionException
from amqplex.worker import quiet, whole_publish
from tests.conftest import broker_params
from tests.support.rawclient import RawClient, body_frame
from tests.support.waiting import wait_until

_WIDTH_OF_KIND = {"shortstr": 0, "table": -1, "octet": 1, "timestamp": 8}


def test_the_compiled_publish_check_walks_contents_property_layout():
    expected = tuple((mask, _WIDTH_OF_KIND[kind]) for mask, kind in content._LAYOUT)
    assert expected == framing._walk.PROPERTY_LAYOUT


def compiled_one(method: bytes, header: bytes, body: bytes, uid: bytes) -> bytes | None:
    """The compiled check on one message: whole_publishes over it alone."""
    frames = [(constants.FRAME_METHOD, 1, method), (constants.FRAME_HEADER, 1, header)]
    frames.append((constants.FRAME_BODY, 1, body))
    pieces, end, *_ = framing._walk.whole_publishes(frames, 0, 1, uid)
    return pieces[0] if end == len(frames) else None


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
    routing_key = draw(
        st.text(max_size=8)
        | st.sampled_from(
            ["amq.rabbitmq.reply-to", "amq.rabbitmq", "amq.rabbitmq.", "amq.rabbitmq.reply-to.x.y"]
        )
    )
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
        expiration=draw(
            st.none() | st.sampled_from(["", "60000", "0", "1e3", "007", "1234567890", " 5"])
        ),
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


@settings(max_examples=500, deadline=None)
@given(whole_publishes(), st.binary(min_size=2, max_size=2))
def test_whole_publish_gives_what_the_reference_gives_and_takes_all_it_can(frames, uid):
    """Bytes only where the reference gives the same bytes; None, leaving
    it to the reference, only for what the reference refuses or leaves to
    the frame-by-frame path, or for a headers table."""
    method, content_header, content_body = frames
    compiled = compiled_one(method, content_header, content_body, uid)
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


@settings(max_examples=1000, deadline=None)
@given(near_publishes())
def test_whole_publish_of_nearly_right_frames_gives_what_the_reference_gives(frames):
    method, content_header, content_body = frames
    uid = b"\x00\x07"
    compiled = compiled_one(method, content_header, content_body, uid)
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
        piece = compiled_one(method, content_header, content_body, b"\x01\x02")
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
    assert compiled_one(method, content_header, content_body, b"\x00\x01") is None
    assert (
        whole_publish.reference_renumber(method, content_header, content_body, b"\x00\x01")
        is not None
    )


def runs_reference(
    frames: list, start: int, channel: int, uid: bytes
) -> tuple[list[bytes | memoryview], int, bool, bool, int]:
    """_walk.whole_publishes in Python: the run of publishes on `channel`
    from frames[start], each with its header and one body frame, as far as
    the compiled check takes them one at a time; whether any was mandatory or
    not quiet (quiet.py), and the largest body. A body left a memoryview
    (cut() leaves large ones so) goes on as a view of its payload after its
    message's piece, which ends with the body's 7-byte header."""
    pieces = []
    taken = []
    while start + 2 < len(frames):
        parts = frames[start : start + 3]
        if [(kind, on) for kind, on, _ in parts] != [(1, channel), (2, channel), (3, channel)]:
            break
        method, header, body = (frame for _, _, frame in parts)
        if not (type(method) is type(header) is bytes and type(body) in (bytes, memoryview)):
            break
        piece = compiled_one(method, header, bytes(body), uid)
        if piece is None:
            break
        if type(body) is memoryview:
            payload = len(body) - constants.FRAME_HEADER_SIZE
            pieces += [piece[:-payload], body[constants.FRAME_HEADER_SIZE :]]
        else:
            pieces.append(piece)
        taken += [method, header, body]
        start += 3
    methods, headers, bodies = taken[::3], taken[1::3], taken[2::3]
    return (
        pieces,
        start,
        any(whole_publish.mandatory(frame) for frame in methods),
        not all(map(quiet.quiet_method, methods)) or not all(map(quiet.quiet_header, headers)),
        max((len(body) - constants.FRAME_OVERHEAD for body in bodies), default=-1),
    )


def _as_cut(raw: bytes) -> tuple:
    """A frame as cut() hands it on: (type, channel, frame)."""
    return (raw[0], raw[1] << 8 | raw[2], raw) if len(raw) >= 3 else (raw[:1] or 0, 0, raw)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(whole_publishes(), max_size=6),
    st.lists(st.integers(0, 17), max_size=3),
    st.integers(1, 3),
    st.binary(min_size=2, max_size=2),
    st.lists(st.booleans(), max_size=6),
)
def test_a_run_of_publishes_is_taken_as_the_check_takes_them_one_by_one(
    messages, cuts, channel, uid, viewed
):
    """Runs of publishes (mixed channels, bent ones, frames missing where
    `cuts` says, bodies left views where `viewed` says): the same pieces,
    the same stopping place, the same mandatory and quiet flags and largest
    body as the one-message check and quiet.py, from every starting index."""
    frames = [_as_cut(raw) for message in messages for raw in message]
    bodies = [at for at, (kind, _, _) in enumerate(frames) if kind == constants.FRAME_BODY]
    for at, view in zip(bodies, viewed, strict=False):  # as many views as drawn
        if view:
            kind, on, raw = frames[at]
            frames[at] = (kind, on, memoryview(raw))
    for at in sorted(set(cuts), reverse=True):
        del frames[at : at + 1]
    for start in range(len(frames) + 1):
        assert framing._walk.whole_publishes(frames, start, channel, uid) == runs_reference(
            frames, start, channel, uid
        )


def test_a_run_takes_a_body_left_as_a_view_as_a_view_and_stops_at_another_channel():
    def publish(channel: int) -> list[tuple]:
        raws = [
            frame.marshal(commands.Basic.Publish(routing_key="q"), channel),
            frame.marshal(header.ContentHeader(0, 3, commands.Basic.Properties()), channel),
            frame.marshal(body.ContentBody(b"abc"), channel),
        ]
        return [_as_cut(raw) for raw in raws]

    viewed = publish(1)
    read = bytearray(viewed[2][2])  # the payload must stay where it was read
    viewed[2] = (3, 1, memoryview(read))
    frames = publish(1) + viewed + publish(1)
    pieces, end, mandatory, unsettled, largest = framing._walk.whole_publishes(
        frames, 0, 1, b"\x00\x07"
    )
    assert (len(pieces), end, mandatory, unsettled, largest) == (4, 9, False, False, 3)
    assert type(pieces[2]) is memoryview and pieces[2].obj is read
    assert pieces[1].endswith(b"\x03\x00\x07\x00\x00\x00\x03")  # the body's header
    assert b"".join(pieces) == 3 * b"".join(pieces[:1])
    assert framing._walk.whole_publishes(publish(1) + publish(2), 0, 1, b"\x00\x07")[1] == 3


def _strided(raw: bytes) -> memoryview:
    """A view showing `raw`'s octets, every other one of its buffer's."""
    view = memoryview(bytes(octet for pair in zip(raw, raw, strict=True) for octet in pair))[::2]
    assert view == raw
    return view


def _released(raw: bytes) -> memoryview:
    view = memoryview(raw)
    view.release()
    return view


def test_a_run_takes_nothing_from_what_is_not_a_run_of_cut_tuples():
    """Whatever the list holds or the arguments say, the compiled run takes
    no message it cannot vouch for, raises for no frame, and leaves no error
    set: a start outside the list, a uid not two octets, items that are not
    cut()'s (type, channel, bytes) triples, ints that only look like them,
    a body that is a view of anything but octets in a row, or released."""
    whole = [
        _as_cut(frame.marshal(commands.Basic.Publish(routing_key="q"), 1)),
        _as_cut(frame.marshal(header.ContentHeader(0, 3, commands.Basic.Properties()), 1)),
        _as_cut(frame.marshal(body.ContentBody(b"abc"), 1)),
    ]
    run = framing._walk.whole_publishes
    assert run(whole, 0, 1, b"\x00\x07")[1] == 3  # the control: it is whole
    for frames, start, uid in (
        (whole, -1, b"\x00\x07"),
        (whole, 1, b"\x00\x07"),
        (whole, 3, b"\x00\x07"),
        (whole, 2**40, b"\x00\x07"),
        (whole, 0, b"\x07"),
        (whole, 0, b"\x00\x00\x07"),
        ([list(item) for item in whole], 0, b"\x00\x07"),
        ([(*item, None) for item in whole], 0, b"\x00\x07"),
        ([(t, c, bytearray(f)) for t, c, f in whole], 0, b"\x00\x07"),
        ([(t, bool(c), f) for t, c, f in whole], 0, b"\x00\x07"),  # True == 1, not an int
        ([(t, c + 2**64, f) for t, c, f in whole], 0, b"\x00\x07"),
        ([(t, 2**70, f) for t, _, f in whole], 0, b"\x00\x07"),
        (whole[:2] + [(3, 1, _released(whole[2][2]))], 0, b"\x00\x07"),
        (whole[:2] + [(3, 1, memoryview(whole[2][2]).cast("c"))], 0, b"\x00\x07"),
        (whole[:2] + [(3, 1, _strided(whole[2][2]))], 0, b"\x00\x07"),
        (
            whole[:2] + [(3, 1, memoryview(whole[2][2]).cast("B", (1, len(whole[2][2]))))],
            0,
            b"\x00\x07",
        ),
    ):
        assert run(frames, start, 1, uid) == ([], start, False, False, -1), (frames, start, uid)
    for arguments in ((whole, 0, 1), (tuple(whole), 0, 1, b"\x00\x07"), (whole, 0, 1, "ab")):
        with pytest.raises(TypeError):
            run(*arguments)
    with pytest.raises(OverflowError):
        run(whole, 2**70, 1, b"\x00\x07")


def test_large_messages_streamed_in_one_write_arrive_whole_and_in_order(amqplexd, queue_name):
    """Bodies over LARGE_BODY come out of cut() as views of the read and go
    upstream as views in the compiled run: a stream of them, some whole in
    a read and some across reads, each body its own, reaches the queue
    intact and in order (and a publish with a headers table among them,
    which the run leaves to the frame-by-frame path, in its place)."""
    size = 3 * framing.LARGE_BODY + 7
    bodies = [bytes([n]) * size + b"%04d" % n for n in range(40)]
    stream = b""
    for n, payload in enumerate(bodies):
        properties = commands.Basic.Properties(headers={"n": n} if n == 17 else None)
        stream += frame.marshal(commands.Basic.Publish(routing_key=queue_name), 1)
        stream += frame.marshal(header.ContentHeader(0, len(payload), properties), 1)
        stream += body_frame(1, payload)
    with RawClient(amqplexd.port) as client:
        client.handshake()
        client.open_channel(1)
        client.method(1, commands.Queue.Declare(queue=queue_name))
        client.expect(commands.Queue.DeclareOk)
        client.send(stream)
        client.method(1, commands.Channel.Close(200, "", 0, 0))
        client.expect(commands.Channel.CloseOk)
    connection = pika.BlockingConnection(broker_params())
    try:
        channel = connection.channel()
        wait_until(
            lambda: (
                channel.queue_declare(queue_name, passive=True).method.message_count == len(bodies)
            ),
            what=f"{len(bodies)} messages in the queue",
        )
        got = []
        while (message := channel.basic_get(queue_name, auto_ack=True))[0] is not None:
            got.append(message[2])
        assert got == bodies
    finally:
        connection.close()
