"""An upstream's writes: the channels of one flush take turns, each in its
own order and with a message's frames together (writer.interleaved), so a
long run of one client's messages does not hold the broker's connection
back for the others."""

from __future__ import annotations

import asyncio
import concurrent.futures
import struct
import threading
import uuid

import pika
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pamqp import commands, header
from pamqp import frame as pamqp_frame

from amqplex.protocol.constants import FRAME_BODY
from amqplex.worker import writer
from amqplex.worker.writer import TURN, BatchedWriter, interleaved
from tests.conftest import broker_params
from tests.support.certs import listener_env
from tests.support.rawclient import RawClient, body_frame
from tests.support.relay import UP
from tests.support.waiting import wait_until

PUBLISH = struct.pack(">I", commands.Basic.Publish.index)
QUEUE_DELETE = struct.pack(">I", commands.Queue.Delete.index)
CONNECTION_CLOSE = struct.pack(">I", commands.Connection.Close.index)


def frame(frame_type: int, channel: int, tag: int, method: bytes = PUBLISH) -> bytes:
    """A stand-in frame: its type, channel and, for a method frame, method
    ids where a frame has them, and a tag to tell it apart."""
    payload = (method if frame_type == 1 else b"") + struct.pack(">I", tag)
    return struct.pack(">BHI", frame_type, channel, len(payload)) + payload


def message(channel: int, tag: int, bodies: int = 1, viewed: bool = False) -> list:
    """A publish as the writer gets it: the method frame, the content header
    and the body frames; a large body as its header then its payload."""
    pieces = [frame(1, channel, tag), frame(2, channel, tag)]
    for _ in range(bodies):
        if viewed:
            pieces += [frame(3, channel, tag), memoryview(b"payload")]
        else:
            pieces.append(frame(3, channel, tag))
    return pieces


def _messages(chunks: list) -> list[list]:
    """The chunks cut into messages: each from a method frame to the next
    chunk that is one, a payload going with what is before it."""
    out: list[list] = []
    for chunk in chunks:
        if type(chunk) is not memoryview and chunk[0] == 1:
            out.append([])
        out[-1].append(chunk)
    return out


# Bursts of like messages on a channel: a streaming client's read brings
# hundreds, so turns end inside messages unless they are made not to.
streams = st.lists(
    st.tuples(
        st.integers(1, 4),  # channel
        st.integers(1, 150),  # messages in the burst
        st.integers(1, 3),  # body frames each
        st.booleans(),  # a large body (header, then its payload as a view)
        st.booleans(),  # whole, as one piece (publish_whole)
    ),
    max_size=8,
)


def _chunks(stream) -> list:
    chunks: list = []
    tag = 0
    for channel, count, bodies, viewed, whole in stream:
        for _ in range(count):
            tag += 1
            pieces = message(channel, tag, bodies, viewed)
            chunks += [b"".join(bytes(p) for p in pieces)] if whole else pieces
    return chunks


@given(streams)
def test_every_chunk_leaves_once_with_each_channels_order_and_messages_kept(stream):
    chunks = _chunks(stream)
    out = interleaved(chunks)
    assert sorted(map(bytes, out)) == sorted(map(bytes, chunks))
    before, after = _messages(chunks), _messages(out)
    assert sorted(map(repr, after)) == sorted(map(repr, before))  # each whole, none split

    def by_channel(messages: list[list]) -> dict[bytes, list]:
        channels: dict[bytes, list] = {}
        for pieces in messages:
            channels.setdefault(bytes(pieces[0][1:3]), []).append(pieces)
        return channels

    assert by_channel(after) == by_channel(before)


fenced_streams = st.lists(
    st.tuples(streams, st.sampled_from([QUEUE_DELETE, CONNECTION_CLOSE]), st.integers(1, 4)),
    max_size=4,
)


@given(fenced_streams)
def test_the_compiled_interleave_gives_the_references_list(parts):
    """Streams between control methods (fences), on the channels streaming
    or another: the same chunks, the same objects, in the same order."""
    chunks: list = []
    for stream, method, channel in parts:
        chunks += _chunks(stream) + [frame(1, channel, 0, method)]
    if writer._walk is None:
        pytest.skip("_walk.c was not built")
    out = writer.interleaved(chunks)
    expected = writer.reference_interleaved(chunks)
    assert len(out) == len(expected)
    assert all(got is wanted for got, wanted in zip(out, expected, strict=True))


def test_the_compiled_interleave_refuses_what_is_not_a_chunk():
    if writer._walk is None:
        pytest.skip("_walk.c was not built")
    with pytest.raises(TypeError):
        writer.interleaved([frame(1, 1, 0), bytearray(frame(2, 1, 0))])


