"""Method decoding (strict, as RabbitMQ decodes) and the cache of decoded
channel-0 methods, as pure unit tests."""

from __future__ import annotations

import pytest
from pamqp import commands, frame

from amqplex.protocol import methods
from amqplex.protocol.constants import ReplyCode
from amqplex.protocol.errors import ConnectionException

TUNE_OK = frame.marshal(commands.Connection.TuneOk(channel_max=16, frame_max=4096, heartbeat=5), 0)


def with_trailing_byte(frame_bytes: bytes) -> bytes:
    """The same frame with one argument byte too many (size adjusted)."""
    size = int.from_bytes(frame_bytes[3:7]) + 1
    return frame_bytes[:3] + size.to_bytes(4) + frame_bytes[7:-1] + b"\x00" + frame_bytes[-1:]


def test_decode_reads_every_argument():
    method = methods.decode(TUNE_OK)
    assert isinstance(method, commands.Connection.TuneOk)
    assert (method.channel_max, method.frame_max, method.heartbeat) == (16, 4096, 5)


def test_decode_reads_bits_after_other_arguments():
    declare = commands.Queue.Declare(queue="q", durable=True, auto_delete=True, nowait=True)
    method = methods.decode(frame.marshal(declare, 1))
    assert (method.queue, method.passive, method.durable, method.exclusive) == ("q", 0, 1, 0)
    assert (method.auto_delete, method.nowait) == (1, 1)


def test_trailing_argument_bytes_are_a_frame_error():
    with pytest.raises(ConnectionException) as caught:
        methods.decode(with_trailing_byte(TUNE_OK))
    assert caught.value.code == ReplyCode.FRAME_ERROR


def test_cache_decodes_identical_frames_once():
    cache = methods.DecodeCache(4)
    first = cache.decode(TUNE_OK)
    assert cache.decode(bytes(bytearray(TUNE_OK))) is first
    other = frame.marshal(commands.Connection.TuneOk(channel_max=1, frame_max=4096), 0)
    assert cache.decode(other) is not first
    assert cache.decode(other).channel_max == 1


def test_cache_forgets_the_oldest_frame_when_full():
    cache = methods.DecodeCache(2)
    frames = [
        frame.marshal(commands.Connection.TuneOk(channel_max=n, frame_max=4096), 0)
        for n in (1, 2, 3)
    ]
    decoded = [cache.decode(f) for f in frames]
    assert cache.decode(frames[2]) is decoded[2]
    assert cache.decode(frames[1]) is decoded[1]
    assert cache.decode(frames[0]) is not decoded[0]  # evicted, decoded again


def test_cache_keeps_no_large_frame():
    """A StartOk of a few hundred bytes is kept; one padded past
    CACHED_FRAME_MAX, whose decoded tables could be many times its size, is
    decoded each time and never held."""
    cache = methods.DecodeCache(4)
    small = frame.marshal(commands.Connection.StartOk(client_properties={"a": "b"}), 0)
    padded = {"pad": "x" * methods.CACHED_FRAME_MAX}
    large = frame.marshal(commands.Connection.StartOk(client_properties=padded), 0)
    assert cache.decode(small) is cache.decode(small)
    assert cache.decode(large) is not cache.decode(large)
    assert cache.decode(large).client_properties == padded


def test_cache_keeps_no_frame_that_failed_to_decode():
    cache = methods.DecodeCache(4)
    bad = with_trailing_byte(TUNE_OK)
    for _ in range(2):  # refused every time, not only the first
        with pytest.raises(ConnectionException):
            cache.decode(bad)


def test_queue_delete_is_pamqps_frame_for_a_name_pamqp_takes():
    plain = commands.Queue.Delete(queue="orders.1", nowait=True)
    assert methods.queue_delete(3, "orders.1") == frame.marshal(plain, 3)


def test_queue_delete_carries_any_utf8_name():
    deleted = methods.decode(methods.queue_delete(3, "my queue, é"))
    assert (deleted.queue, deleted.nowait, deleted.if_unused, deleted.if_empty) == (
        "my queue, é",
        True,
        False,
        False,
    )


def test_declare_answered_clears_only_the_no_wait_bit():
    for name in ("orders.1", "x" * 200, ""):
        sent = commands.Queue.Declare(
            queue=name, exclusive=True, durable=True, nowait=True, arguments={"x-a": 1}
        )
        answered = methods.decode(methods.declare_answered(frame.marshal(sent, 1)))
        assert answered.nowait is False
        assert (answered.queue, answered.exclusive, answered.durable) == (name, True, True)
        assert answered.arguments == {"x-a": 1}


def test_delete_answered_clears_only_the_no_wait_bit():
    for name in ("orders.1", "x" * 200):
        sent = commands.Queue.Delete(queue=name, if_unused=True, if_empty=True, nowait=True)
        answered = methods.decode(methods.delete_answered(frame.marshal(sent, 1)))
        assert answered.nowait is False
        assert (answered.queue, answered.if_unused, answered.if_empty) == (name, True, True)
