"""The compiled frame walkers (amqplex/protocol/_walk.c) against framing.py's
Python ones, the reference: on arbitrary bytes and on broker-like streams,
the same frames (bytes or memoryview alike), the same position, the same
bytes left in the buffer, the same counts, or the same FRAME_ERROR."""

from __future__ import annotations

import struct
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amqplex.protocol import constants, framing
from amqplex.protocol.errors import ConnectionException
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
    assert walk.FRAME_OVERHEAD == constants.FRAME_OVERHEAD
    assert walk.METHOD_ID_SIZE == framing._METHOD_ID_SIZE
    frame_types = (walk.FRAME_METHOD, walk.FRAME_HEADER, walk.FRAME_BODY, walk.FRAME_HEARTBEAT)
    assert frame_types == (
        constants.FRAME_METHOD,
        constants.FRAME_HEADER,
        constants.FRAME_BODY,
        constants.FRAME_HEARTBEAT,
    )


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
    # The compiled walker keeps the last set's indices: another set, or an
    # equal set that is another object, must be read anew.
    watched=st.sampled_from([WATCHED, frozenset(), frozenset(WATCHED), set(WATCHED)]),
)
def test_cut_routed_gives_and_rewrites_what_the_reference_does(
    data, frame_max, routed_channels, high, watched
):
    routes = {ch: (high, 100 + ch, f"client {ch}") for ch in routed_channels}

    def walk(walker):
        return outcome(walker, bytearray(data), 0, len(data), frame_max, 0, routes, watched)

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
