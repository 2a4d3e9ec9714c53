"""Limits and cleanup: client and upstream limits refuse clearly, idle
upstreams and unused pools go away, a client that does not read is cut
loose without stalling its upstream (issue 5 points 3-5)."""

from __future__ import annotations

import socket
import time

import pika
import pytest
from pamqp import commands, frame
from pamqp.header import ContentHeader

from tests.conftest import proxy_params
from tests.master.test_status import scrape
from tests.support.broker import proxy_connections
from tests.support.rawclient import RawClient, body_frame, message, send_until_refused
from tests.support.waiting import wait_until

# One upstream of three channel ids, none kept idle, and a second's wait for one.
THREE_CHANNELS_IN_ALL = {
    "AMQP_POOL_MAX_UPSTREAM_CONNECTIONS": "1",
    "AMQP_POOL_MAX_CHANNELS": "3",
    "AMQP_POOL_IDLE_CHANNELS": "0",
    "AMQP_POOL_ACQUIRE_TIMEOUT": "1",
}


def worker_pids(master: int) -> list[int]:
    with open(f"/proc/{master}/task/{master}/children") as handle:
        return [int(pid) for pid in handle.read().split()]


def resident_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def test_client_over_the_connection_limit_gets_a_close_it_can_read(fresh_amqplexd):
    daemon = fresh_amqplexd(env={"AMQP_POOL_MAX_CLIENT_CONNECTIONS": "2"})
    kept = [pika.BlockingConnection(proxy_params(daemon.port)) for _ in range(2)]
    with RawClient(daemon.port) as extra:
        _, close = extra.handshake()
        assert isinstance(close, commands.Connection.Close)
        assert close.reply_code == 530
        assert "pool.max_client_connections" in close.reply_text
    for connection in kept:
        connection.close()
    # Room again once they left.
    wait_until(lambda: scrape(daemon.status_port)["amqplex_active_clients"] == 0)
    pika.BlockingConnection(proxy_params(daemon.port)).close()


def test_channel_wait_is_bounded_when_every_allowed_upstream_is_full(fresh_amqplexd, user):
    daemon = fresh_amqplexd(env=THREE_CHANNELS_IN_ALL)
    holders = [pika.BlockingConnection(proxy_params(daemon.port, user)) for _ in range(3)]
    for connection in holders:
        connection.channel()
    started = time.monotonic()
    late = pika.BlockingConnection(proxy_params(daemon.port, user))
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as refused:
        late.channel()
    assert refused.value.reply_code == 530
    assert "pool.max_upstream_connections=1" in refused.value.reply_text
    assert 0.8 < time.monotonic() - started < 5
    assert len(proxy_connections(user.name)) == 1
    # A freed channel serves the next client that waits.
    holders.pop().close()
    waiting = pika.BlockingConnection(proxy_params(daemon.port, user))
    assert waiting.channel().is_open
    for connection in (*holders, waiting):
        connection.close()


def test_a_channel_closed_while_it_waits_for_room_is_given_nothing_later(
    fresh_amqplexd, user, queue_name
):
    """Closed by its client, or by the proxy, a channel stops waiting: the
    bound on the wait does not close its client afterwards, and a channel
    freed before the client's CloseOk goes to the next client, not to it."""
    daemon = fresh_amqplexd(env=THREE_CHANNELS_IN_ALL)
    holders = [pika.BlockingConnection(proxy_params(daemon.port, user)) for _ in range(3)]
    channels = [connection.channel() for connection in holders]
    channels[0].queue_declare(queue_name, exclusive=True)
    with RawClient(daemon.port) as client:
        client.handshake(user.name, user.password)
        client.method(1, commands.Channel.Open())  # no room: it waits
        client.method(
            1, commands.Channel.Close(reply_code=200, reply_text="", class_id=0, method_id=0)
        )
        client.expect(commands.Channel.OpenOk)  # as the broker, before its CloseOk
        client.expect(commands.Channel.CloseOk)
        client.method(2, commands.Channel.Open())
        client.method(2, commands.Basic.Get(queue=queue_name))  # another client's queue
        client.expect(commands.Channel.OpenOk)
        _, close = client.expect(commands.Channel.Close)
        assert close.reply_code == 405
        holders.pop().close()
        late = pika.BlockingConnection(proxy_params(daemon.port, user))
        assert late.channel().is_open
        client.method(2, commands.Channel.CloseOk())
        # Past the bound on the wait, nothing came: no OpenOk, no 530.
        with pytest.raises(TimeoutError):
            client.read_frame(timeout=2)
    for connection in (*holders, late):
        connection.close()


