"""Reading from the broker (amqplex/worker/upstream.py): upstream.read_gather
lets a stream of small deliveries gather between reads, and leaves a lone
delivery alone."""

from __future__ import annotations

import time

import pika
from pamqp import commands

from tests.conftest import broker_params
from tests.support.rawclient import RawClient

GATHER = 0.1  # the longest upstream.read_gather takes: seen from the client


def consume(client: RawClient, queue: str) -> None:
    client.method(1, commands.Basic.Consume(queue=queue, no_ack=True))
    client.expect(commands.Basic.ConsumeOk)


def delivery_times(client: RawClient, count: int) -> list[float]:
    """When each of `count` deliveries' method frames was read."""
    times = []
    while len(times) < count:
        _, _, frame = client.read_frame()
        if isinstance(frame, commands.Basic.Deliver):
            times.append(time.monotonic())
    return times


def test_a_stream_of_small_deliveries_waits_between_reads(fresh_amqplexd, user, queue_name):
    daemon = fresh_amqplexd(env={"AMQP_UPSTREAM_READ_GATHER": str(GATHER)})
    count = 3000
    with pika.BlockingConnection(broker_params()) as admin:
        channel = admin.channel()
        channel.queue_declare(queue_name, auto_delete=True)
        for n in range(count):
            channel.basic_publish("", queue_name, b"%04d" % n)
    with RawClient(daemon.port) as client:
        client.handshake(user.name, user.password)
        client.open_channel(1)
        consume(client, queue_name)
        times = delivery_times(client, count)
    gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
    # The broker writes a backlog in small pieces: without the gathering the
    # proxy passes them on as they come, with no gap near GATHER.
    assert max(gaps) >= GATHER * 0.75, f"no read waited: the longest gap {max(gaps):.3f} s"


def test_a_lone_delivery_is_not_held(fresh_amqplexd, user, queue_name):
    daemon = fresh_amqplexd(env={"AMQP_UPSTREAM_READ_GATHER": str(GATHER)})
    with pika.BlockingConnection(broker_params()) as admin, RawClient(daemon.port) as client:
        channel = admin.channel()
        channel.queue_declare(queue_name, auto_delete=True)
        client.handshake(user.name, user.password)
        client.open_channel(1)
        consume(client, queue_name)
        for n in range(5):
            time.sleep(GATHER * 1.5)  # apart by more than the gathering window
            sent = time.monotonic()
            channel.basic_publish("", queue_name, b"%d" % n)
            (arrived,) = delivery_times(client, 1)
            assert arrived - sent < GATHER * 0.75, f"delivery {n} held {arrived - sent:.3f} s"


def test_a_trickle_is_held_no_longer_than_read_gather(fresh_amqplexd, user, queue_name):
    """Deliveries closer together than the window: reading waits after each
    small read, and always resumes after read_gather."""
    daemon = fresh_amqplexd(env={"AMQP_UPSTREAM_READ_GATHER": str(GATHER)})
    with pika.BlockingConnection(broker_params()) as admin, RawClient(daemon.port) as client:
        channel = admin.channel()
        channel.queue_declare(queue_name, auto_delete=True)
        client.handshake(user.name, user.password)
        client.open_channel(1)
        consume(client, queue_name)
        held = []
        for n in range(30):
            sent = time.monotonic()
            channel.basic_publish("", queue_name, b"%d" % n)
            (arrived,) = delivery_times(client, 1)
            held.append(arrived - sent)
            time.sleep(GATHER / 5)
    assert max(held) < GATHER + 0.1, f"held up to {max(held):.3f} s"
    assert max(held) > GATHER / 2, "no read waited"
