"""Isolation (issue 2, point 6; DESIGN rule 6): nothing one client sends can
close the shared upstream or reach another client.

Each misbehaviour in CASES is sent twice with the same bytes: once straight
to RabbitMQ, once through amqplexd. The proxy must give the misbehaving
client the answer the broker gives (the same Connection.Close code, class
and method, and the same or a like text) while a canary on the same
upstream keeps publishing and getting its messages, and the proxy's
upstream connection stays the one it was (no reconnect).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import struct
import time
import typing
import uuid

import pika
import pytest
from pamqp import commands, frame, header

from amqplex.protocol.auth import Credentials, plain_response
from amqplex.protocol.constants import PROTOCOL_HEADER
from tests.conftest import Canary, broker_params
from tests.support import broker
from tests.support.rawclient import RawClient, body_frame
from tests.support.relay import UP
from tests.support.waiting import wait_until

ANSWER_TIMEOUT = 5


# -- frames a well-behaved client would never send ---------------------------------------


def method_frame(channel: int, method) -> bytes:
    return frame.marshal(method, channel)


def content_header(channel: int, body_size: int, class_id: int = 60) -> bytes:
    raw = frame.marshal(header.ContentHeader(0, body_size, commands.Basic.Properties()), channel)
    return raw[:7] + struct.pack(">H", class_id) + raw[9:]


def publish(channel: int, routing_key: str = "q", **kwargs) -> bytes:
    return method_frame(
        channel, commands.Basic.Publish(exchange="", routing_key=routing_key, **kwargs)
    )


def declare(channel: int) -> bytes:
    return method_frame(channel, commands.Queue.Declare(queue="", exclusive=True))


# -- the table ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    # The bytes to send on an open connection whose channel 1 is open.
    send: typing.Callable[[RawClient], bytes]
    # The proxy's reply text must equal the broker's, or both start with this.
    text_prefix: str | None = None
    # The channel_max the client asks for in TuneOk (0: the server's).
    channel_max: int = 0
    # Channels opened (and answered) besides channel 1 before the bytes are sent.
    open_first: tuple[int, ...] = ()
    # Well-formed requests sent (and answered) on channel 1 before the bytes.
    prepare: tuple = ()


def _oversized(client: RawClient) -> bytes:
    # RabbitMQ takes a payload of up to frame_max (8 bytes of slack); one more is too big.
    size = client.tune.frame_max + 1
    return struct.pack(">BHI", 3, 1, size) + b"x" * size + b"\xce"


def with_extra_byte(raw: bytes) -> bytes:
    """The same frame with one byte more in its payload."""
    payload = raw[7:-1] + b"\x00"
    return raw[:3] + struct.pack(">I", len(payload)) + payload + b"\xce"


def bare_method(channel: int, method_class) -> bytes:
    """A method frame holding its method id and none of its arguments."""
    payload = struct.pack(">I", method_class.index)
    return struct.pack(">BHI", 1, channel, len(payload)) + payload + b"\xce"


def queue_declare_named(channel: int, name: bytes) -> bytes:
    """Queue.Declare whose queue name is any bytes (pamqp would insist on text)."""
    payload = (
        struct.pack(">IH", commands.Queue.Declare.index, 0)
        + bytes([len(name)])
        + name
        + b"\x00"
        + struct.pack(">I", 0)
    )
    return struct.pack(">BHI", 1, channel, len(payload)) + payload + b"\xce"


CTAG_QUEUE = f"amqplex-isolation-ctag-{uuid.uuid4().hex[:8]}"


def pid_key(node: bytes, atom: bytes = b"v") -> str:
    """A direct reply-to routing key naming a pid on `node` (NEW_PID_EXT),
    the node an ATOM_UTF8_EXT (v) or an ATOM_EXT (d)."""
    term = b"\x83X" + atom + struct.pack(">H", len(node)) + node + bytes(12)
    return "amq.rabbitmq.reply-to." + base64.b64encode(term).decode() + ".key"


def publish_to_key(channel: int, routing_key: bytes) -> bytes:
    """A whole publish to the default exchange with any routing key octets."""
    arguments = struct.pack(">IH", commands.Basic.Publish.index, 0) + b"\x00"
    arguments += bytes([len(routing_key)]) + routing_key + b"\x00"
    method = struct.pack(">BHI", 1, channel, len(arguments)) + arguments + b"\xce"
    return method + content_header(channel, 3) + body_frame(channel, b"abc")


def whole_publish(channel: int, routing_key: str, **properties) -> bytes:
    """A publish to the default exchange with its header and a body of three."""
    content = header.ContentHeader(0, 3, commands.Basic.Properties(**properties))
    return (
        publish(channel, routing_key)
        + frame.marshal(content, channel)
        + body_frame(channel, b"abc")
    )


def split_body_publish(channel: int, routing_key: str) -> bytes:
    """The same in two body frames: the frame-by-frame path, not the whole one."""
    return (
        publish(channel, routing_key)
        + content_header(channel, 3)
        + body_frame(channel, b"a")
        + body_frame(channel, b"bc")
    )


def _frame_max_payload_body(client: RawClient) -> bytes:
    size = client.tune.frame_max
    return struct.pack(">BHI", 3, 1, size) + b"x" * size + b"\xce"


CASES = [
    Case("method-on-unopened-channel", lambda c: declare(5)),
    Case("content-header-on-unopened-channel", lambda c: content_header(5, 3)),
    Case("content-body-on-unopened-channel", lambda c: body_frame(5, b"abc")),
    Case("bad-frame-end", lambda c: declare(1)[:-1] + b"\x00", text_prefix="FRAME_ERROR - type 1"),
    Case("oversized-frame", _oversized),
    # The broker's slack: a frame 8 bytes over frame_max is no frame error (here
    # a body with no publish, so 505 rather than 501).
    Case("frame-max-payload-is-not-a-frame-error", _frame_max_payload_body),
    Case("method-frame-without-method-id", lambda c: struct.pack(">BHI", 1, 1, 2) + b"\x00<\xce"),
    Case("empty-method-frame-on-channel-0", lambda c: struct.pack(">BHI", 1, 0, 0) + b"\xce"),
    Case("body-without-publish", lambda c: body_frame(1, b"abc")),
    Case("content-header-without-publish", lambda c: content_header(1, 3)),
    Case("method-where-content-header-expected", lambda c: publish(1) + declare(1)),
    Case("method-where-body-expected", lambda c: publish(1) + content_header(1, 3) + declare(1)),
    Case("content-header-for-another-class", lambda c: publish(1) + content_header(1, 3, 61)),
    Case("heartbeat-on-a-channel", lambda c: b"\x08\x00\x01\x00\x00\x00\x00\xce"),
    Case(
        "connection-tune-on-channel-0",
        lambda c: method_frame(0, commands.Connection.Tune(2047, 131072, 0)),
    ),
    Case("channel-open-on-channel-0", lambda c: method_frame(0, commands.Channel.Open())),
    Case("content-header-on-channel-0", lambda c: content_header(0, 3), "UNEXPECTED_FRAME - "),
    Case(
        "connection-close-on-channel-1",
        lambda c: method_frame(1, commands.Connection.Close(200, "", 0, 0)),
    ),
    Case("second-channel-open", lambda c: method_frame(1, commands.Channel.Open())),
    Case(
        "exchange-declare-unknown-type",
        lambda c: method_frame(
            1, commands.Exchange.Declare(exchange="amqplex-iso", exchange_type="x-no-such-type")
        ),
    ),
    Case("qos-prefetch-size", lambda c: method_frame(1, commands.Basic.Qos(prefetch_size=10))),
    Case("publish-immediate", lambda c: publish(1, immediate=True) + content_header(1, 0)),
    Case("channel-flow-inactive", lambda c: method_frame(1, commands.Channel.Flow(active=False))),
    Case(
        # Deliver carries content: the broker answers once it has all of it.
        "server-only-basic-deliver",
        lambda c: (
            method_frame(1, commands.Basic.Deliver("ctag", 1, False, "", "q"))
            + content_header(1, 3)
            + body_frame(1, b"abc")
        ),
    ),
    # RabbitMQ limits how many channels are open, not their ids: a channel id
    # above channel_max is opened ...
    Case(
        "channel-id-above-channel-max",
        lambda c: method_frame(c.tune.channel_max + 1, commands.Channel.Open()),
    ),
    Case(
        "consumer-tag-reused",
        lambda c: method_frame(1, commands.Basic.Consume(queue=CTAG_QUEUE, consumer_tag="ct1")),
        prepare=(
            commands.Queue.Declare(queue=CTAG_QUEUE, exclusive=True),
            commands.Basic.Consume(queue=CTAG_QUEUE, consumer_tag="ct1"),
        ),
    ),
    Case("recover-without-requeue", lambda c: method_frame(1, commands.Basic.Recover(False))),
    # RabbitMQ never sends Channel.Flow, and has no answer to its FlowOk.
    Case("channel-flow-ok", lambda c: method_frame(1, commands.Channel.FlowOk(active=True))),
    Case(
        "method-with-trailing-bytes",
        lambda c: with_extra_byte(declare(1)),
        text_prefix="FRAME_ERROR - cannot decode",
    ),
    Case("malformed-utf8-queue-name", lambda c: queue_declare_named(1, b"\xff\xfeq")),
    # A Channel.Close is answered by the proxy on a clean channel and
    # forwarded on one with state: malformed, it reaches neither way.
    Case(
        "channel-close-without-arguments",
        lambda c: bare_method(1, commands.Channel.Close),
        text_prefix="FRAME_ERROR - cannot decode",
    ),
    Case(
        "channel-close-without-arguments-on-a-channel-with-state",
        lambda c: bare_method(1, commands.Channel.Close),
        text_prefix="FRAME_ERROR - cannot decode",
        prepare=(commands.Basic.Qos(prefetch_count=1),),
    ),
    Case(
        "channel-close-with-trailing-bytes",
        lambda c: with_extra_byte(method_frame(1, commands.Channel.Close(200, "bye", 0, 0))),
        text_prefix="FRAME_ERROR - cannot decode",
        prepare=(commands.Basic.Qos(prefetch_count=1),),
    ),
    Case(
        "malformed-content-properties",
        lambda c: publish(1) + with_extra_byte(content_header(1, 3)) + body_frame(1, b"abc"),
        text_prefix="INTERNAL_ERROR",
    ),
    # Whole messages in one read take a shorter path (publish_whole): the
    # same answers there, with the frame after the message sent with it.
    Case(
        "body-frame-after-a-zero-size-header",
        lambda c: publish(1) + content_header(1, 0) + body_frame(1, b""),
    ),
    Case(
        "publish-immediate-with-its-body",
        lambda c: publish(1, immediate=True) + content_header(1, 3) + body_frame(1, b"abc"),
    ),
    Case(
        "content-header-for-another-class-with-its-body",
        lambda c: publish(1) + content_header(1, 3, 61) + body_frame(1, b"abc"),
    ),
    Case(
        "method-after-a-whole-message",
        lambda c: (
            publish(1) + content_header(1, 3) + body_frame(1, b"abc") + publish(1) + declare(1)
        ),
    ),
    # Direct reply-to keys on the default exchange that the broker cannot
    # decode crash its channel: 541 for the whole connection.
    Case(
        "direct-reply-to-key-not-base64",
        lambda c: whole_publish(1, "amq.rabbitmq.reply-to.abc.def"),
        text_prefix="INTERNAL_ERROR",
    ),
    Case(
        "direct-reply-to-key-not-a-pid",
        lambda c: whole_publish(1, "amq.rabbitmq.reply-to.g2EF.key"),
        text_prefix="INTERNAL_ERROR",
    ),
    Case(
        "direct-reply-to-key-of-a-node-not-reply",
        lambda c: split_body_publish(1, pid_key(b"rabbit@localhost")),
        text_prefix="INTERNAL_ERROR",
    ),
    Case(
        "direct-reply-to-key-with-an-atom-ext-node",
        lambda c: whole_publish(1, pid_key(b"reply@1", atom=b"d")),
        text_prefix="INTERNAL_ERROR",
    ),
    Case(
        "direct-reply-to-key-not-utf8",
        lambda c: publish_to_key(1, b"amq.rabbitmq.reply-to.\xff"),
        text_prefix="INTERNAL_ERROR",
    ),
    Case(
        "direct-reply-to-key-in-a-cc-header",
        lambda c: whole_publish(1, "q", headers={"CC": ["q", 5, "amq.rabbitmq.reply-to.x.y"]}),
        text_prefix="INTERNAL_ERROR",
    ),
    # ... and one channel more than channel_max is 530 NOT_ALLOWED.
    Case(
        "more-channels-than-channel-max",
        lambda c: method_frame(3, commands.Channel.Open()),
        channel_max=2,
        open_first=(2,),
    ),
]


# -- talking to a server, raw ------------------------------------------------------------


def connect(port: int, user, channel_max: int = 0, channels: tuple[int, ...] = ()) -> RawClient:
    """A raw client, connected as `user`, with channel 1 (and `channels`) open."""
    client = RawClient(port)
    client.send(PROTOCOL_HEADER)
    client.expect(commands.Connection.Start)
    client.method(
        0,
        commands.Connection.StartOk(
            client_properties={"product": "rawclient"},
            mechanism="PLAIN",
            response=plain_response(Credentials(user.name, user.password)),
            locale="en_US",
        ),
    )
    _, client.tune = client.expect(commands.Connection.Tune)
    client.method(
        0,
        commands.Connection.TuneOk(
            channel_max=channel_max or client.tune.channel_max,
            frame_max=client.tune.frame_max,
            heartbeat=0,
        ),
    )
    client.method(0, commands.Connection.Open(virtual_host="/"))
    client.expect(commands.Connection.OpenOk)
    for channel in (1, *channels):
        client.open_channel(channel)
    return client


@dataclasses.dataclass(frozen=True)
class Answer:
    # (channel, method name[, code, class_id, method_id]) of the first reply.
    key: tuple
    text: str = ""


def misbehave(port: int, user, case: Case) -> Answer:
    """Send the case's bytes and return the server's first answer."""
    with connect(port, user, case.channel_max, case.open_first) as client:
        for request in case.prepare:
            client.method(1, request)
            client.read_method(ANSWER_TIMEOUT)
        client.send(case.send(client))
        got = client.read_method(ANSWER_TIMEOUT)
        assert got is not None, f"{case.name}: port {port} closed the socket without a word"
        channel, method = got
        if not isinstance(method, commands.Connection.Close):
            return Answer((channel, method.name))
        client.method(0, commands.Connection.CloseOk())
        return Answer(
            (channel, method.name, method.reply_code, method.class_id, method.method_id),
            method.reply_text,
        )


def upstream_names(user) -> list[str]:
    return sorted(row["name"] for row in broker.proxy_connections(user.name))


# -- the tests ---------------------------------------------------------------------------


@dataclasses.dataclass
class SharedUpstream:
    user: broker.BrokerUser
    canary: Canary
    names: list[str]


@pytest.fixture(scope="module")
def shared(amqplexd):
    """One user, one canary and so one upstream for the whole table: every
    misbehaving client joins the canary's upstream (a user per case would
    cost seconds of rabbitmqctl each)."""
    user = broker.new_user()
    canary = Canary(amqplexd.port, user)
    try:
        names = upstream_names(user)
        assert len(names) == 1, names
        yield SharedUpstream(user, canary, names)
    finally:
        canary.stop()


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_misbehaviour_gets_the_brokers_answer_on_that_client_alone(case, amqplexd, shared):
    direct = misbehave(broker.BROKER_PORT, shared.user, case)
    proxied = misbehave(amqplexd.port, shared.user, case)

    assert proxied.key == direct.key, (proxied, direct)
    if case.text_prefix is None:
        assert proxied.text == direct.text
    else:
        assert direct.text.startswith(case.text_prefix), direct.text
        assert proxied.text.startswith(case.text_prefix), proxied.text
    # The canary on the same upstream never noticed, and that upstream is
    # still the one it was.
    shared.canary.wait_round_trips(5)
    assert upstream_names(shared.user) == shared.names


# A headers table of eight octets whose one value, a long string, claims five
# octets where one is left; and Queue.Declare arguments of a key with no value.
# pamqp decodes both (reading past the table, or a None); RabbitMQ's reader or
# channel crashes on them and takes the whole connection down.
def overrunning_header(body_size: int) -> bytes:
    payload = struct.pack(">HHQ", 60, 0, body_size) + bytes.fromhex("2000000000080161530000000578")
    return _frame(2, payload)


_KEY_WITHOUT_VALUE = bytes.fromhex("0032000a000001710000000002016100")


@pytest.mark.parametrize(
    ("send", "code"),
    [
        (lambda: publish(1) + overrunning_header(0), 541),
        (lambda: publish(1) + overrunning_header(3) + body_frame(1, b"abc"), 541),
        (lambda: _frame(1, _KEY_WITHOUT_VALUE), 501),
    ],
    ids=["header-table-value-past-its-end", "the-same-in-a-whole-message", "key-without-value"],
)
def test_a_field_table_the_broker_cannot_parse_never_reaches_it(amqplexd, shared, send, code):
    """RabbitMQ parses a table within its own length; one it cannot parse
    crashes its reader or channel, closing the connection it came on: the
    proxy refuses it on that client, and the upstream stays."""
    with connect(amqplexd.port, shared.user) as client:
        client.send(send())
        close = client.expect_connection_close(ANSWER_TIMEOUT)
    assert close.reply_code == code
    shared.canary.wait_round_trips(5)
    assert upstream_names(shared.user) == shared.names


def replies(port: int, user, batches: list[list]) -> list[str]:
    """Each batch of channel 1 requests sent in one write, then as many
    answers read: the names of all the answers, up to a Connection.Close."""
    names = []
    with connect(port, user) as client:
        for batch in batches:
            client.send(b"".join(method_frame(1, request) for request in batch))
            for _ in batch:
                _, answer = client.read_method(ANSWER_TIMEOUT)
                names.append(answer.name)
                if isinstance(answer, commands.Connection.Close):
                    return names
    return names


def test_a_cancel_sent_before_its_consume_ok_waits_for_it(amqplexd, shared):
    """RabbitMQ 3.10's channel crashes when a Cancel overtakes its
    consumer's ConsumeOk (541 INTERNAL_ERROR for the whole connection, the
    shared upstream here): the proxy holds the Cancel, and what follows
    it, until the ConsumeOk has come. The tag is free again after."""
    batches = [
        [commands.Queue.Declare(queue="", exclusive=True)],
        [
            commands.Basic.Consume(queue="", consumer_tag="again"),
            commands.Basic.Cancel(consumer_tag="again"),
            commands.Basic.Qos(prefetch_count=5),
        ],
        [commands.Basic.Consume(queue="", consumer_tag="again")],
    ]
    names = replies(amqplexd.port, shared.user, batches)
    # The broker answers the Qos itself and the Cancel once its queue has:
    # QosOk comes first, as it does directly.
    assert names == [
        "Queue.DeclareOk",
        "Basic.ConsumeOk",
        "Basic.QosOk",
        "Basic.CancelOk",
        "Basic.ConsumeOk",
    ]
    shared.canary.wait_round_trips(5)
    assert upstream_names(shared.user) == shared.names


def test_a_channel_close_behind_a_held_cancel_goes_after_it(amqplexd, shared):
    """The broker answers a Cancel and a Close sent together with CloseOk
    alone (the channel ends before its queue answers the Cancel)."""
    with connect(amqplexd.port, shared.user) as client:
        client.method(1, commands.Queue.Declare(queue="", exclusive=True))
        client.expect(commands.Queue.DeclareOk)
        client.send(
            method_frame(1, commands.Basic.Consume(queue="", consumer_tag="c"))
            + method_frame(1, commands.Basic.Cancel(consumer_tag="c"))
            + method_frame(1, commands.Channel.Close(200, "bye", 0, 0))
        )
        client.expect(commands.Basic.ConsumeOk, ANSWER_TIMEOUT)
        client.expect(commands.Channel.CloseOk, ANSWER_TIMEOUT)
        client.open_channel(1)  # the id is free again
    shared.canary.wait_round_trips(5)
    assert upstream_names(shared.user) == shared.names


def test_a_tag_only_the_direct_reply_to_consumer_has_is_no_reuse(amqplexd, shared):
    """The proxy refuses a live tag itself (the broker's 530 would close the
    upstream), but RabbitMQ keeps the reply consumer apart from the others."""
    batches = [
        [commands.Basic.Consume(queue="amq.rabbitmq.reply-to", consumer_tag="r", no_ack=True)],
        [commands.Queue.Declare(queue="", exclusive=True)],
        [commands.Basic.Consume(queue="", consumer_tag="r")],
    ]
    direct = replies(broker.BROKER_PORT, shared.user, batches)
    assert direct[-1] == "Basic.ConsumeOk", direct
    assert replies(amqplexd.port, shared.user, batches) == direct
    shared.canary.wait_round_trips(5)
    assert upstream_names(shared.user) == shared.names


def _frame(frame_type: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", frame_type, 1, len(payload)) + payload + b"\xce"


def test_body_longer_than_its_header_says_is_a_frame_error_kept_from_the_upstream(amqplexd, shared):
    """RabbitMQ itself never answers this one (its channel waits for a body
    size below zero for ever), so there is nothing to compare: forwarded, it
    would wedge an upstream channel. The proxy refuses it on that client."""
    with connect(amqplexd.port, shared.user) as client:
        client.send(publish(1) + content_header(1, 2) + body_frame(1, b"abc"))
        close = client.expect_connection_close(ANSWER_TIMEOUT)
    assert close.reply_code == 501
    assert close.reply_text.startswith("FRAME_ERROR - ")
    shared.canary.wait_round_trips(5)
    assert upstream_names(shared.user) == shared.names


@pytest.mark.parametrize("whole", [True, False], ids=["whole-message", "method-alone"])
def test_publish_while_a_commit_is_pending_is_refused_on_that_client_alone(amqplexd, shared, whole):
    """Between Tx.Commit and its CommitOk RabbitMQ takes nothing but
    Channel.Close on the channel and closes the connection (504) for
    anything else: a publish there never reaches the shared upstream, and
    its client alone gets that 504. (Compared with the broker it would be a
    race: the broker may have committed before the publish arrives.)"""
    with connect(amqplexd.port, shared.user) as client:
        client.method(1, commands.Tx.Select())
        client.expect(commands.Tx.SelectOk)
        message = publish(1, "amqplex-nowhere")
        if whole:
            message += content_header(1, 3) + body_frame(1, b"abc")
        client.send(method_frame(1, commands.Tx.Commit()) + message)
        close = client.expect_connection_close(ANSWER_TIMEOUT)
    assert close.reply_code == 504
    assert (close.class_id, close.method_id) == (60, 40)
    assert "unexpected command while processing 'tx.commit'" in close.reply_text
    shared.canary.wait_round_trips(5)
    assert upstream_names(shared.user) == shared.names


@pytest.mark.parametrize("port", ["direct", "proxied"])
def test_whole_publishes_before_a_bad_one_in_the_same_read_all_arrive(
    port, amqplexd, shared, queue_name
):
    """A streaming client's read goes upstream a run at a time
    (ClientChannel.publish_whole): the messages before a bad one in the same
    read reach their queue, as they do sent straight to the broker, and the
    bad one gets the broker's answer."""
    good = 50
    stream = b"".join(
        publish(1, queue_name) + content_header(1, 4) + body_frame(1, b"%04d" % n)
        for n in range(good)
    )
    bad = publish(1, queue_name) + content_header(1, 3, 61) + body_frame(1, b"bad")
    with connect(broker.BROKER_PORT if port == "direct" else amqplexd.port, shared.user) as client:
        client.method(1, commands.Queue.Declare(queue=queue_name))
        client.expect(commands.Queue.DeclareOk)
        client.send(stream + bad)
        close = client.expect_connection_close(ANSWER_TIMEOUT)
        # The broker may close its socket before our CloseOk (a reset then):
        # the answer is what counts.
        with contextlib.suppress(ConnectionError):
            client.method(0, commands.Connection.CloseOk())
    assert (close.reply_code, close.class_id, close.method_id) == (505, 60, 40)
    connection = pika.BlockingConnection(broker_params())
    try:
        channel = connection.channel()
        # Through the proxy, the Close may reach the client before the broker
        # has queued the publishes written upstream with it.
        wait_until(
            lambda: channel.queue_declare(queue_name, passive=True).method.message_count >= good,
            what=f"{good} messages in the queue",
        )
        bodies = []
        while (got := channel.basic_get(queue_name, auto_ack=True))[0] is not None:
            bodies.append(got[2])
        assert bodies == [b"%04d" % n for n in range(good)]
    finally:
        connection.close()
    shared.canary.wait_round_trips(5)
    assert upstream_names(shared.user) == shared.names


