"""Direct reply-to keys (amqplex/worker/rules.py, check_direct_reply): the
ones RabbitMQ takes pass, a real RPC through the proxy gets its reply, and
the ones that would crash the broker's channel (and with it the shared
upstream) are refused, in the routing key and in CC and BCC headers;
test_isolation compares those refusals with the broker's own."""

from __future__ import annotations

import base64
import struct
import uuid

import pika
import pytest
from pamqp import commands, frame

from amqplex.protocol import content
from amqplex.protocol.constants import ReplyCode
from amqplex.protocol.errors import ConnectionException
from amqplex.worker.rules import check_direct_reply, check_header_routes
from tests.conftest import proxy_params
from tests.support.waiting import wait_until

PREFIX = "amq.rabbitmq.reply-to."


def pid_term(node: bytes = b"reply@9248884", tag: int = 88, atom: int = 118) -> bytes:
    """Erlang's external format of a pid: NEW_PID_EXT (88) or PID_EXT (103),
    its node an ATOM_UTF8_EXT (118), SMALL_ATOM_UTF8_EXT (119), ATOM_EXT
    (100) or SMALL_ATOM_EXT (115). Which of them RabbitMQ 3.10 takes was
    tried against it: test_isolation sends two to both."""
    length = struct.pack(">H", len(node)) if atom in (100, 118) else bytes([len(node)])
    tail = bytes(12) if tag == 88 else bytes(9)
    return bytes([131, tag, atom]) + length + node + tail


def key(term: bytes, suffix: str = "y13L4YOReeWZM089z9YaTQ==") -> bytes:
    return (PREFIX + base64.b64encode(term).decode() + "." + suffix).encode()


@pytest.mark.parametrize(
    "routing_key",
    [
        key(pid_term()),
        key(pid_term(tag=103)),
        key(pid_term(atom=119)),
        key(pid_term(node=b"other@9248884")),  # the name before the hash is not read
        b"amq.rabbitmq.reply-to",  # no suffix: a queue name like any other
        PREFIX.encode() + b"x",  # one part: the broker drops it
        PREFIX.encode() + b"a.b.c",  # three parts: dropped too
        key(pid_term()) + b".",  # empty parts do not count
        b"q",
    ],
)
def test_keys_the_broker_takes_pass(routing_key):
    check_direct_reply(routing_key)


@pytest.mark.parametrize(
    "routing_key",
    [
        PREFIX.encode() + b"abc.def",  # not base64
        PREFIX.encode() + b"g2EF.key",  # the integer 5
        key(pid_term(node=b"rabbit@localhost")),
        key(pid_term(node=b"reply@")),
        key(pid_term(atom=100)),  # ATOM_EXT: the broker reads only the UTF-8 tags
        key(pid_term(atom=115)),  # SMALL_ATOM_EXT
        PREFIX.encode() + b"\xff",  # not UTF-8, even in one part
        key(pid_term(), suffix="k") + b"\xff",
        key(pid_term() + b"\x00"),  # a trailing octet
        key(pid_term()[:-1]),  # one short
        key(bytes([131, 88, 120]) + pid_term()[3:]),  # not an atom tag
    ],
)
def test_keys_that_would_crash_the_brokers_channel_are_refused_with_541(routing_key):
    with pytest.raises(ConnectionException) as refused:
        check_direct_reply(routing_key)
    assert refused.value.code == ReplyCode.INTERNAL_ERROR


def publish_frame(exchange: str = "") -> bytes:
    return frame.marshal(commands.Basic.Publish(exchange=exchange, routing_key="q"), 1)


def header_with_table(entries: list[tuple[bytes, bytes]]) -> bytes:
    """A content header whose headers table holds `entries` as given: raw
    (name, typed value) pairs, repeats and all."""
    table = b"".join(bytes([len(name)]) + name + value for name, value in entries)
    payload = (
        struct.pack(">HHQH", 60, 0, 1, commands.Basic.Properties.flags["headers"])
        + struct.pack(">I", len(table))
        + table
    )
    return struct.pack(">BHI", 2, 1, len(payload)) + payload + b"\xce"


def array(*strings: bytes) -> bytes:
    items = b"".join(b"S" + struct.pack(">I", len(s)) + s for s in strings)
    return b"A" + struct.pack(">I", len(items)) + items


BAD = PREFIX.encode() + b"abc.def"


@pytest.mark.parametrize(
    "entries",
    [
        [(b"CC", array(b"q", BAD))],
        [(b"BCC", array(BAD))],
        [(b"CC", array(BAD)), (b"CC", array())],  # the broker reads the first
        [(b"CC", array(PREFIX.encode() + b"\xff"))],  # a long string not UTF-8
    ],
    ids=["cc", "bcc", "first-of-two", "not-utf8"],
)
def test_cc_and_bcc_keys_are_checked_as_the_broker_reads_them(entries):
    content_header = header_with_table(entries)
    content.check_header(content_header)
    with pytest.raises(ConnectionException):
        check_header_routes(publish_frame(), content_header)


@pytest.mark.parametrize(
    ("exchange", "entries"),
    [
        ("amq.direct", [(b"CC", array(BAD))]),  # only the default exchange decodes them
        ("", [(b"CC", array()), (b"CC", array(BAD))]),  # a second CC is not read
        ("", [(b"cc", array(BAD))]),
        ("", [(b"CC", b"S" + struct.pack(">I", len(BAD)) + BAD)]),  # not an array: a 406
    ],
    ids=["another-exchange", "second-of-two", "lower-case", "not-an-array"],
)
def test_cc_and_bcc_keys_the_broker_does_not_decode_pass(exchange, entries):
    check_header_routes(publish_frame(exchange), header_with_table(entries))


def test_a_direct_reply_to_rpc_through_the_proxy_gets_its_reply(amqplexd, user):
    """Requester and responder are clients of the same user (one upstream):
    the broker's own reply-to key passes the check both ways."""
    queue = f"amqplex-rpc-{uuid.uuid4().hex[:8]}"
    requester = pika.BlockingConnection(proxy_params(amqplexd.port, user))
    responder = pika.BlockingConnection(proxy_params(amqplexd.port, user))
    try:
        asking, answering = requester.channel(), responder.channel()
        answering.queue_declare(queue, auto_delete=True)
        replies: list[bytes] = []
        asking.basic_consume(
            "amq.rabbitmq.reply-to", lambda *args: replies.append(args[3]), auto_ack=True
        )
        asking.basic_publish(
            "", queue, b"ping", pika.BasicProperties(reply_to="amq.rabbitmq.reply-to")
        )

        def request() -> tuple | None:
            got = answering.basic_get(queue, auto_ack=True)
            return got if got[0] is not None else None

        _, properties, body = wait_until(request, what="the request")
        assert body == b"ping" and properties.reply_to.startswith(PREFIX)
        answering.basic_publish("", properties.reply_to, b"pong")
        wait_until(lambda: requester.process_data_events(0.1) or replies, what="the reply")
        assert replies == [b"pong"]
    finally:
        requester.close()
        responder.close()