def test_the_compiled_interleave_refuses_a_turn_of_no_chunks():
    # Two channels' method frames with a turn of none would never leave.
    if writer._walk is None:
        pytest.skip("_walk.c was not built")
    with pytest.raises(ValueError):
        writer._walk.interleaved([frame(1, 1, 0), frame(1, 2, 0)], 0, writer._STREAMED)


@given(streams)
def test_no_channel_goes_on_for_much_more_than_a_turn_while_another_waits(stream):
    chunks = _chunks(stream)
    out = interleaved(chunks)
    waiting = {bytes(m[0][1:3]) for m in _messages(chunks)}
    left = {key: sum(1 for m in _messages(chunks) if bytes(m[0][1:3]) == key) for key in waiting}
    run_channel, run_length = None, 0
    for pieces in _messages(out):
        key = bytes(pieces[0][1:3])
        run_length = run_length + len(pieces) if key == run_channel else len(pieces)
        run_channel = key
        left[key] -= 1
        others_waiting = any(count for other, count in left.items() if other != key)
        if others_waiting:
            # A turn is TURN chunks, finished to the end of its message.
            assert run_length < TURN + len(pieces)


def test_a_control_method_is_a_fence_nothing_crosses():
    before = [frame(1, 1, tag) for tag in range(300)] + [frame(1, 2, tag) for tag in range(10)]
    fence = frame(1, 2, 999, QUEUE_DELETE)
    after = [frame(1, 3, tag) for tag in range(300)] + [frame(1, 1, tag) for tag in range(300, 310)]
    out = interleaved(before + [fence] + after)
    at = out.index(fence)
    assert sorted(out[:at]) == sorted(before) and sorted(out[at + 1 :]) == sorted(after)
    assert out[:at] != before  # the streams before it still took turns


def test_connection_close_stays_after_everything_written_before_it():
    chunks = [frame(1, 1, tag) for tag in range(200)] + [frame(1, 2, tag) for tag in range(200)]
    close = frame(1, 0, 0, CONNECTION_CLOSE)
    out = interleaved([frame(8, 0, 0), *chunks, close])
    assert out[-1] == close


def test_channels_within_a_turn_are_left_in_their_order():
    chunks = [frame(1, 1 + tag % 2, tag) for tag in range(2 * TURN)]
    assert interleaved(chunks) == chunks


def test_one_channel_is_left_as_it_is():
    chunks = message(1, 1) * 100
    assert interleaved(chunks) == chunks


def test_two_streams_take_turns_of_a_turns_length():
    chunks = [frame(1, 1, tag) for tag in range(300)] + [frame(1, 2, tag) for tag in range(300)]
    out = interleaved(chunks)
    channels = [struct.unpack_from(">H", chunk, 1)[0] for chunk in out]
    assert channels[:TURN] == [1] * TURN
    assert channels[TURN : 2 * TURN] == [2] * TURN
    assert channels[2 * TURN : 3 * TURN] == [1] * TURN


class Transport:
    """What the writer calls on its transport, recording what it wrote."""

    def __init__(self) -> None:
        self.written: list = []

    def is_closing(self) -> bool:
        return False

    def writelines(self, chunks: list) -> None:
        self.written.append(list(chunks))

    def write(self, data: bytes) -> None:
        self.written.append([data])

    def get_write_buffer_size(self) -> int:
        return 0


def test_an_upstream_writer_interleaves_a_large_flush_and_a_client_writer_does_not():
    loop = asyncio.new_event_loop()
    try:
        chunks = [frame(1, 1, tag) for tag in range(200)] + [frame(1, 2, tag) for tag in range(200)]
        for interleave in (True, False):
            transport = Transport()
            batched = BatchedWriter(transport, loop, interleave=interleave)
            for chunk in chunks:
                batched.write(chunk)
            batched.flush()
            [written] = transport.written
            assert (written == interleaved(chunks)) is interleave
            assert (written == chunks) is not interleave
    finally:
        loop.close()


def test_a_small_flush_is_written_as_it_came(monkeypatch):
    calls = []
    monkeypatch.setattr(writer, "interleaved", lambda chunks: calls.append(chunks) or chunks)
    loop = asyncio.new_event_loop()
    try:
        transport = Transport()
        batched = BatchedWriter(transport, loop, interleave=True)
        for tag in range(2 * TURN):
            batched.write(frame(1, 1 + tag % 2, tag))
        batched.flush()
        assert calls == [] and len(transport.written[0]) == 2 * TURN
    finally:
        loop.close()


