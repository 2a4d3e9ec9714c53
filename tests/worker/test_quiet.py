"""Quiet publishes (amqplex/worker/quiet.py): which publishes the proxy
lets a recycled channel pass on without a probe, and that every kind it
refuses to call quiet does draw the broker's error after a channel was
proven, an error the next client on that channel never sees."""

from __future__ import annotations

import struct

import pika
import pytest
from pamqp import body as pamqp_body
from pamqp import commands, frame, header

from amqplex.protocol import framing
from amqplex.worker import quiet
from tests.conftest import proxy_params
from tests.master.test_status import scrape
from tests.support.rawclient import RawClient, body_frame
from tests.support.relay import DOWN, UP
from tests.support.waiting import wait_until
from tests.worker.test_channels import (
    amqp_connections,
    close_method,
    publish_to,
    ready_count,
    take_channels_then_resume,
    upstream_frames,
    wait_pool_warm,
)


def method_frame(exchange: str = "", routing_key: str = "q") -> bytes:
    return frame.marshal(commands.Basic.Publish(exchange=exchange, routing_key=routing_key), 1)


def header_frame(**properties) -> bytes:
    return frame.marshal(header.ContentHeader(0, 3, commands.Basic.Properties(**properties)), 1)


@pytest.mark.parametrize(
    "routing_key", ["", "q", "amq.rabbitmq", "amq.gen-x", "amq.rabbitmqx", "x" * 255]
)
def test_a_publish_to_the_default_exchange_is_quiet(routing_key):
    assert quiet.quiet_method(method_frame(routing_key=routing_key))


@pytest.mark.parametrize(
    ("exchange", "routing_key"),
    [
        ("amq.direct", "q"),
        ("x", ""),
        ("", "amq.rabbitmq.reply-to"),
        ("", "amq.rabbitmq.reply-to.g2dkAA"),
        ("", "amq.rabbitmq."),
    ],
)
def test_another_exchange_or_a_reserved_routing_key_is_not_quiet(exchange, routing_key):
    assert not quiet.quiet_method(method_frame(exchange, routing_key))


def test_properties_the_broker_does_not_check_are_quiet():
    assert quiet.quiet_header(header_frame())
    assert quiet.quiet_header(
        header_frame(
            content_type="text/plain",
            content_encoding="gzip",
            delivery_mode=2,
            priority=5,
            correlation_id="c",
            message_id="m",
            message_type="t",
            app_id="a",
            expiration="60000",
        )
    )


@pytest.mark.parametrize(
    "properties",
    [
        {"headers": {}},
        {"headers": {"CC": "not-an-array"}},
        {"reply_to": "amq.rabbitmq.reply-to"},
        {"reply_to": "any"},
        {"expiration": "soon"},
        {"expiration": "1234567890"},  # RabbitMQ takes it; nine digits are enough
        {"user_id": "someone-else"},
    ],
    ids=[
        "empty-headers",
        "cc-header",
        "direct-reply-to",
        "reply-to",
        "expiration",
        "ten-digit-expiration",
        "user-id",
    ],
)
def test_properties_the_broker_checks_are_not_quiet(properties):
    assert not quiet.quiet_header(header_frame(**properties))


@pytest.mark.parametrize(
    "properties",
    [
        {},
        {"delivery_mode": 2},
        {"content_type": "a", "delivery_mode": 1, "priority": 3, "correlation_id": "c-1"},
        {"priority": 9},
        {"correlation_id": "xyz"},
    ],
)
@pytest.mark.parametrize(
    "expiration", ["0", "60000", "999999999", "1e3", "+5", " 5", "soon", "1234567890"]
)
def test_only_expirations_of_one_to_nine_digits_are_quiet_in_python_and_compiled(
    properties, expiration
):
    """RabbitMQ refuses an expiration that is not a number (406); the
    compiled run says the same as quiet.py, whatever comes before it."""
    content_header = header_frame(expiration=expiration, **properties)
    expected = expiration.isdigit() and len(expiration) <= 9
    assert quiet.quiet_header(content_header) is expected
    body = frame.marshal(pamqp_body.ContentBody(b"abc"), 1)
    frames = [(1, 1, method_frame()), (2, 1, content_header), (3, 1, body)]
    _, end, _, unsettled, _ = framing._walk.whole_publishes(frames, 0, 1, b"\x00\x02")
    assert (end, unsettled) == (3, not expected)


