"""The connection to the broker (amqplex/worker/upstream.py): the heartbeat
it asks for, and upstream.read_gather, which lets a stream of small
deliveries gather between reads, for read_gather at most, and never holds
the read that finds the stream."""

from __future__ import annotations

import time

import pika
import pytest
from pamqp import commands

from tests.conftest import broker_params, proxy_params
from tests.support import broker
from tests.support.rawclient import RawClient
from tests.support.waiting import wait_until

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


def held_deliveries(daemon, user, queue: str, pauses: list[float]) -> list[float]:
    """Publish one message straight to the broker after each of `pauses`
    (seconds, counted from the one before being delivered through
    `daemon`): how long each took to arrive."""
    with pika.BlockingConnection(broker_params()) as admin, RawClient(daemon.port) as client:
        channel = admin.channel()
        channel.queue_declare(queue, auto_delete=True)
        client.handshake(user.name, user.password)
        client.open_channel(1)
        consume(client, queue)
        held = []
        for n, pause in enumerate(pauses):
            time.sleep(pause)
            sent = time.monotonic()
            channel.basic_publish("", queue, b"%d" % n)
            (arrived,) = delivery_times(client, 1)
            held.append(arrived - sent)
    return held


def test_no_delivery_waits_that_did_not_follow_another_within_read_gather(
    fresh_amqplexd, user, queue_name
):
    """Pairs: one after a quiet spell, read at once, starts no wait; the
    next, 30 ms later, is then not held either: the read that finds the
    stream is never the one held."""
    daemon = fresh_amqplexd(env={"AMQP_UPSTREAM_READ_GATHER": str(GATHER)})
    held = held_deliveries(daemon, user, queue_name, [GATHER * 1.5, 0.03] * 5)
    assert max(held) < GATHER / 2, f"held up to {max(held):.3f} s"


def test_a_trickle_is_held_no_longer_than_read_gather(fresh_amqplexd, user, queue_name):
    """Deliveries closer together than the window: reading waits after every
    other small read (the one after a wait comes read_gather later), and
    always resumes."""
    daemon = fresh_amqplexd(env={"AMQP_UPSTREAM_READ_GATHER": str(GATHER)})
    held = held_deliveries(daemon, user, queue_name, [GATHER / 5] * 30)
    assert max(held) < GATHER + 0.1, f"held up to {max(held):.3f} s"
    assert max(held) > GATHER / 2, "no read waited"


@pytest.mark.parametrize(("setting", "timeout"), [("0", 0), ("7", 7)])
def test_the_upstream_heartbeat_is_the_one_configured(fresh_amqplexd, user, setting, timeout):
    """The broker uses what TuneOk asks for: 0 turns heartbeats off, as the
    setting says, rather than taking the broker's 60."""
    daemon = fresh_amqplexd(env={"AMQP_UPSTREAM_HEARTBEAT": setting})
    pika.BlockingConnection(proxy_params(daemon.port, user)).close()
    (row,) = wait_until(lambda: broker.proxy_connections(user.name), what="the upstream")
    assert row["timeout"] == timeout
