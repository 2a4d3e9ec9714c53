"""Field tables as strictly as RabbitMQ parses them (protocol/tables.py):
what pamqp encodes comes back the same; a value past its table's end, a key
without a value or a type RabbitMQ does not know is refused."""

from __future__ import annotations

import decimal
import struct

import pytest
from pamqp import encode

from amqplex.protocol import tables


def test_every_type_pamqp_writes_is_read_back():
    table = {
        "s": "text",
        "b": True,
        "i": 7,
        "big": 1 << 40,
        "f": 1.5,
        "d": decimal.Decimal("1.25"),
        "nested": {"a": {"b": [1, "two", {"c": None}]}},
        "void": None,
    }
    raw = encode.field_table(table) + b"after"
    consumed, decoded = tables.field_table(raw)
    assert raw[consumed:] == b"after"
    assert decoded == table


@pytest.mark.parametrize(
    "raw",
    [
        struct.pack(">I", 8) + b"\x01aS" + struct.pack(">I", 5) + b"x",  # value past the end
        struct.pack(">I", 2) + b"\x01a",  # a key without a value
        struct.pack(">I", 3) + b"\x01aZ",  # no such type
        struct.pack(">I", 9) + b"\x01aA" + struct.pack(">I", 2) + b"I\x00\x00\x00",  # array overrun
        struct.pack(">I", 4) + b"\x01aI",  # a fixed value cut short
        struct.pack(">I", 10),  # longer than what follows
    ],
    ids=["value-past-end", "key-without-value", "unknown-type", "array", "cut-short", "length"],
)
def test_a_table_rabbitmq_could_not_parse_is_refused(raw):
    with pytest.raises(ValueError):
        tables.field_table(raw + b"trailing bytes of the frame")