def with_delivery_mode(mode: int, **properties) -> bytes:
    """A content header whose delivery_mode octet is `mode` (pamqp encodes
    only 1 and 2): the octet after the short strings that come first."""
    raw = bytearray(header_frame(delivery_mode=2, **properties))
    at = 7 + 14 + sum(1 + len(properties.get(name, "")) for name in properties)
    assert raw[at] == 2
    raw[at] = mode
    return bytes(raw)


@pytest.mark.parametrize(
    "properties",
    [
        {},
        {"content_type": "text/plain"},
        {"content_encoding": "gzip"},
        {"content_type": "a", "content_encoding": "bc"},
    ],
)
def test_only_delivery_modes_1_and_2_are_quiet_in_python_and_compiled(properties):
    """The broker refuses any other (406, delivery_mode_unknown); the
    compiled run (_walk.whole_publishes) says the same as quiet.py."""
    method = method_frame()
    body = frame.marshal(pamqp_body.ContentBody(b"abc"), 1)
    for mode in range(256):
        content_header = with_delivery_mode(mode, **properties)
        expected = mode in (1, 2)
        assert quiet.quiet_header(content_header) is expected, mode
        frames = [(1, 1, method), (2, 1, content_header), (3, 1, body)]
        pieces, end, _, unsettled, largest = framing._walk.whole_publishes(
            frames, 0, 1, b"\x00\x02"
        )
        assert (len(pieces), end, unsettled, largest) == (1, 3, not expected, 3), mode


# -- against the broker: what a proven channel skips, and what it never skips ----------


def _leave(client: RawClient, channel: int = 1) -> None:
    client.method(channel, commands.Channel.Close(**close_method()))
    client.expect(commands.Channel.CloseOk)
    client.method(0, commands.Connection.Close(**close_method()))
    client.expect(commands.Connection.CloseOk)


def _probes_settled(relay) -> bool:
    """Every Basic.Recover the proxy sent has its RecoverOk back."""
    sent = upstream_frames(relay, lambda f: isinstance(f.method, commands.Basic.Recover))
    answered = [
        f
        for conn in amqp_connections(relay)
        for f in conn.frames(DOWN)
        if isinstance(f.method, commands.Basic.RecoverOk)
    ]
    return len(sent) == len(answered)


def _taking_turns(fresh_amqplexd, relay, user, queue_name: str):
    """A daemon through the relay keeping one channel ready, so that clients
    take turns on the same few, with `queue_name` declared and the setup
    channel's probe back."""
    daemon = fresh_amqplexd(
        upstream=relay.url,
        env={"AMQP_POOL_IDLE_CHANNELS": "1", "AMQP_POOL_MAX_IDLE_CHANNELS": "1"},
    )
    setup = pika.BlockingConnection(proxy_params(daemon.port, user))
    setup.channel().queue_declare(queue_name)
    setup.close()
    wait_pool_warm(relay)
    wait_until(lambda: _probes_settled(relay), what="the setup channel's probe")
    return daemon


