"""Checking a client's content header before it reaches a shared upstream.

RabbitMQ decodes message properties lazily and answers malformed ones with a
connection-level 541, which would close every client's channels on the
upstream. So the proxy walks the property list itself: a fixed layout of
short strings, octets and a timestamp, plus one field table — no objects
are built except for a present `headers` table.
"""

from __future__ import annotations

import struct

from pamqp import commands
from pamqp import decode as values

from amqplex.protocol import tables
from amqplex.protocol.constants import BASIC_CLASS_ID, FRAME_HEADER_SIZE, ReplyCode
from amqplex.protocol.errors import ConnectionException

_HEADER = struct.Struct(">HHQH")  # class, weight, body size, property flags
_PUBLISH_IDS = (commands.Basic.Publish.index >> 16, commands.Basic.Publish.index & 0xFFFF)
_WIDTHS = {"octet": 1, "timestamp": 8}
# (flag mask, AMQP type) in wire order.
_LAYOUT = tuple(
    (commands.Basic.Properties.flags[name], getattr(commands.Basic.Properties, "_" + name))
    for name in commands.Basic.Properties.__slots__
)
_KNOWN_FLAGS = sum(mask for mask, _ in _LAYOUT)
_FLAGS_AT = FRAME_HEADER_SIZE + 12  # after class, weight and body size
# The short strings the property list starts with, before the headers table.
_LEADING_SHORT_STRINGS = tuple(
    commands.Basic.Properties.flags[name] for name in ("content_type", "content_encoding")
)


def check_header(frame: bytes) -> int:
    """The body size a Basic content header announces, once its class,
    weight and property list are known to be what RabbitMQ accepts."""
    if len(frame) < FRAME_HEADER_SIZE + _HEADER.size + 1:
        raise ConnectionException(ReplyCode.FRAME_ERROR, "type 2, all octets = <<>>: unknown_frame")
    class_id, weight, body_size, flags = _HEADER.unpack_from(frame, FRAME_HEADER_SIZE)
    if class_id != BASIC_CLASS_ID:
        raise ConnectionException(
            ReplyCode.UNEXPECTED_FRAME,
            f"expected content header for class {BASIC_CLASS_ID}, "
            f"got one for class {class_id} instead",
            *_PUBLISH_IDS,
        )
    if weight != 0:
        raise ConnectionException(
            ReplyCode.UNEXPECTED_FRAME,
            f"expected content header for class {BASIC_CLASS_ID}, "
            "got non content header frame instead",
            *_PUBLISH_IDS,
        )
    end = len(frame) - 1
    pos = FRAME_HEADER_SIZE + _HEADER.size
    if flags == 0 and pos == end:
        return body_size
    if flags & ~_KNOWN_FLAGS or not _properties_fit(frame, pos, end, flags):
        raise ConnectionException(ReplyCode.INTERNAL_ERROR, "malformed content properties")
    return body_size


def property_flags(frame: bytes) -> int:
    """A content header's property flags (check_header took the frame)."""
    return frame[_FLAGS_AT] << 8 | frame[_FLAGS_AT + 1]


def after_leading_strings(frame: bytes, flags: int) -> int:
    """Where a content header's properties (check_header took the frame)
    go on after content_type and content_encoding: the headers table, or
    without one delivery_mode."""
    pos = FRAME_HEADER_SIZE + _HEADER.size
    for mask in _LEADING_SHORT_STRINGS:
        if flags & mask:
            pos += 1 + frame[pos]
    return pos


def header_entries(frame: bytes) -> list[tuple[str, object]]:
    """The entries of a content header's headers table (check_header took
    the frame, and it has one), in order, a name that repeats each time: the
    broker reads the first, where a dict would keep the last."""
    pos = after_leading_strings(frame, property_flags(frame))
    end = pos + 4 + struct.unpack_from(">I", frame, pos)[0]
    pos += 4
    entries = []
    while pos < end:
        size = frame[pos]
        name = frame[pos + 1 : pos + 1 + size].decode()
        consumed, value = values.embedded_value(frame[pos + 1 + size : end])
        entries.append((name, value))
        pos += 1 + size + consumed
    return entries


def _properties_fit(frame: bytes, pos: int, end: int, flags: int) -> bool:
    """Whether the present properties exactly fill the rest of the frame."""
    try:
        for mask, kind in _LAYOUT:
            if not flags & mask:
                continue
            if kind == "shortstr":
                pos += 1 + frame[pos]
            elif kind == "table":
                consumed, _ = tables.field_table(frame[pos:end])
                pos += consumed
            else:
                pos += _WIDTHS[kind]
            if pos > end:
                return False
    except (IndexError, ValueError, struct.error):
        return False
    return pos == end