@pytest.mark.parametrize("closing", ["channel", "connection"])
def test_what_a_client_sent_on_a_waiting_channel_before_closing_reaches_the_broker(
    fresh_amqplexd, user, queue_name, closing
):
    """A pipelining client opens a channel while none is free, publishes on
    it and closes it, or its connection, at once: as directly, the message
    is routed before the close, once the channel gets an upstream channel
    (after the client left, for a closed connection), and a closed channel
    is answered with OpenOk, then the broker's CloseOk."""
    daemon = fresh_amqplexd(env={**THREE_CHANNELS_IN_ALL, "AMQP_POOL_ACQUIRE_TIMEOUT": "30"})
    holders = [pika.BlockingConnection(proxy_params(daemon.port, user)) for _ in range(3)]
    channels = [connection.channel() for connection in holders]
    channels[0].queue_declare(queue_name)
    close = {
        "channel": frame.marshal(commands.Channel.Close(200, "done", 0, 0), 1),
        "connection": frame.marshal(commands.Connection.Close(200, "done", 0, 0), 0),
    }[closing]
    with RawClient(daemon.port) as client:
        client.handshake(user.name, user.password)
        # One read: the close is surely taken while the channel waits.
        client.send(
            frame.marshal(commands.Channel.Open(), 1)
            + message(1, queue_name, b"sent while it waited")
            + close
        )
        if closing == "channel":
            holders.pop().close()  # room for it
            client.expect(commands.Channel.OpenOk)
            client.expect(commands.Channel.CloseOk)
        else:
            client.expect(commands.Connection.CloseOk)
    if closing == "connection":
        holders.pop().close()
    wait_until(
        lambda: channels[0].queue_declare(queue_name, passive=True).method.message_count == 1,
        what="the message in its queue",
    )
    for connection in holders:
        connection.close()


def test_a_broker_close_for_a_client_that_left_while_its_channel_waited_is_answered(
    fresh_amqplexd, user
):
    """What it sent while it waited goes once there is room, and here the
    broker refuses it (404) after the client left: the proxy answers the
    broker's Close for it (rule 5), or the upstream channel id is lost."""
    daemon = fresh_amqplexd(env={**THREE_CHANNELS_IN_ALL, "AMQP_POOL_ACQUIRE_TIMEOUT": "30"})
    holders = [pika.BlockingConnection(proxy_params(daemon.port, user)) for _ in range(3)]
    for connection in holders:
        connection.channel()
    with RawClient(daemon.port) as client:
        client.handshake(user.name, user.password)
        client.send(
            frame.marshal(commands.Channel.Open(), 1)
            + frame.marshal(commands.Basic.Get(queue="amqplex-missing-queue"), 1)
            + frame.marshal(commands.Connection.Close(200, "done", 0, 0), 0)
        )
        client.expect(commands.Connection.CloseOk)
    for connection in holders:
        connection.close()
    # All three ids are free again: three channels open at once.
    with RawClient(daemon.port) as client:
        client.handshake(user.name, user.password)
        for channel in (1, 2, 3):
            client.method(channel, commands.Channel.Open())
        for _ in range(3):
            client.expect(commands.Channel.OpenOk, timeout=5)


def test_a_channel_waiting_for_room_stops_reading_its_client_past_a_bound(
    fresh_amqplexd, user, queue_name
):
    """What a client sends on a channel still waiting for an upstream channel
    is held up to PENDING_LIMIT; past it the client is not read until the
    channel has one, and then all of it arrives."""
    daemon = fresh_amqplexd(env={**THREE_CHANNELS_IN_ALL, "AMQP_POOL_ACQUIRE_TIMEOUT": "30"})
    holders = [pika.BlockingConnection(proxy_params(daemon.port, user)) for _ in range(3)]
    channels = [connection.channel() for connection in holders]
    channels[0].queue_declare(queue_name)
    one = message(1, queue_name, bytes(65536))
    stream = one * 600  # 39 MB
    with RawClient(daemon.port) as client:
        client.handshake(user.name, user.password)
        client.method(1, commands.Channel.Open())  # no room: it waits
        sent = send_until_refused(client.sock, stream, refused_for=0.5, timeout=20)
        # The bound and what the sockets on the way hold, not the whole stream.
        assert sent < 16 << 20
        holders.pop().close()
        client.sock.settimeout(30)
        client.sock.sendall(stream[sent:])
        client.expect(commands.Channel.OpenOk)
        client.method(1, commands.Queue.Declare(queue=queue_name, passive=True))
        client.expect(commands.Queue.DeclareOk, timeout=30)
    wait_until(
        lambda: channels[0].queue_declare(queue_name, passive=True).method.message_count == 600,
        timeout=30,
    )
    for connection in holders:
        connection.close()


