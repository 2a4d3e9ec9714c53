"""The AMQP frames the load generators send, encoded once with pamqp, and the
ids of the replies they wait for. Hot loops only send these bytes and compare
4-byte method ids; nothing is encoded or decoded per message."""

from __future__ import annotations

import struct

from pamqp import body, commands, frame, header

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
FRAME_MAX = 131072
CHANNEL = 1
FRAME_END = 0xCE

# type, (channel skipped), payload size: the 7-byte frame header.
FRAME_HEAD = struct.Struct(">BxxI")
_UINT32 = struct.Struct(">I")
_UINT64 = struct.Struct(">Q")


def method_id(class_id: int, method: int) -> bytes:
    """The first four payload bytes of a method frame."""
    return struct.pack(">HH", class_id, method)


START = method_id(10, 10)
TUNE = method_id(10, 30)
OPEN_OK = method_id(10, 41)
CONNECTION_CLOSE_ID = method_id(10, 50)
CONNECTION_CLOSE_OK = method_id(10, 51)
CHANNEL_OPEN_OK = method_id(20, 11)
CHANNEL_CLOSE_ID = method_id(20, 40)
CHANNEL_CLOSE_OK = method_id(20, 41)
DECLARE_OK = method_id(50, 11)
QOS_OK = method_id(60, 11)
CONSUME_OK = method_id(60, 21)
DELIVER = method_id(60, 60)


def _method(method: commands.Frame, channel: int = 0) -> bytes:
    return frame.marshal(method, channel)


START_OK = _method(
    commands.Connection.StartOk(
        client_properties={"product": "amqplex-bench"},
        mechanism="PLAIN",
        response="\x00guest\x00guest",
        locale="en_US",
    )
)
# Heartbeat 0: idle clients (memory, clients scenarios) must cost nothing.
TUNE_OK = _method(commands.Connection.TuneOk(channel_max=16, frame_max=FRAME_MAX, heartbeat=0))
CONNECTION_OPEN = _method(commands.Connection.Open(virtual_host="/"))
CHANNEL_OPEN = _method(commands.Channel.Open(), CHANNEL)
QOS = _method(commands.Basic.Qos(), CHANNEL)  # the cheapest round trip
CHANNEL_CLOSE = _method(
    commands.Channel.Close(reply_code=200, reply_text="bye", class_id=0, method_id=0), CHANNEL
)
CONNECTION_CLOSE = _method(
    commands.Connection.Close(reply_code=200, reply_text="bye", class_id=0, method_id=0)
)


def publish(queue: str, size: int) -> bytes:
    """One whole message (method, header, body frames) to `queue` via the
    default exchange."""
    data = bytes(size)
    frames = [
        _method(commands.Basic.Publish(exchange="", routing_key=queue), CHANNEL),
        frame.marshal(header.ContentHeader(0, size, commands.Basic.Properties()), CHANNEL),
    ]
    step = FRAME_MAX - 8
    frames += [
        frame.marshal(body.ContentBody(data[at : at + step]), CHANNEL)
        for at in range(0, size, step)
    ]
    return b"".join(frames)


def declare_passive(queue: str) -> bytes:
    return _method(commands.Queue.Declare(queue=queue, passive=True), CHANNEL)


def consume(queue: str) -> bytes:
    return _method(commands.Basic.Consume(queue=queue, consumer_tag="bench", no_ack=True), CHANNEL)


def message_count(declare_ok: bytes) -> int:
    """The message count in a Queue.DeclareOk payload."""
    name_length = declare_ok[4]
    return _UINT32.unpack_from(declare_ok, 5 + name_length)[0]


def tune_frame_max(tune: bytes) -> int:
    """frame_max offered in a Connection.Tune payload."""
    return _UINT32.unpack_from(tune, 6)[0]


def body_size(content_header: bytes, offset: int = 0) -> int:
    """Body size in a content header payload starting at `offset`."""
    return _UINT64.unpack_from(content_header, offset + 4)[0]


def describe(payload: bytes) -> str:
    """A readable name for an unexpected method payload (errors only)."""
    if len(payload) < 4:
        return f"method frame of {len(payload)} bytes"
    mid = bytes(payload[:4])
    if mid in (CONNECTION_CLOSE_ID, CHANNEL_CLOSE_ID) and len(payload) >= 7:
        code = struct.unpack_from(">H", payload, 4)[0]
        text = bytes(payload[7 : 7 + payload[6]]).decode(errors="replace")
        kind = "Connection.Close" if mid == CONNECTION_CLOSE_ID else "Channel.Close"
        return f"{kind} {code} {text}"
    class_id, method = struct.unpack(">HH", mid)
    return f"method {class_id}.{method}"
