"""Faults between amqplex and the broker, injected by the tests' own TCP
relay (never by stopping the shared broker): no client hangs, confirms keep
their promise, and the proxy comes back by itself (issue 5 points 1, 2, 6, 7)."""

from __future__ import annotations

import itertools
import threading
import time
import uuid

import pika
import pytest
from pamqp import commands

from tests.conftest import broker_params, proxy_params
from tests.support.rawclient import RawClient
from tests.support.waiting import wait_until


def client_with_channel(port: int, user=None) -> RawClient:
    client = RawClient(port)
    if user is None:
        client.handshake()
    else:
        client.handshake(user.name, user.password)
    client.open_channel(1)
    return client


def can_connect(port: int, user=None) -> bool:
    try:
        connection = pika.BlockingConnection(proxy_params(port, user, connection_attempts=1))
    except pika.exceptions.AMQPError:
        return False
    ok = connection.channel().is_open
    connection.close()
    return ok


def expect_forced_close(clients: list[RawClient], reason: str, since: float, within: float) -> None:
    """Every client gets 320 naming `reason` within `within` s of `since`, then EOF."""
    for client in clients:
        close = client.expect_connection_close(timeout=2)
        assert close.reply_code == 320
        assert reason in close.reply_text
        assert time.monotonic() - since < within
        assert client.read_eof(timeout=2)
        client.close()


def drain_queue(name: str) -> list[bytes]:
    connection = pika.BlockingConnection(broker_params())
    channel = connection.channel()
    bodies = []
    while (got := channel.basic_get(name, auto_ack=True))[0] is not None:
        bodies.append(got[2])
    connection.close()
    return bodies


@pytest.fixture
def through_relay(fresh_amqplexd, relay):
    """A daemon whose upstream goes through the relay (heartbeat 1 s)."""
    return fresh_amqplexd(upstream=relay.url, env={"AMQP_UPSTREAM_HEARTBEAT": "1"})


def test_severed_upstream_closes_every_client_with_320_within_a_second(through_relay, relay):
    clients = [client_with_channel(through_relay.port) for _ in range(5)]
    relay.sever()
    expect_forced_close(clients, "CONNECTION_FORCED", since=time.monotonic(), within=1.0)
    # The pool redials by itself: new clients are served without a restart.
    wait_until(lambda: can_connect(through_relay.port), timeout=10)


def test_a_client_tied_to_a_severed_upstream_by_its_exclusive_queue_alone_gets_320(
    through_relay, relay, queue_name
):
    """Its channel closed, an exclusive queue of its own is all the client
    has on the upstream; the broker deletes it with that connection, as it
    would the client's own connection, so the client gets the 320 too."""
    client = client_with_channel(through_relay.port)
    client.method(1, commands.Queue.Declare(queue=queue_name, exclusive=True))
    client.expect(commands.Queue.DeclareOk)
    client.method(1, commands.Channel.Close(200, "done", 0, 0))
    client.expect(commands.Channel.CloseOk)
    relay.sever()
    expect_forced_close([client], "CONNECTION_FORCED", since=time.monotonic(), within=1.0)


def test_confirmed_messages_survive_a_severed_upstream(through_relay, relay, queue_name):
    connection = pika.BlockingConnection(proxy_params(through_relay.port))
    channel = connection.channel()
    channel.queue_declare(queue_name)
    channel.confirm_delivery()
    confirmed: list[bytes] = []
    severer = threading.Timer(0.5, relay.sever)
    severer.start()
    with pytest.raises(pika.exceptions.AMQPError):
        for _ in range(100000):
            body = uuid.uuid4().bytes
            channel.basic_publish("", queue_name, body)
            confirmed.append(body)  # basic_publish returned: the broker acked it
    severer.join()
    assert confirmed, "nothing was published before the sever"
    arrived = set(drain_queue(queue_name))
    assert set(confirmed) <= arrived