def test_a_quiet_client_leaves_a_proven_channel_to_the_next_without_a_probe(
    fresh_amqplexd, relay, user, queue_name
):
    """One client after another, each publishing one quiet message: a
    channel is probed after a publish larger than any proven on it, and
    only then; every message arrives."""
    daemon = _taking_turns(fresh_amqplexd, relay, user, queue_name)
    sizes = [10, 10, 10, 100, 50, 100, 10, 200, 10, 10]
    # Every other one with the properties a quiet publish may carry.
    persistent = commands.Basic.Properties(delivery_mode=2, expiration="600000")
    for n, size in enumerate(sizes):
        with RawClient(daemon.port) as client:
            client.handshake(user.name, user.password)
            client.open_channel(1)
            properties = persistent if n % 2 else None
            client.publish(1, bytes(size), routing_key=queue_name, properties=properties)
            _leave(client)
        # The next client takes a channel only once its probe, if any, is back.
        wait_until(lambda: _probes_settled(relay), what="a probe's RecoverOk")
    wait_until(lambda: ready_count(queue_name) == len(sizes), what="every message queued")

    skipped = 0
    for conn in amqp_connections(relay):
        events: dict[int, list] = {}  # per upstream channel: publish sizes and probes
        for f in conn.frames(UP):
            if isinstance(f.method, commands.Basic.Publish) and f.method.routing_key == queue_name:
                events.setdefault(f.channel, []).append("publish")
            elif f.frame_type == 2 and events.get(f.channel, [None])[-1] == "publish":
                events[f.channel][-1] = struct.unpack_from(">Q", f.raw, 7 + 4)[0]
            elif isinstance(f.method, commands.Basic.Recover):
                events.setdefault(f.channel, []).append("probe")
        for channel, seen in events.items():
            while seen and seen[0] == "probe":
                seen.pop(0)  # the setup client's queue.declare, probed
            proven, expected = -1, []
            for size in seen:
                if size == "probe":
                    continue
                expected.append(size)
                if size > proven:
                    expected.append("probe")
                    proven = size
                else:
                    skipped += 1
            assert seen == expected, f"upstream channel {channel}"
    assert skipped >= 5, "no channel was passed on without a probe"
    probes = len(upstream_frames(relay, lambda f: isinstance(f.method, commands.Basic.Recover)))

    def counted() -> dict[str, float] | None:
        # Written once a second, one counter after the other: wait for both.
        metrics = scrape(daemon.status_port)
        sent = metrics.get("amqplex_channels_recycled_total{probe=sent}", 0)
        unprobed = metrics.get("amqplex_channels_recycled_total{probe=skipped}", 0)
        return metrics if sent >= probes and unprobed >= skipped else None

    metrics = wait_until(counted, what="the recycled-channel counters")
    assert metrics["amqplex_channels_recycled_total{probe=sent}"] == probes
    assert metrics["amqplex_channels_recycled_total{probe=skipped}"] == skipped


def test_a_message_left_half_sent_proves_nothing(fresh_amqplexd, relay, user, queue_name):
    """A client that announces a body and leaves before sending it published
    nothing: the channel it leaves is no proof that the broker takes a body
    that size (RabbitMQ's own max_message_size may be smaller than the
    proxy's), so the next such publish on it is still probed."""
    daemon = _taking_turns(fresh_amqplexd, relay, user, queue_name)
    for _ in range(2):  # on each of the channels the clients take turns on
        with RawClient(daemon.port) as client:
            client.handshake(user.name, user.password)
            client.open_channel(1)
            announced = header.ContentHeader(0, 100_000, commands.Basic.Properties())
            client.send(method_frame(routing_key=queue_name) + frame.marshal(announced, 1))
            client.send(body_frame(1, b"x" * 1000))  # and no more of it
            client.method(0, commands.Connection.Close(**close_method()))
            client.expect(commands.Connection.CloseOk)
        wait_until(lambda: _probes_settled(relay), what="a probe's RecoverOk")
    with RawClient(daemon.port) as client:
        client.handshake(user.name, user.password)
        client.open_channel(1)
        client.publish(1, bytes(50_000), routing_key=queue_name)
        _leave(client)
    ((conn, publish),) = wait_until(
        lambda: upstream_frames(relay, publish_to(queue_name)), what="the publish upstream"
    )
    wait_until(
        lambda: any(
            f.channel == publish.channel
            and f.seq > publish.seq
            and isinstance(f.method, commands.Basic.Recover)
            for f in conn.frames(UP)
        ),
        timeout=5,
        what="a probe after the publish",
    )
    wait_until(lambda: ready_count(queue_name) == 1, what="the one whole message queued")


