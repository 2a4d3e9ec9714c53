"""Clients that stream are read straight into a buffer of their own
(amqplex/worker/streaming_client.py): what they publish arrives whole and
in order, a frame cut by the switch is carried over, a client that stops
streaming goes back to the shared buffer, its reads keep it alive, its
leaving ends its session, and a bad frame while it streams gets the
broker's own error, with the canary on the same upstream untouched."""

from __future__ import annotations

import os
import time

import pika
import pytest
from pamqp import commands, frame, header

from amqplex.protocol.constants import ReplyCode
from tests.conftest import broker_params, proxy_params
from tests.support.rawclient import RawClient, body_frame
from tests.support.waiting import wait_until

DEBUG = {"AMQP_LOG_LEVEL": "debug"}
SWITCHED = "streams: reading it into a buffer of its own"
SWITCHED_BACK = "stopped streaming"


def broker_bodies(queue: str, count: int) -> list[bytes]:
    """The next `count` messages of `queue`, read at the broker itself."""
    connection = pika.BlockingConnection(broker_params())
    channel = connection.channel()
    bodies = []
    for _ in range(count):
        method, _, body = channel.basic_get(queue, auto_ack=True)
        assert method is not None, f"{len(bodies)} of {count} messages reached the broker"
        bodies.append(body)
    connection.close()
    return bodies


def declare(queue: str) -> None:
    connection = pika.BlockingConnection(broker_params())
    connection.channel().queue_declare(queue)
    connection.close()


def test_a_streaming_publisher_is_switched_and_its_messages_arrive_whole_and_in_order(
    fresh_amqplexd, user, queue_name, canary_for
):
    daemon = fresh_amqplexd(env=DEBUG)
    canary = canary_for(daemon.port, user)
    declare(queue_name)
    # Large ones (several body frames each) with small ones between them.
    sent = [os.urandom(300_000) if i % 3 else os.urandom(200) for i in range(30)]
    connection = pika.BlockingConnection(proxy_params(daemon.port, user))
    channel = connection.channel()
    channel.confirm_delivery()
    for body in sent:
        channel.basic_publish("", queue_name, body)
    connection.close()
    daemon.wait_for_log(SWITCHED)
    assert broker_bodies(queue_name, len(sent)) == sent
    canary.wait_round_trips(3)


@pytest.fixture
def streaming_raw_client(fresh_amqplexd, user, queue_name, canary_for):
    """A raw client on channel 1 of a debug-logging daemon, with a canary
    on its upstream: (client, daemon, canary)."""
    daemon = fresh_amqplexd(env=DEBUG)
    canary = canary_for(daemon.port, user)
    declare(queue_name)
    with RawClient(daemon.port) as client:
        client.handshake(user.name, user.password)
        client.open_channel()
        yield client, daemon, canary


def publish_start(queue: str, size: int) -> bytes:
    return frame.marshal(commands.Basic.Publish(exchange="", routing_key=queue), 1) + frame.marshal(
        header.ContentHeader(0, size, commands.Basic.Properties()), 1
    )


def test_a_frame_the_switch_cuts_in_two_is_carried_over(streaming_raw_client, queue_name):
    client, daemon, canary = streaming_raw_client
    first, second = os.urandom(100_000), os.urandom(100_000)
    body = body_frame(1, first) + body_frame(1, second)
    cut = len(body_frame(1, first)) + 50_000
    # One read of 150 KB switches the client with half a frame held.
    client.send(publish_start(queue_name, len(first) + len(second)) + body[:cut])
    daemon.wait_for_log(SWITCHED)
    client.send(body[cut:])
    assert broker_bodies(queue_name, 1) == [first + second]
    canary.wait_round_trips(3)


def test_a_bad_frame_while_streaming_gets_the_brokers_frame_error(streaming_raw_client, queue_name):
    client, daemon, canary = streaming_raw_client
    body = body_frame(1, os.urandom(100_000))
    # Half a frame held: the client streams on until it is complete.
    client.send(publish_start(queue_name, 100_000) + body[:50_000])
    daemon.wait_for_log(SWITCHED)
    client.send(body[50_000:] + body_frame(1, b"abc")[:-1] + b"\x00")  # a bad frame end
    close = client.expect_connection_close()
    assert close.reply_code == ReplyCode.FRAME_ERROR
    assert SWITCHED_BACK not in daemon.log_text()
    canary.wait_round_trips(3)


def test_a_streaming_client_that_sends_no_heartbeats_stays_while_it_streams(
    fresh_amqplexd, user, queue_name
):
    """Every read counts as the client being alive: with a heartbeat of 1 s
    the proxy drops a client silent for two, and this one streams for four
    without one, never leaving the streaming reader (a frame is always
    incomplete between its sends)."""
    daemon = fresh_amqplexd(env=DEBUG)
    declare(queue_name)
    body = body_frame(1, os.urandom(60_000))
    sent = 0
    with RawClient(daemon.port) as client:
        client.handshake(user.name, user.password, heartbeat=1)
        client.open_channel()
        client.send(publish_start(queue_name, 60_000) + body[:40_000])
        daemon.wait_for_log(SWITCHED)
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            time.sleep(0.2)
            client.send(body[40_000:] + publish_start(queue_name, 60_000) + body[:40_000])
            sent += 1
        client.send(body[40_000:])
        sent += 1
        # Read at the broker before this client closes: unread heartbeats
        # make its close a reset, which may drop what it sent last.
        assert len(broker_bodies(queue_name, sent)) == sent
        assert "missed two heartbeats" not in daemon.log_text()
    # One switch each way: it streamed throughout, and stopped at the end.
    daemon.wait_for_log(SWITCHED_BACK)
    assert daemon.log_text().count(SWITCHED) == daemon.log_text().count(SWITCHED_BACK) == 1


def test_a_streaming_client_that_leaves_ends_its_session(streaming_raw_client, queue_name):
    client, daemon, canary = streaming_raw_client
    body = body_frame(1, os.urandom(100_000))
    client.send(publish_start(queue_name, 100_000) + body[:50_000])
    daemon.wait_for_log(SWITCHED)
    port = client.sock.getsockname()[1]
    client.close()
    peer = f"127.0.0.1:{port}"
    wait_until(
        lambda: any("client session ended" in line and peer in line for line in daemon.log_lines()),
        what="its session's end in the log",
    )
    canary.wait_round_trips(3)


def test_a_client_that_stops_streaming_goes_back_and_on_streaming_again_switches_again(
    streaming_raw_client, queue_name
):
    client, daemon, canary = streaming_raw_client
    sent = [os.urandom(100_000), b"small", os.urandom(100_000), b"small again"]
    client.send(publish_start(queue_name, len(sent[0])) + body_frame(1, sent[0]))
    daemon.wait_for_log(SWITCHED)
    client.send(publish_start(queue_name, len(sent[1])) + body_frame(1, sent[1]))
    daemon.wait_for_log(SWITCHED_BACK)
    client.send(publish_start(queue_name, len(sent[2])) + body_frame(1, sent[2]))
    wait_until(lambda: daemon.log_text().count(SWITCHED) == 2, what="a second switch")
    client.send(publish_start(queue_name, len(sent[3])) + body_frame(1, sent[3]))
    assert broker_bodies(queue_name, len(sent)) == sent
    canary.wait_round_trips(3)