def test_idle_upstream_is_closed_and_unused_pool_dropped(fresh_amqplexd, user):
    daemon = fresh_amqplexd(
        env={"AMQP_POOL_IDLE_TIMEOUT": "1", "AMQP_POOL_CLEANUP_INTERVAL": "0.2"}
    )
    connection = pika.BlockingConnection(proxy_params(daemon.port, user))
    connection.channel().basic_publish("", "amqplex-nowhere", b"x")
    assert len(proxy_connections(user.name)) == 1
    connection.close()
    wait_until(lambda: not proxy_connections(user.name), timeout=20, interval=0.5)
    wait_until(lambda: scrape(daemon.status_port)["amqplex_pools"] == 0)
    # And it comes back on demand.
    again = pika.BlockingConnection(proxy_params(daemon.port, user))
    assert again.channel().is_open
    again.close()


def test_wrong_credentials_never_grow_the_pools(fresh_amqplexd, user):
    daemon = fresh_amqplexd()
    for attempt in range(30):
        bad = pika.ConnectionParameters(
            host="127.0.0.1",
            port=daemon.port,
            credentials=pika.PlainCredentials(user.name, f"wrong-{attempt}"),
            connection_attempts=1,
        )
        with pytest.raises(pika.exceptions.AMQPConnectionError):
            pika.BlockingConnection(bad)
    metrics = wait_until(
        lambda: (
            (m := scrape(daemon.status_port))["amqplex_authentication_failures_total"] == 30 and m
        )
    )
    assert metrics["amqplex_pools"] == 0
    assert metrics["amqplex_upstream_connections"] == 0


def slow_consumer(port: int, user, queue: str, receive_buffer: int = 4096) -> RawClient:
    """A no-ack consumer of `queue` with a small receive buffer, that reads
    nothing unless told to."""
    slow = RawClient(port)
    slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    slow.handshake(user.name, user.password)
    slow.open_channel(1)
    slow.method(1, commands.Queue.Declare(queue=queue))
    slow.expect(commands.Queue.DeclareOk)
    slow.method(1, commands.Basic.Consume(queue=queue, no_ack=True))
    slow.expect(commands.Basic.ConsumeOk)
    return slow


def test_a_client_that_stops_reading_is_cut_without_stalling_its_upstream(
    fresh_amqplexd, user, queue_name, canary_for
):
    daemon = fresh_amqplexd(
        env={"AMQP_CLIENT_MAX_OUTPUT_BUFFER": "1048576", "AMQP_CLIENT_STALL_TIMEOUT": "1"}
    )
    canary = canary_for(daemon.port, user)
    slow = slow_consumer(daemon.port, user, queue_name)
    # Now it reads nothing while 32 MB are delivered to it.
    publisher = pika.BlockingConnection(proxy_params(daemon.port, user))
    channel = publisher.channel()
    body = b"x" * 65536
    for _ in range(512):
        channel.basic_publish("", queue_name, body)
        canary.wait_round_trips(0)
    publisher.close()
    # Both counters, since a worker writes them one at a time and a scrape
    # can fall between the two.
    assert wait_until(
        lambda: (
            (m := scrape(daemon.status_port)).get("amqplex_slow_client_disconnects_total", 0) >= 1
            and m.get("amqplex_client_errors_total{code=320}", 0) >= 1
        )
    )
    # The canary kept its round trips going on the same upstream throughout.
    canary.wait_round_trips(5, timeout=5)
    # 32 MB went to a client that read none of it: the worker never held it.
    for pid in worker_pids(daemon.process.pid):
        assert resident_mb(pid) < 120, f"worker {pid} grew to {resident_mb(pid):.0f} MB"
    assert slow.read_eof(timeout=15)
    slow.close()


@pytest.mark.parametrize("shared", [True, False], ids=["beside-a-canary", "alone"])
def test_a_client_that_reads_slower_than_its_deliveries_come_is_cut_in_time(
    fresh_amqplexd, user, queue_name, canary_for, shared
):
    """It catches up within client.stall_timeout every time, but holds its
    upstream back most of the time: past its share (STALL_SHARE) of the
    others' time it is cut, as one that stops reading is. Alone on its
    upstream it holds nobody back, and reads its way through."""
    daemon = fresh_amqplexd(
        env={
            "AMQP_CLIENT_MAX_OUTPUT_BUFFER": "1048576",
            "AMQP_CLIENT_STALL_TIMEOUT": "2",
            "AMQP_CLIENT_CLOSE_TIMEOUT": "0.5",  # the socket's end follows the 320 soon
        }
    )
    slow = slow_consumer(daemon.port, user, queue_name, receive_buffer=65536)
    canary = canary_for(daemon.port, user) if shared else None
    publisher = pika.BlockingConnection(proxy_params(daemon.port, user))
    channel = publisher.channel()
    for _ in range(256):  # 16 MB
        channel.basic_publish("", queue_name, b"x" * 65536)
    publisher.close()
    # About 4 MB/s: what is queued for it (a read from the broker or two
    # past the 1 MB limit) down to the low mark (uvloop's quarter) within
    # the two seconds stall_timeout allows, every time.
    started = time.monotonic()
    cut = False
    read = 0
    while not cut and read < 256 * 65536 and time.monotonic() - started < 20:
        deadline = time.monotonic() + 0.25
        taken = 0
        while taken < 1024 * 1024 and not cut:
            slow.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = slow.sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionError:
                data = b""
            cut = not data
            taken += len(data)
        read += taken
        time.sleep(max(0.0, deadline - time.monotonic()))  # paces the reader
    slow.close()
    if not shared:
        assert not cut and read >= 256 * 65536, f"cut after {read} bytes"
        return
    assert cut, "a client holding its upstream back most of the time was never cut"
    assert wait_until(
        lambda: scrape(daemon.status_port).get("amqplex_slow_client_disconnects_total", 0) >= 1
    )
    canary.wait_round_trips(5, timeout=5)