def test_unacked_deliveries_return_to_their_queue_when_the_upstream_is_severed(
    through_relay, relay, queue_name
):
    setup = pika.BlockingConnection(broker_params())
    setup.channel().queue_declare(queue_name)
    for i in range(10):
        setup.channel().basic_publish("", queue_name, str(i).encode())
    setup.close()
    consumer = client_with_channel(through_relay.port)
    consumer.method(1, commands.Basic.Qos(prefetch_count=10))
    consumer.expect(commands.Basic.QosOk)
    consumer.method(1, commands.Basic.Consume(queue=queue_name))
    consumer.expect(commands.Basic.ConsumeOk)
    consumer.expect(commands.Basic.Deliver)
    relay.sever()
    assert consumer.expect_connection_close().reply_code == 320
    consumer.close()
    assert sorted(drain_queue(queue_name)) == sorted(str(i).encode() for i in range(10))


def test_a_stalled_upstream_is_found_by_heartbeats_and_its_clients_closed(through_relay, relay):
    client = client_with_channel(through_relay.port)
    relay.stall()
    stalled = time.monotonic()
    close = client.expect_connection_close(timeout=6)
    assert close.reply_code == 320
    assert "heartbeat" in close.reply_text
    # Two missed 1 s intervals, checked every half interval.
    assert 1.5 < time.monotonic() - stalled < 4
    client.close()
    relay.resume()


def test_while_the_broker_is_away_new_clients_are_refused_then_served_when_it_returns(
    through_relay, relay
):
    assert can_connect(through_relay.port)
    relay.refuse()
    relay.sever()
    for _ in range(3):
        started = time.monotonic()
        with RawClient(through_relay.port) as client:
            _, answer = client.handshake()
        assert isinstance(answer, commands.Connection.Close)
        assert answer.reply_code == 320
        assert "upstream unavailable" in answer.reply_text
        assert time.monotonic() - started < 3
    relay.refuse(False)
    wait_until(lambda: can_connect(through_relay.port), timeout=20)


def test_clients_arriving_while_the_broker_is_away_do_not_dial_it_each(through_relay, relay):
    """Only the pool's redials, with their backoff, go to a broker that went
    away: clients arriving meanwhile are refused without a login of their
    own (which cost a dial each, at the rate they came)."""
    assert can_connect(through_relay.port)
    relay.refuse()
    relay.sever()
    dials_before = len(relay.connections)
    for _ in range(10):
        with RawClient(through_relay.port) as client:
            _, answer = client.handshake()
        assert isinstance(answer, commands.Connection.Close) and answer.reply_code == 320
    # Ten clients in well under the 0.5 + 1 s of the first two backoffs.
    assert len(relay.connections) - dials_before <= 2
    relay.refuse(False)
    wait_until(lambda: can_connect(through_relay.port), timeout=20)


def test_clients_left_without_channels_by_an_outage_do_not_dial_it_each(through_relay, relay):
    """Connected before the broker went away, with no channel on the lost
    upstream (so no 320 then): each Channel.Open meanwhile gets the 320 a
    new client gets, not a dial of its own past the backoff."""
    assert can_connect(through_relay.port)
    clients = [RawClient(through_relay.port) for _ in range(10)]
    for client in clients:
        client.handshake()
    relay.refuse()
    relay.sever()
    dials_before = len(relay.connections)
    for client in clients:  # one after another: one dial would answer them all
        started = time.monotonic()
        client.method(1, commands.Channel.Open())
        expect_forced_close([client], "upstream unavailable", started, within=3)
    # Ten in well under the 0.5 + 1 s of the first two backoffs.
    assert len(relay.connections) - dials_before <= 2
    relay.refuse(False)
    wait_until(lambda: can_connect(through_relay.port), timeout=20)


