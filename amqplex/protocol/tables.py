"""Field tables checked as strictly as RabbitMQ parses them: every key with
a value of one of its types, every value within its own table's (or
array's) length. pamqp 4 decodes a value past its table's end, and a key
with nothing after it as None; forwarded, such a table crashes the broker's
reader or channel, which closes the shared upstream for every client on it
(DESIGN rule 6)."""

from __future__ import annotations

from pamqp import common, decode

# RabbitMQ's field types (rabbit_binary_parser) and the width of the fixed
# ones; S, x, F and A carry a 32-bit length, D is a scale and a 32-bit value.
_FIXED = {
    ord("t"): 1,
    ord("b"): 1,
    ord("B"): 1,
    ord("s"): 2,
    ord("u"): 2,
    ord("I"): 4,
    ord("i"): 4,
    ord("f"): 4,
    ord("D"): 5,
    ord("l"): 8,
    ord("L"): 8,
    ord("d"): 8,
    ord("T"): 8,
    ord("V"): 0,
}
_LONG_STRINGS = frozenset(map(ord, "Sx"))


def field_table(data: bytes) -> tuple[int, common.FieldTable]:
    """pamqp's decode.field_table of `data`'s first table, refusing
    (ValueError) one RabbitMQ would not parse."""
    _check_table(data, 0, len(data))
    return decode.field_table(data)


def _check_table(data: bytes, pos: int, limit: int) -> int:
    """Where the table at `pos` ends, within `limit`."""
    end = _sized_end(data, pos, limit)
    pos += 4
    while pos < end:
        pos += 1 + data[pos]  # the key
        if pos >= end:
            raise ValueError("a field table key without a value")
        pos = _check_value(data, pos, end)
    return end


def _check_array(data: bytes, pos: int, limit: int) -> int:
    end = _sized_end(data, pos, limit)
    pos += 4
    while pos < end:
        pos = _check_value(data, pos, end)
    return end


def _check_value(data: bytes, pos: int, limit: int) -> int:
    kind = data[pos]
    pos += 1
    if kind in _FIXED:
        end = pos + _FIXED[kind]
    elif kind == ord("F"):
        end = _check_table(data, pos, limit)
    elif kind == ord("A"):
        end = _check_array(data, pos, limit)
    elif kind in _LONG_STRINGS:
        end = _sized_end(data, pos, limit)
    else:
        raise ValueError(f"unknown field type {chr(kind)!r}")
    if end > limit:
        raise ValueError("a field value past the end of its table")
    return end


def _sized_end(data: bytes, pos: int, limit: int) -> int:
    if pos + 4 > limit:
        raise ValueError("a field length past the end of its table")
    end = pos + 4 + int.from_bytes(data[pos : pos + 4])
    if end > limit:
        raise ValueError("a field value past the end of its table")
    return end