def test_a_client_that_closes_without_reading_what_is_queued_for_it_is_dropped(
    fresh_amqplexd, user, queue_name
):
    """Its Connection.Close answered, the CloseOk waits behind megabytes the
    client never reads: the proxy drops it after client.close_timeout, as it
    drops a client that never answers its own Close, rather than keeping
    the socket (and the worker's count of clients) for ever."""
    daemon = fresh_amqplexd(
        env={
            "AMQP_CLIENT_MAX_OUTPUT_BUFFER": "1048576",
            "AMQP_CLIENT_STALL_TIMEOUT": "60",
            "AMQP_CLIENT_CLOSE_TIMEOUT": "1",
        }
    )
    slow = slow_consumer(daemon.port, user, queue_name)
    publisher = pika.BlockingConnection(proxy_params(daemon.port, user))
    channel = publisher.channel()
    for _ in range(64):  # 4 MB, past what the sockets and the output limit hold
        channel.basic_publish("", queue_name, b"x" * 65536)
    publisher.close()
    wait_until(
        lambda: scrape(daemon.status_port).get("amqplex_active_clients") == 1,
        what="the publisher gone, the slow client counted",
    )
    slow.method(0, commands.Connection.Close(200, "bye", 0, 0))
    wait_until(
        lambda: scrape(daemon.status_port).get("amqplex_active_clients") == 0,
        timeout=10,
        what="the client dropped",
    )
    slow.close()


CONFIGURED_LIMIT = {"AMQP_CLIENT_MAX_MESSAGE_SIZE": "1000"}
OVER_CONFIGURED = "message size 1001 is larger than configured max size 1000"


@pytest.mark.parametrize(
    ("env", "body_size", "said", "headers"),
    [
        ({}, 1 << 40, "message size 1099511627776 is larger than max size 134217728", None),
        (CONFIGURED_LIMIT, 1001, OVER_CONFIGURED, None),
        # A headers table: the whole message goes by the Python reference.
        (CONFIGURED_LIMIT, 1001, OVER_CONFIGURED, {"a": 1}),
    ],
    ids=["default", "configured", "configured-with-headers"],
)
def test_a_message_over_the_size_limit_is_refused_at_its_header(
    fresh_amqplexd, user, queue_name, env, body_size, said, headers
):
    """A content header announcing more than client.max_message_size is
    refused 406 on that channel, as RabbitMQ refuses a message over its
    max_message_size, before the proxy holds a byte of its body (an
    announced terabyte, fed frame by frame, filled a worker's memory); the
    connection and the upstream go on."""
    daemon = fresh_amqplexd(env=env)
    with RawClient(daemon.port) as client:
        client.handshake(user.name, user.password)
        client.open_channel(1)
        client.method(1, commands.Queue.Declare(queue=queue_name))
        client.expect(commands.Queue.DeclareOk)
        publish = frame.marshal(commands.Basic.Publish(exchange="", routing_key=queue_name), 1)
        properties = commands.Basic.Properties(headers=headers)
        header = frame.marshal(ContentHeader(0, body_size, properties), 1)
        body = body_frame(1, b"x" * min(body_size, 4096))
        client.send(publish + header + body)  # one read: the whole-message path too
        _, refused = client.expect(commands.Channel.Close)
        assert (refused.reply_code, refused.class_id, refused.method_id) == (406, 60, 40)
        assert refused.reply_text == f"PRECONDITION_FAILED - {said}"
        client.method(1, commands.Channel.CloseOk())
        client.open_channel(2)
        client.method(2, commands.Queue.Declare(queue=queue_name, passive=True))
        _, ok = client.expect(commands.Queue.DeclareOk)
        assert ok.message_count == 0