def test_client_dying_mid_message_leaves_nothing_on_the_shared_connection(
    relay, fresh_amqplexd, user, canary_for, queue_name
):
    daemon = fresh_amqplexd(upstream=relay.url)
    canary = canary_for(daemon.port, user)
    names = upstream_names(user)
    assert len(names) == 1, names
    half = uuid.uuid4().hex.encode() * 25  # 800 bytes no other frame carries

    client = connect(daemon.port, user)
    client.method(1, commands.Queue.Declare(queue=queue_name))
    client.expect(commands.Queue.DeclareOk)
    client.method(1, commands.Confirm.Select())
    client.expect(commands.Confirm.SelectOk)
    # One whole message, confirmed: routing to the queue works.
    client.publish(1, b"whole", routing_key=queue_name)
    client.expect(commands.Basic.Ack)
    # Then a publish whose body stops short: its header announces 2000 bytes,
    # one body frame of 800 arrives and then half of the next frame.
    client.send(publish(1, queue_name) + content_header(1, 2000) + body_frame(1, half))
    # A reply on another channel shows the proxy has read all of that.
    client.open_channel(2)
    client.send(body_frame(1, half)[:400])
    client.close()

    # The proxy closes the dead client's upstream channel; nothing of the
    # unfinished publish went before that Close.
    uid = wait_for_upstream_close(relay, queue_name)
    upstream = b"".join(conn.data(UP) for conn in relay.connections)
    assert half[:100] not in upstream
    publishes = [
        f
        for conn in relay.connections
        for f in conn.frames(UP)
        if isinstance(f.method, commands.Basic.Publish) and f.method.routing_key == queue_name
    ]
    assert [f.channel for f in publishes] == [uid]

    canary.wait_round_trips(5)
    assert upstream_names(user) == names
    connection = pika.BlockingConnection(broker_params())
    try:
        channel = connection.channel()
        assert channel.queue_declare(queue_name, passive=True).method.message_count == 1
        _, _, body = channel.basic_get(queue_name, auto_ack=True)
        assert body == b"whole"
    finally:
        connection.close()


def wait_for_upstream_close(relay, queue_name: str, timeout: float = 10) -> int:
    """The upstream channel id that carried publishes to `queue_name`, once the
    proxy has sent Channel.Close on it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for conn in list(relay.connections):
            uid = None
            for f in conn.frames(UP):
                if isinstance(f.method, commands.Basic.Publish) and (
                    f.method.routing_key == queue_name
                ):
                    uid = f.channel
                elif (
                    uid is not None
                    and f.channel == uid
                    and isinstance(f.method, commands.Channel.Close)
                ):
                    return uid
        time.sleep(0.02)
    raise AssertionError("the proxy never closed the dead client's upstream channel")