def test_a_reply_goes_at_once_when_nothing_waits_and_behind_what_does():
    loop = asyncio.new_event_loop()
    try:
        transport = Transport()
        batched = BatchedWriter(transport, loop)
        batched.last_write = 0.0
        batched.write_now(b"start")
        assert transport.written == [[b"start"]]  # no flush was needed
        assert batched.last_write > 0  # the heartbeat tick sees it
        batched.write(b"delivery")
        batched.write_now(b"close-ok")
        assert transport.written == [[b"start"]]
        batched.flush()
        assert transport.written == [[b"start"], [b"delivery", b"close-ok"]]
    finally:
        loop.close()


@pytest.mark.parametrize("transport", ["plain", "tls"])
def test_streaming_publishers_on_one_upstream_reach_the_broker_in_turns(
    fresh_amqplexd, relay, user, request, transport
):
    """Two clients streaming publishes through one worker: at the broker their
    channels alternate in short runs (a long run of one holds RabbitMQ's
    reader back for both), each channel's messages complete and in order.
    Over TLS too, where each read the session gets is what uvloop's SSL
    protocol decrypted since its last call, and streaming reads reach
    STREAMING_READ as plain ones do."""
    context = None
    env = {}
    if transport == "tls":
        certs = request.getfixturevalue("certs")
        context, env = certs.client_context(), listener_env(certs)
    daemon = fresh_amqplexd(upstream=relay.url, env=env)
    count = 20_000
    queues = [f"amqplex-test.turns.{uuid.uuid4().hex[:8]}" for _ in range(2)]
    with pika.BlockingConnection(broker_params()) as admin:
        channel = admin.channel()
        for queue in queues:
            channel.queue_declare(queue, arguments={"x-expires": 60_000})
        clients = [RawClient(daemon.port, timeout=60, context=context) for _ in queues]
        try:
            for client in clients:
                client.handshake(user.name, user.password)
                client.open_channel(1)
            streams = [_numbered_publishes(queue, count) for queue in queues]
            start = threading.Barrier(len(clients))
            with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
                list(pool.map(_stream, clients, queues, streams, [start] * len(clients)))
            # The round trip that ends a stream is answered once the channel
            # has the publishes, and their queue may count them a little
            # later (one run saw 19,894 of 20,000 at once).
            wait_until(
                lambda: _counts(channel, queues) == [count, count],
                what=f"{count} messages in each queue",
            )
        finally:
            for client in clients:
                client.close()
            for queue in queues:
                channel.queue_delete(queue)

    bodies = max(
        (
            [(f.channel, f.raw) for f in c.frames(UP) if f.frame_type == FRAME_BODY]
            for c in relay.open_connections
        ),
        key=len,
    )
    sequence = {}
    for channel_id, raw in bodies:
        sequence.setdefault(channel_id, []).append(struct.unpack_from(">I", raw, 7)[0])
    assert sorted(map(sorted, sequence.values())) == [list(range(count))] * 2
    assert all(numbers == sorted(numbers) for numbers in sequence.values())

    # While both still have messages to come, how long one channel goes on.
    first_done = min(
        max(i for i, (c, _) in enumerate(bodies) if c == channel_id) for channel_id in sequence
    )
    runs, previous = [], None
    for channel_id, _ in bodies[:first_done]:
        if channel_id == previous:
            runs[-1] += 1
        else:
            runs.append(1)
        previous = channel_id
    short = sum(run for run in runs if run <= 4 * TURN)
    assert short >= sum(runs) / 2, f"most messages in long runs: {sorted(runs)[-5:]}"


def _counts(channel, queues: list[str]) -> list[int]:  # noqa: ANN001 - a pika channel
    return [channel.queue_declare(q, passive=True).method.message_count for q in queues]


def _numbered_publishes(queue: str, count: int) -> bytes:
    """`count` numbered 64 B messages."""
    publish = pamqp_frame.marshal(commands.Basic.Publish(exchange="", routing_key=queue), 1)
    content = pamqp_frame.marshal(header.ContentHeader(0, 64, commands.Basic.Properties()), 1)
    return b"".join(
        publish + content + body_frame(1, struct.pack(">I", number) + bytes(60))
        for number in range(count)
    )


def _stream(client: RawClient, queue: str, messages: bytes, start: threading.Barrier) -> None:
    """`messages` in one send once both streams are ready, then a round trip
    on the same channel, which the broker answers after them. One send built
    beforehand keeps the client's socket full for as long as the stream
    lasts: a thread building its next batch would hold the test process's
    GIL while the other waits, and the proxy would read one client alone for
    a while (a loaded CI host once saw runs of 8,550 messages)."""
    start.wait(timeout=30)
    client.send(messages)
    client.method(1, commands.Queue.Declare(queue=queue, passive=True))
    client.expect(commands.Queue.DeclareOk, timeout=60)
