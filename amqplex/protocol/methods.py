"""Method frames through pamqp's typed protocol objects.

The proxy decodes a method only where it must act on it; everything else on
the data path stays bytes (see framing).
"""

import functools
import struct

from pamqp import base, commands, frame
from pamqp import decode as values

from amqplex.protocol import tables
from amqplex.protocol.constants import FRAME_END, FRAME_HEADER_SIZE, FRAME_METHOD, ReplyCode
from amqplex.protocol.errors import ConnectionException

Method = base.Frame

_FRAME_HEAD = struct.Struct(">BHI")
# Queue.Delete's class and method ids, reserved-1 and its name's length;
# its bits after the name: no-wait alone (if-unused, if-empty, no-wait).
_QUEUE_DELETE = struct.Struct(">HHHB")
_NO_WAIT_ONLY = b"\x04"
# Queue.Declare's bits: passive, durable, exclusive, auto-delete, no-wait.
_DECLARE_NO_WAIT = 0b10000
_DELETE_NO_WAIT = 0b100
_FRAME_END = bytes([FRAME_END])


def decode(frame_bytes: bytes) -> Method:
    """Decode a whole method frame as strictly as RabbitMQ does: arguments
    that are short, too long or not UTF-8 are its 501 FRAME_ERROR."""
    index = int.from_bytes(frame_bytes[FRAME_HEADER_SIZE : FRAME_HEADER_SIZE + 4])
    class_id, method_id = index >> 16, index & 0xFFFF
    method_class = commands.INDEX_MAPPING.get(index)
    if method_class is None:
        raise ConnectionException(
            ReplyCode.COMMAND_INVALID,
            f"unknown method: class {class_id}, method {method_id}",
            class_id,
            method_id,
        )
    method = method_class()
    arguments = frame_bytes[FRAME_HEADER_SIZE + 4 : -1]
    try:
        consumed = _unmarshal(method, arguments)
    except UnicodeDecodeError:
        raise ConnectionException(ReplyCode.FRAME_ERROR, "Malformed UTF-8 in shortstr") from None
    except Exception:  # pamqp's decoders raise struct.error, ValueError, IndexError
        consumed = -1
    if consumed != len(arguments):
        raise ConnectionException(
            ReplyCode.FRAME_ERROR,
            f"cannot decode {method.name} arguments ({len(arguments)} bytes)",
            class_id,
            method_id,
        )
    return method


def _unmarshal(method: Method, data: bytes) -> int:
    """pamqp's Frame.unmarshal, but counting what it consumed, so trailing
    bytes are caught too (RabbitMQ refuses them)."""
    offset = 0
    bit = 0
    in_bits = False
    for argument, data_type in _layout(type(method)):
        if in_bits and (data_type != "bit" or bit == 8):
            offset, bit, in_bits = offset + 1, 0, False
        if data_type == "bit":
            if offset >= len(data):
                raise ValueError("bits missing")
            _, value = values.bit(data[offset : offset + 1], bit)
            bit, in_bits = bit + 1, True
        else:
            if data_type == "table":
                consumed, value = tables.field_table(data[offset:])
            else:
                consumed, value = values.by_type(data[offset:], data_type)
            offset += consumed
            if offset > len(data):
                raise ValueError(f"{argument} truncated")
        setattr(method, argument, value)
    return offset + 1 if in_bits else offset


@functools.cache
def _layout(method_class: type[Method]) -> tuple[tuple[str, str], ...]:
    """(argument, AMQP type) of each of a method's arguments, in wire order."""
    return tuple((name, method_class.amqp_type(name)) for name in method_class.__slots__)


# The largest frame DecodeCache keeps: every client library's StartOk is a
# few hundred bytes, and a large one (a crafted table of empty tables) can
# decode to sixteen times its size, held before any login is checked.
CACHED_FRAME_MAX = 2048


class DecodeCache:
    """Decoded methods by the bytes of their frame, for frames that arrive
    byte-identical again and again: every client of one library sends the
    same TuneOk, Open and Close, and the same StartOk for the same login, so
    under connection churn the handshake costs a lookup, not a decode.

    The methods returned are shared: read them, never change them."""

    __slots__ = ("_known", "_size")

    def __init__(self, size: int) -> None:
        self._known: dict[bytes, Method] = {}
        self._size = size

    def decode(self, frame_bytes: bytes) -> Method:
        method = self._known.get(frame_bytes)
        if method is None:
            method = decode(frame_bytes)
            if len(frame_bytes) <= CACHED_FRAME_MAX:
                if len(self._known) >= self._size:
                    del self._known[next(iter(self._known))]  # the oldest
                self._known[frame_bytes] = method
        return method


def encode(channel: int, method: Method) -> bytes:
    return frame.marshal(method, channel)


def ids(method_class: type[Method]) -> tuple[int, int]:
    """(class_id, method_id) of a pamqp method class, for Close frames."""
    return method_class.index >> 16, method_class.index & 0xFFFF


def queue_delete(channel: int, queue: str) -> bytes:
    """Queue.Delete of `queue`, no-wait, built here: pamqp refuses to
    encode queue names RabbitMQ accepts (spaces, any UTF-8)."""
    name = queue.encode()
    payload = _QUEUE_DELETE.pack(50, 40, 0, len(name)) + name + _NO_WAIT_ONLY
    return _FRAME_HEAD.pack(FRAME_METHOD, channel, len(payload)) + payload + _FRAME_END


def declare_answered(frame: bytes) -> bytes:
    """A Queue.Declare frame with its no-wait bit cleared, in the bytes, for
    the same reason as queue_delete."""
    return _no_wait_cleared(frame, _DECLARE_NO_WAIT)


def delete_answered(frame: bytes) -> bytes:
    """The same for a Queue.Delete frame."""
    return _no_wait_cleared(frame, _DELETE_NO_WAIT)


def _no_wait_cleared(frame: bytes, bit: int) -> bytes:
    # Both methods' bits follow the method id, reserved-1 and the queue name.
    at = FRAME_HEADER_SIZE + 6
    at += 1 + frame[at]
    cleared = bytearray(frame)
    cleared[at] &= ~bit
    return bytes(cleared)


def connection_close(code: int, text: str, class_id: int = 0, method_id: int = 0) -> bytes:
    return encode(
        0,
        commands.Connection.Close(
            reply_code=code, reply_text=text, class_id=class_id, method_id=method_id
        ),
    )


def channel_close(
    channel: int, code: int, text: str, class_id: int = 0, method_id: int = 0
) -> bytes:
    return encode(
        channel,
        commands.Channel.Close(
            reply_code=code, reply_text=text, class_id=class_id, method_id=method_id
        ),
    )