def test_a_channel_opened_during_the_redials_dial_waits_for_it(through_relay, relay):
    """Between the backoff's waits the pool is dialling: a Channel.Open then
    waits for that dial, as a client at StartOk does, and gets the new
    upstream."""
    client = RawClient(through_relay.port)
    client.handshake()
    relay.stall()  # the redial's dial hangs until resumed
    dials_before = len(relay.connections)
    relay.sever()
    wait_until(lambda: len(relay.connections) > dials_before, what="the redial's dial")
    client.method(1, commands.Channel.Open())
    relay.resume()
    client.expect(commands.Channel.OpenOk)
    client.close()


def test_an_upstream_dropped_as_soon_as_it_opens_is_redialled_with_growing_delays(
    through_relay, relay
):
    """A broker that takes the connection and drops it at once (a node
    shutting down, say) is redialled with the backoff of one outage, not
    at the first delay after every success."""
    assert can_connect(through_relay.port)
    opened = []
    for _ in range(4):
        relay.sever()
        dialled = len(relay.connections)
        wait_until(lambda d=dialled: relay.open_connections and len(relay.connections) > d)
        opened.append(time.monotonic())
    gaps = [later - earlier for earlier, later in itertools.pairwise(opened)]
    # 1 s, 2 s and 4 s (+-20%) after the first redial's 0.5 s; each at 0.5 s before.
    assert gaps[-1] >= 0.8 * 4, f"redials {gaps} s apart"


def test_a_dial_that_hangs_is_bounded(fresh_amqplexd, relay, user):
    daemon = fresh_amqplexd(upstream=relay.url, env={"AMQP_UPSTREAM_CONNECT_TIMEOUT": "1"})
    relay.stall()
    started = time.monotonic()
    with RawClient(daemon.port) as client:
        _, answer = client.handshake(user.name, user.password)
    assert isinstance(answer, commands.Connection.Close)
    assert answer.reply_code == 320
    assert 0.8 < time.monotonic() - started < 4
    relay.resume()


def test_a_broker_closing_the_upstream_closes_its_clients_with_320(fresh_amqplexd, user):
    from tests.support.broker import rabbitmqctl

    daemon = fresh_amqplexd()
    clients = [client_with_channel(daemon.port, user) for _ in range(3)]
    rows = rabbitmqctl("list_connections", "pid", "user").splitlines()
    (pid,) = [row.split()[0] for row in rows if row.split()[-1:] == [user.name]]
    rabbitmqctl("close_connection", pid, "closed by a test")
    expect_forced_close(clients, "closed by a test", since=time.monotonic(), within=1.5)
    # The pool redials with backoff: the same user is served again.
    wait_until(lambda: can_connect(daemon.port, user), timeout=10)


def test_with_two_min_upstreams_a_lost_one_closes_only_its_clients_and_is_redialled(
    fresh_amqplexd, user
):
    from tests.support.broker import proxy_connections, rabbitmqctl
    from tests.worker.test_pool import upstreams_opened

    daemon = fresh_amqplexd(env={"AMQP_POOL_MIN_UPSTREAM_CONNECTIONS": "2"})
    first = client_with_channel(daemon.port, user)
    wait_until(lambda: upstreams_opened(daemon, user.name) == 2, what="two upstreams")
    second = client_with_channel(daemon.port, user)  # on the one carrying nobody
    rows = rabbitmqctl("list_connections", "pid", "user").splitlines()
    pid = next(row.split()[0] for row in rows if row.split()[-1:] == [user.name])
    rabbitmqctl("close_connection", pid, "closed by a test")
    closed, alive = [], []
    for client in (first, second):
        try:
            got = client.read_method(timeout=2)
        except TimeoutError:
            alive.append(client)
            continue
        assert got is not None and isinstance(got[1], commands.Connection.Close), got
        assert got[1].reply_code == 320 and "closed by a test" in got[1].reply_text
        closed.append(client)
    assert len(closed) == len(alive) == 1
    # The pool dials toward its minimum again, with no new channel to ask it.
    wait_until(lambda: upstreams_opened(daemon, user.name) == 3, what="the minimum again")
    assert len(proxy_connections(user.name)) == 2
    alive[0].open_channel(2)  # a round trip: the survivor's upstream still works
    for client in (first, second):
        client.close()