def _loud_header(**properties) -> bytes:
    return frame.marshal(header.ContentHeader(0, 1, commands.Basic.Properties(**properties)), 1)


def _unknown_delivery_mode() -> bytes:
    raw = bytearray(_loud_header(delivery_mode=2))
    raw[7 + 14] = 7
    return bytes(raw)


@pytest.mark.parametrize(
    ("exchange", "content_header", "code"),
    [
        ("amqplex-missing-exchange", _loud_header(), 404),
        ("", _loud_header(expiration="soon"), 406),
        ("", _loud_header(user_id="someone-else"), 406),
        ("", _loud_header(headers={"CC": "not-an-array"}), 406),
        ("", _loud_header(reply_to="amq.rabbitmq.reply-to"), 406),
        ("", _unknown_delivery_mode(), 406),
    ],
    ids=["missing-exchange", "expiration", "user-id", "cc-header", "direct-reply-to", "mode-7"],
)
def test_a_publish_the_broker_refuses_is_probed_even_on_a_proven_channel(
    fresh_amqplexd, relay, user, queue_name, canary_for, exchange, content_header, code
):
    # None opened ahead, one kept: each client gets the channel the one
    # before it left, A's included, unless A's is probed.
    daemon = fresh_amqplexd(
        upstream=relay.url,
        env={"AMQP_POOL_IDLE_CHANNELS": "0", "AMQP_POOL_MAX_IDLE_CHANNELS": "1"},
    )
    canary = canary_for(daemon.port, user)  # on a channel of its own
    canary.wait_round_trips(2)
    setup = pika.BlockingConnection(proxy_params(daemon.port, user))
    setup.channel().queue_declare(queue_name)
    setup.close()
    for _ in range(2):  # the second client's channel has been proven by the first's
        with RawClient(daemon.port) as prover:
            prover.handshake(user.name, user.password)
            prover.open_channel(1)
            prover.publish(1, b"0123456789", routing_key=queue_name)
            _leave(prover)
        wait_until(lambda: _probes_settled(relay), what="a probe's RecoverOk")

    # Nothing comes back from the broker until B holds its channels: A's
    # refusal is still on its way when B's Channel.Opens are answered.
    relay.stall(DOWN)
    b = RawClient(daemon.port)
    try:
        with RawClient(daemon.port) as a:
            a.handshake(user.name, user.password)
            a.open_channel(1)
            a.method(1, commands.Basic.Publish(exchange=exchange, routing_key=queue_name))
            a.send(content_header + frame.marshal(pamqp_body.ContentBody(b"x"), 1))
            _leave(a)
        b.handshake(user.name, user.password)
        got = take_channels_then_resume(b, relay, range(1, 4))
    finally:
        relay.resume(DOWN)
        b.close()
    closes = [(ch, m.reply_code) for ch, m in got if isinstance(m, commands.Channel.Close)]
    assert closes == [], f"B was handed a channel with A's refusal pending: {closes}"
    canary.wait_round_trips(3)

    # A's publish did draw the broker's refusal, on the channel it had.
    conn, publish = upstream_frames(
        relay,
        lambda f: (
            isinstance(f.method, commands.Basic.Publish) and f.method.routing_key == queue_name
        ),
    )[-1]
    assert publish.method.exchange == exchange
    refusals = [
        f.method.reply_code
        for f in conn.frames(DOWN)
        if f.channel == publish.channel
        and f.seq > publish.seq
        and isinstance(f.method, commands.Channel.Close)
    ]
    assert refusals == [code]
