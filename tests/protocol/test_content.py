"""Content headers are checked as RabbitMQ would parse them, before they
can reach a shared upstream (a malformed one is its connection-level 541)."""

from __future__ import annotations

import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pamqp import commands, frame, header

from amqplex.protocol.constants import ReplyCode
from amqplex.protocol.content import check_header
from amqplex.protocol.errors import ConnectionException

properties = st.fixed_dictionaries(
    {},
    optional={
        "content_type": st.text(max_size=20),
        "content_encoding": st.text(max_size=10),
        "headers": st.dictionaries(
            st.text(min_size=1, max_size=8), st.integers(0, 1000) | st.text(max_size=10)
        ),
        "delivery_mode": st.sampled_from([1, 2]),
        "priority": st.integers(0, 9),
        "correlation_id": st.text(max_size=20),
        "expiration": st.sampled_from(["100", "60000"]),
        "timestamp": st.datetimes(
            min_value=datetime.datetime(1971, 1, 1), max_value=datetime.datetime(2100, 1, 1)
        ).map(lambda d: d.replace(microsecond=0)),
        "app_id": st.text(max_size=10),
    },
)


def content_header(body_size: int, props: dict, channel: int = 1) -> bytes:
    return frame.marshal(
        header.ContentHeader(0, body_size, commands.Basic.Properties(**props)), channel
    )


def resized(raw: bytes, payload: bytes) -> bytes:
    """The same frame header over another payload."""
    return raw[:3] + len(payload).to_bytes(4, "big") + payload + b"\xce"


@given(body_size=st.integers(0, 2**64 - 1), props=properties)
def test_well_formed_headers_give_their_body_size(body_size, props):
    assert check_header(content_header(body_size, props)) == body_size


@given(props=properties, extra=st.binary(min_size=1, max_size=8))
def test_bytes_after_the_properties_are_refused_as_the_broker_does(props, extra):
    raw = content_header(10, props)
    with pytest.raises(ConnectionException) as refused:
        check_header(resized(raw, raw[7:-1] + extra))
    assert refused.value.code == ReplyCode.INTERNAL_ERROR


@given(props=properties.filter(bool), cut=st.integers(1, 8))
def test_truncated_properties_are_refused(props, cut):
    raw = content_header(10, props)
    payload = raw[7:-1]
    if cut >= len(payload) - 14:
        cut = len(payload) - 14
    if cut <= 0:
        return
    with pytest.raises(ConnectionException) as refused:
        check_header(resized(raw, payload[:-cut]))
    assert refused.value.code in (ReplyCode.INTERNAL_ERROR, ReplyCode.FRAME_ERROR)


def test_another_class_is_an_unexpected_frame():
    raw = content_header(1, {})
    with pytest.raises(ConnectionException) as refused:
        check_header(raw[:7] + (61).to_bytes(2, "big") + raw[9:])
    assert refused.value.code == ReplyCode.UNEXPECTED_FRAME
    assert "got one for class 61" in refused.value.text


def test_a_bad_headers_table_is_refused():
    raw = content_header(1, {"headers": {"k": 1}})
    # Corrupt the field type tag after the key.
    corrupt = (
        raw.replace(b"\x01kb", b"\x01kZ")
        if b"\x01kb" in raw
        else raw.replace(b"\x01k", b"\x01k\x00", 1)
    )
    with pytest.raises(ConnectionException) as refused:
        check_header(resized(raw, corrupt[7:-1]))
    assert refused.value.code == ReplyCode.INTERNAL_ERROR


def test_a_short_header_is_a_frame_error():
    with pytest.raises(ConnectionException) as refused:
        check_header(resized(b"\x02\x00\x01\x00\x00\x00\x00", b"\x00\x3c\x00\x00"))
    assert refused.value.code == ReplyCode.FRAME_ERROR
