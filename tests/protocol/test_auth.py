"""SASL responses from Connection.StartOk (PLAIN and AMQPLAIN): parsed to
credentials, malformed ones refused with 403, and never a password in an
error text or a repr."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pamqp import encode

from amqplex.protocol.auth import Credentials, parse_response, plain_response
from amqplex.protocol.constants import ReplyCode
from amqplex.protocol.errors import ConnectionException
from tests.support.rawclient import amqplain_response

# What pamqp may hand over: text when the response is valid UTF-8, else bytes.
names = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"]))


def as_pamqp_gives_it(raw: bytes) -> str | bytes:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw


def refusal(mechanism: str, response: bytes | str) -> ConnectionException:
    with pytest.raises(ConnectionException) as raised:
        parse_response(mechanism, response)
    assert raised.value.code == ReplyCode.ACCESS_REFUSED
    assert raised.value.text.startswith("ACCESS_REFUSED - ")
    return raised.value


def test_plain_response_gives_user_and_password():
    assert parse_response("PLAIN", "\x00alice\x00s3cret") == Credentials("alice", "s3cret")


def test_plain_response_with_authorization_identity_uses_the_authentication_one():
    assert parse_response("PLAIN", "admin\x00alice\x00s3cret") == Credentials("alice", "s3cret")


def test_amqplain_response_gives_login_and_password():
    response = amqplain_response("bob", "hunter2")
    assert parse_response("AMQPLAIN", response) == Credentials("bob", "hunter2")
    assert parse_response("AMQPLAIN", as_pamqp_gives_it(response)) == Credentials("bob", "hunter2")


def test_amqplain_response_ignores_other_fields():
    table = encode.field_table({"LOGIN": "bob", "PASSWORD": "pw", "extra": 1})[4:]
    assert parse_response("AMQPLAIN", table) == Credentials("bob", "pw")


@given(user=names, password=names)
def test_plain_round_trips_any_text(user, password):
    credentials = Credentials(user, password)
    raw = plain_response(credentials).encode()
    assert parse_response("PLAIN", as_pamqp_gives_it(raw)) == credentials


@given(user=names, password=names)
def test_amqplain_round_trips_any_text(user, password):
    raw = amqplain_response(user, password)
    assert parse_response("AMQPLAIN", as_pamqp_gives_it(raw)) == Credentials(user, password)


@pytest.mark.parametrize(
    "response",
    ["", "alice", "\x00alice", "\x00alice\x00pw\x00extra"],
    ids=["empty", "no-separator", "one-separator", "three-separators"],
)
def test_malformed_plain_is_refused(response):
    refusal("PLAIN", response)


@pytest.mark.parametrize(
    "response",
    [
        encode.field_table({"LOGIN": "bob"})[4:],
        encode.field_table({"PASSWORD": "pw"})[4:],
        b"\x05LOGINS\x00\x00\x00\xffbob",
        b"garbage",
    ],
    ids=["no-password", "no-login", "truncated", "garbage"],
)
def test_malformed_amqplain_is_refused(response):
    refusal("AMQPLAIN", response)


def test_non_utf8_credentials_are_refused():
    refusal("PLAIN", b"\x00alice\x00\xff\xfe")
    refusal("PLAIN", b"\x00\xc3\x28\x00pw")
    table = b"\x05LOGINS" + struct.pack(">I", 3) + b"bob" + b"\x08PASSWORDS"
    refusal("AMQPLAIN", table + struct.pack(">I", 2) + b"\xff\xfe")


def test_unsupported_mechanism_is_refused_by_name():
    error = refusal("EXTERNAL", "\x00alice\x00pw")
    assert "EXTERNAL" in error.text


def test_credentials_repr_hides_the_password():
    credentials = Credentials("alice", "Sekr3t-pw")
    assert "alice" in repr(credentials)
    assert "Sekr3t-pw" not in repr(credentials)
    assert "Sekr3t-pw" not in str(credentials)


@given(password=names.map(lambda text: "pw-" + text))
def test_refusals_never_quote_the_password(password):
    raw = password.encode()
    table = b"\x08PASSWORDS" + struct.pack(">I", len(raw)) + raw
    for mechanism, response in (
        ("PLAIN", b"\x00alice\x00" + raw + b"\x00" + raw),
        ("PLAIN", raw),
        ("PLAIN", b"\x00alice\x00" + raw + b"\xff"),
        ("AMQPLAIN", table),
        ("AMQPLAIN", table[:-1]),
        ("EXTERNAL", b"\x00alice\x00" + raw),
    ):
        with pytest.raises(ConnectionException) as raised:
            parse_response(mechanism, as_pamqp_gives_it(response))
        assert password not in raised.value.text
        assert password not in str(raised.value)
        assert raised.value.__cause__ is None or password not in str(raised.value.__cause__)
