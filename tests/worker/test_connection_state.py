"""Connection-scoped state on a shared upstream (DESIGN rule 7): exclusive
queues belong to the client that declared them, Connection.Blocked reaches
the clients that asked for it, Basic.Cancel only those that advertised it."""

from __future__ import annotations

import contextlib
import re
import struct
import time

import pika
import pytest
from pamqp import commands, frame

from amqplex.protocol.constants import FRAME_HEARTBEAT
from tests.conftest import proxy_params
from tests.support import broker
from tests.support.broker import queue_names, rabbitmqctl
from tests.support.rawclient import RawClient, message, send_until_refused
from tests.support.waiting import wait_until


@pytest.fixture
def two_clients(amqplexd, user):
    """Clients A and B with the same credentials: the same upstream."""
    a = pika.BlockingConnection(proxy_params(amqplexd.port, user))
    b = pika.BlockingConnection(proxy_params(amqplexd.port, user))
    yield a, b
    for connection in (a, b):
        if connection.is_open:
            connection.close()


@pytest.mark.parametrize(
    "touch",
    [
        lambda ch, q: ch.queue_declare(q, passive=True),
        lambda ch, q: ch.basic_consume(q, lambda *a: None),
        lambda ch, q: ch.basic_get(q),
        lambda ch, q: ch.queue_purge(q),
        lambda ch, q: ch.queue_bind(q, "amq.direct", "k"),
        lambda ch, q: ch.queue_delete(q),
    ],
    ids=["declare", "consume", "get", "purge", "bind", "delete"],
)
def test_exclusive_queue_is_locked_to_other_clients_on_the_same_upstream(
    two_clients, queue_name, touch
):
    a, b = two_clients
    a.channel().queue_declare(queue_name, exclusive=True)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as closed:
        touch(b.channel(), queue_name)
    assert closed.value.reply_code == 405
    assert "RESOURCE_LOCKED" in closed.value.reply_text
    # The owner still uses it on any of its channels. The publish is
    # confirmed first: the broker orders nothing across channels, so an
    # unconfirmed message could reach the queue after the other channel's get.
    publisher = a.channel()
    publisher.confirm_delivery()
    publisher.basic_publish("", queue_name, b"mine")
    assert a.channel().basic_get(queue_name, auto_ack=True)[2] == b"mine"


@pytest.mark.parametrize("port", ["direct", "proxied"])
def test_a_close_crossing_the_405_for_a_locked_queue_is_answered(amqplexd, user, queue_name, port):
    """The client closes its channel as the Close for a locked queue comes:
    RabbitMQ answers the client's Close with CloseOk while its own waits for
    the client's, and so does the proxy, which raises that 405 itself."""
    port = broker.BROKER_PORT if port == "direct" else amqplexd.port
    with RawClient(port) as owner, RawClient(port) as other:
        owning(owner, user, queue_name)
        other.handshake(user.name, user.password)
        other.open_channel(1)
        other.send(
            frame.marshal(commands.Basic.Get(queue=queue_name), 1)
            + frame.marshal(commands.Channel.Close(200, "done", 0, 0), 1)
        )
        got = [type(other.read_method()[1]) for _ in range(2)]
        assert got == [commands.Channel.Close, commands.Channel.CloseOk], got
        other.method(1, commands.Channel.CloseOk())
        other.open_channel(1)  # the id is free again
        other.method(1, commands.Basic.Qos(prefetch_count=1))
        other.expect(commands.Basic.QosOk)


@pytest.mark.parametrize("port", ["direct", "proxied"])
def test_a_channel_closed_or_refused_as_it_opens_is_opened_first(
    fresh_amqplexd, user, queue_name, port
):
    """Channel.Open sent with a Close, or with a request refused 405, right
    behind it: the broker answers OpenOk first, and so does the proxy while
    the upstream channel is still being opened (no idle one)."""
    daemon = fresh_amqplexd(env={"AMQP_POOL_IDLE_CHANNELS": "0"})
    port = broker.BROKER_PORT if port == "direct" else daemon.port
    with RawClient(port) as owner, RawClient(port) as client:
        owning(owner, user, queue_name)
        client.handshake(user.name, user.password)
        opening = frame.marshal(commands.Channel.Open(), 1)
        client.send(opening + frame.marshal(commands.Channel.Close(200, "done", 0, 0), 1))
        got = [type(client.read_method()[1]) for _ in range(2)]
        assert got == [commands.Channel.OpenOk, commands.Channel.CloseOk], got
        client.send(opening + frame.marshal(commands.Basic.Get(queue=queue_name), 1))
        got = [client.read_method()[1] for _ in range(2)]
        assert type(got[0]) is commands.Channel.OpenOk, got
        assert isinstance(got[1], commands.Channel.Close) and got[1].reply_code == 405, got


@pytest.mark.parametrize("closing", ["channel", "connection"])
def test_a_queue_declared_nowait_and_left_at_once_is_still_its_declarers(
    amqplexd, user, queue_name, closing
):
    """An exclusive queue declared with nowait, its channel (or connection)
    closed in the same breath: the broker's DeclareOk comes after the
    client's Close, and still makes the queue the client's, locked to the
    others on its upstream and deleted when the client leaves."""
    declare = commands.Queue.Declare(queue=queue_name, exclusive=True, nowait=True)
    close = {
        "channel": frame.marshal(commands.Channel.Close(200, "done", 0, 0), 1),
        "connection": frame.marshal(commands.Connection.Close(200, "done", 0, 0), 0),
    }[closing]
    with RawClient(amqplexd.port) as owner, RawClient(amqplexd.port) as other:
        owner.handshake(user.name, user.password)
        owner.open_channel(1)
        owner.send(frame.marshal(declare, 1) + close)
        if closing == "channel":
            owner.expect(commands.Channel.CloseOk)
            other.handshake(user.name, user.password)
            other.open_channel(1)
            other.method(1, commands.Basic.Get(queue=queue_name))
            _, refused = other.expect(commands.Channel.Close)
            assert refused.reply_code == 405
        else:
            owner.expect(commands.Connection.CloseOk)
    wait_until(lambda: queue_name not in queue_names(), what="the queue deleted with its owner")


@pytest.mark.parametrize("nowait", [False, True], ids=["delete", "nowait-delete"])
def test_an_exclusive_queue_the_broker_will_not_delete_stays_locked(
    amqplexd, user, queue_name, nowait
):
    """Queue.Delete if-empty of an exclusive queue holding a message is
    refused (406): the queue stays, and stays its declarer's; deleted, it
    is nobody's, and its name is free for another client's declare."""
    with RawClient(amqplexd.port) as owner, RawClient(amqplexd.port) as other:
        owning(owner, user, queue_name)
        owner.send(message(1, queue_name, b"kept"))
        owner.method(1, commands.Queue.Delete(queue=queue_name, if_empty=True, nowait=nowait))
        _, refused = owner.expect(commands.Channel.Close)
        assert refused.reply_code == 406
        owner.method(1, commands.Channel.CloseOk())
        other.handshake(user.name, user.password)
        other.open_channel(1)
        other.method(1, commands.Basic.Get(queue=queue_name))
        _, locked = other.expect(commands.Channel.Close)
        assert locked.reply_code == 405
        other.method(1, commands.Channel.CloseOk())
        owner.open_channel(1)
        owner.method(1, commands.Queue.Delete(queue=queue_name, nowait=nowait))
        if not nowait:
            owner.expect(commands.Queue.DeleteOk)
        owner.method(1, commands.Basic.Qos(prefetch_count=1))  # after the delete's answer
        owner.expect(commands.Basic.QosOk)
        other.open_channel(1)
        other.method(1, commands.Queue.Declare(queue=queue_name, exclusive=True))
        other.expect(commands.Queue.DeclareOk)


def test_server_named_queue_belongs_to_its_declarer(two_clients):
    a, b = two_clients
    name = a.channel().queue_declare("", exclusive=False).method.queue
    assert name.startswith("amq.gen-")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as closed:
        b.channel().basic_get(name)
    assert closed.value.reply_code == 405
    a.close()
    wait_until(lambda: name not in queue_names())


def _exclusive_declare(channel: int, queue: str) -> bytes:
    name = queue.encode()
    payload = struct.pack(">HHHB", 50, 10, 0, len(name)) + name + b"\x04" + bytes(4)
    return struct.pack(">BHI", 1, channel, len(payload)) + payload + b"\xce"


@pytest.mark.parametrize("leave", ["close", "vanish"])
@pytest.mark.parametrize("suffix", ["", " with spaces, é"], ids=["plain", "any-utf8"])
def test_exclusive_queue_is_deleted_when_its_client_leaves(
    amqplexd, user, queue_name, leave, suffix
):
    queue_name += suffix  # RabbitMQ takes any UTF-8 name
    other = pika.BlockingConnection(proxy_params(amqplexd.port, user))
    client = RawClient(amqplexd.port)
    client.handshake(user.name, user.password)
    client.open_channel(1)
    client.send(_exclusive_declare(1, queue_name))  # pamqp refuses such names
    client.expect(commands.Queue.DeclareOk)
    assert queue_name in queue_names()
    if leave == "close":
        client.method(
            0, commands.Connection.Close(reply_code=200, reply_text="bye", class_id=0, method_id=0)
        )
        client.expect(commands.Connection.CloseOk)
    client.close()
    wait_until(lambda: queue_name not in queue_names())
    # The upstream is still there for the other client, and the name is free.
    channel = other.channel()
    channel.queue_declare(queue_name, exclusive=True)
    other.close()


def test_exclusive_queue_is_deleted_when_every_channel_id_is_in_use(
    fresh_amqplexd, user, queue_name
):
    """With both of the upstream's ids taken as the client leaves (another
    client's channel, and its own being recycled), the deletion waits for
    the first channel given back."""
    daemon = fresh_amqplexd(
        env={
            "AMQP_POOL_MAX_UPSTREAM_CONNECTIONS": "1",
            "AMQP_POOL_MAX_CHANNELS": "2",
            "AMQP_POOL_IDLE_CHANNELS": "0",
        }
    )
    other = pika.BlockingConnection(proxy_params(daemon.port, user))
    other.channel()
    with RawClient(daemon.port) as client:
        client.handshake(user.name, user.password)
        _own_and_leave(client, queue_name, channel=1)
    wait_until(lambda: queue_name not in queue_names())
    other.close()


def _own_and_leave(client: RawClient, queue: str, channel: int = 9) -> None:
    """Declare an exclusive `queue` on a new `channel` and leave politely. As
    a marker: once it is gone, the proxy has deleted whatever it took for
    the client's."""
    client.open_channel(channel)
    client.method(channel, commands.Queue.Declare(queue=queue, exclusive=True))
    client.expect(commands.Queue.DeclareOk)
    client.method(
        0, commands.Connection.Close(reply_code=200, reply_text="bye", class_id=0, method_id=0)
    )
    client.expect(commands.Connection.CloseOk)


@contextlib.contextmanager
def _in_with_a_channel(port: int, user, **handshake):
    """A raw client logged in as `user`, with channel 1 open."""
    with RawClient(port) as client:
        client.handshake(user.name, user.password, **handshake)
        client.open_channel(1)
        yield client


def test_passive_declare_marked_exclusive_leaves_a_shared_queue_shared(
    two_clients, amqplexd, user, queue_name
):
    """RabbitMQ ignores `exclusive` on a passive declare: the queue stays
    every client's, and is not deleted when the one that declared it leaves."""
    a, b = two_clients
    a.channel().queue_declare(queue_name)
    marker = f"{queue_name}.marker"
    with _in_with_a_channel(amqplexd.port, user) as client:
        client.method(1, commands.Queue.Declare(queue=queue_name, passive=True, exclusive=True))
        client.expect(commands.Queue.DeclareOk)
        assert b.channel().basic_get(queue_name, auto_ack=True) == (None, None, None)
        _own_and_leave(client, marker)
    wait_until(lambda: marker not in queue_names())
    assert queue_name in queue_names()


def test_nowait_exclusive_declare_makes_the_queue_the_clients_and_answers_nothing(
    two_clients, amqplexd, user, queue_name
):
    _, b = two_clients
    with _in_with_a_channel(amqplexd.port, user) as client:
        client.method(1, commands.Queue.Declare(queue=queue_name, exclusive=True, nowait=True))
        client.method(1, commands.Basic.Qos(prefetch_count=1))
        _, answer = client.read_method()
        assert isinstance(answer, commands.Basic.QosOk)  # no DeclareOk before it
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as closed:
            b.channel().basic_get(queue_name)
        assert closed.value.reply_code == 405
        client.close()
    wait_until(lambda: queue_name not in queue_names())


def test_refused_nowait_exclusive_declare_leaves_the_shared_queue_alone(
    two_clients, amqplexd, user, queue_name
):
    a, _ = two_clients
    a.channel().queue_declare(queue_name)
    marker = f"{queue_name}.marker"
    with _in_with_a_channel(amqplexd.port, user) as client:
        client.method(1, commands.Queue.Declare(queue=queue_name, exclusive=True, nowait=True))
        _, close = client.expect(commands.Channel.Close)
        assert (close.class_id, close.method_id) == (50, 10), close
        client.method(1, commands.Channel.CloseOk())
        _own_and_leave(client, marker)
    wait_until(lambda: marker not in queue_names())
    assert queue_name in queue_names()


def _consume(client: RawClient, queue: str) -> None:
    client.open_channel(1)
    client.method(1, commands.Queue.Declare(queue=queue))
    client.expect(commands.Queue.DeclareOk)
    client.method(1, commands.Basic.Consume(queue=queue, consumer_tag="c1"))
    client.expect(commands.Basic.ConsumeOk)


def _after_queue_deleted(client: RawClient) -> list:
    """Methods the consumer receives up to a round trip on its channel."""
    client.method(1, commands.Basic.Qos(prefetch_count=5))
    seen = []
    while True:
        _, method = client.read_method()
        seen.append(type(method))
        if isinstance(method, commands.Basic.QosOk):
            return seen


@pytest.mark.parametrize("advertised", [True, False])
def test_basic_cancel_reaches_only_clients_that_advertised_it(
    amqplexd, user, queue_name, advertised
):
    capabilities = {"consumer_cancel_notify": True} if advertised else {}
    with RawClient(amqplexd.port) as consumer:
        consumer.handshake(user.name, user.password, capabilities=capabilities)
        _consume(consumer, queue_name)
        deleter = pika.BlockingConnection(proxy_params(amqplexd.port, user))
        deleter.channel().queue_delete(queue_name)
        deleter.close()
        seen = _after_queue_deleted(consumer)
    assert (commands.Basic.Cancel in seen) is advertised


@pytest.fixture
def memory_alarm():
    """Raise the broker's memory alarm for the test; always restored."""
    # The broker's own setting, put back afterwards: {vm_memory_high_watermark,0.4}
    setting = re.search(r"\{vm_memory_high_watermark,([0-9.]+)\}", rabbitmqctl("environment"))
    assert setting, "no vm_memory_high_watermark in the broker's environment"

    def raise_alarm() -> None:
        rabbitmqctl("set_vm_memory_high_watermark", "0.0000001")

    def clear_alarm() -> None:
        rabbitmqctl("set_vm_memory_high_watermark", setting.group(1))

    try:
        yield raise_alarm, clear_alarm
    finally:
        clear_alarm()


def _connection_methods(client: RawClient, until, timeout: float = 15) -> list:
    deadline = time.monotonic() + timeout
    seen = []
    while not until(seen):
        got = client.read_method(max(0.01, deadline - time.monotonic()))
        assert got is not None, "connection closed"
        seen.append(type(got[1]))
    return seen


def test_a_client_the_proxy_stops_reading_is_not_dropped_for_missed_heartbeats(
    amqplexd, user, queue_name, memory_alarm
):
    """While the upstream of its channel takes nothing (the broker blocks it
    under the alarm), the proxy stops reading the client: its heartbeats
    wait unread in the kernel, so it is not taken for silent, as RabbitMQ
    itself stops watching a blocked connection's heartbeats."""
    raise_alarm, clear_alarm = memory_alarm
    one = message(1, queue_name, bytes(65536))
    stream = one * 500  # 33 MB, more than the sockets on the way hold
    with _in_with_a_channel(amqplexd.port, user, heartbeat=1) as client:
        client.method(1, commands.Queue.Declare(queue=queue_name))
        client.expect(commands.Queue.DeclareOk)
        raise_alarm()
        sent = send_until_refused(client.sock, stream, refused_for=0.5, timeout=30)
        assert sent < len(stream), "the proxy never stopped reading the client"
        # Three of its heartbeat intervals unread, and it is still in.
        end = time.monotonic() + 3
        while (left := end - time.monotonic()) > 0:
            try:
                got = client.read_frame(timeout=left)
            except TimeoutError:
                break
            assert got is not None, "the proxy closed the client"
            assert got[0] == FRAME_HEARTBEAT, got
        clear_alarm()
        client.sock.setblocking(True)
        client.sock.sendall(stream[sent : sent + (-sent) % len(one)])  # the last message whole
        client.method(1, commands.Queue.Declare(queue=queue_name, passive=True))
        client.expect(commands.Queue.DeclareOk, timeout=30)


def test_blocked_and_unblocked_reach_clients_that_advertised_it(
    amqplexd, user, queue_name, memory_alarm
):
    raise_alarm, clear_alarm = memory_alarm
    blocked_caps = {"connection.blocked": True}
    with RawClient(amqplexd.port) as early, RawClient(amqplexd.port) as plain:
        early.handshake(user.name, user.password, capabilities=blocked_caps)
        plain.handshake(user.name, user.password)
        early.open_channel(1)
        plain.open_channel(1)
        raise_alarm()
        # RabbitMQ blocks a connection (and says so) when it publishes under
        # the alarm: here the upstream, when `early` publishes through it.
        early.publish(1, b"under the alarm", routing_key=queue_name)
        assert commands.Connection.Blocked in _connection_methods(
            early, lambda seen: commands.Connection.Blocked in seen
        )
        # A client that arrives while the broker is blocked is told at once.
        with RawClient(amqplexd.port) as late:
            late.handshake(user.name, user.password, capabilities=blocked_caps)
            assert commands.Connection.Blocked in _connection_methods(
                late, lambda seen: commands.Connection.Blocked in seen
            )
            # Told once: the channels it opens while blocked add nothing.
            late.open_channel(1)
            late.open_channel(2)
            clear_alarm()
            for client in (early, late):
                assert commands.Connection.Unblocked in _connection_methods(
                    client, lambda seen: commands.Connection.Unblocked in seen
                )
        # The client without the capability saw neither: its next reply is
        # the answer to its own request.
        plain.method(1, commands.Basic.Qos(prefetch_count=1))
        _, method = plain.read_method()
        assert isinstance(method, commands.Basic.QosOk)


def test_blocked_reaches_the_clients_of_the_blocked_upstream_only(
    fresh_amqplexd, user, queue_name, memory_alarm
):
    """RabbitMQ blocks the connection that publishes under the alarm. With
    two upstreams, the client on the other one is not blocked, and is not
    told so; the one on the blocked upstream is told, and told Unblocked."""
    raise_alarm, clear_alarm = memory_alarm
    daemon = fresh_amqplexd(env={"AMQP_POOL_MIN_UPSTREAM_CONNECTIONS": "2"})
    caps = {"connection.blocked": True}
    with RawClient(daemon.port) as first, RawClient(daemon.port) as other:
        first.handshake(user.name, user.password, capabilities=caps)
        _consume_own_queue(first)  # its channel makes the pool dial the second upstream
        wait_until(lambda: len(broker.proxy_connections(user.name)) == 2, what="two upstreams")
        other.handshake(user.name, user.password, capabilities=caps)
        _consume_own_queue(other)  # on the upstream carrying fewest: the second
        assert broker.consumers_by_upstream(user.name) == [1, 1], "not one client per upstream"
        raise_alarm()
        first.publish(1, b"under the alarm", routing_key=queue_name)
        assert commands.Connection.Blocked in _connection_methods(
            first, lambda seen: commands.Connection.Blocked in seen
        )
        # The pool told every client it was going to in that same turn:
        # `other`'s next method is the answer to its own request.
        other.method(1, commands.Basic.Qos(prefetch_count=1))
        assert isinstance(other.read_method()[1], commands.Basic.QosOk)
        clear_alarm()
        assert commands.Connection.Unblocked in _connection_methods(
            first, lambda seen: commands.Connection.Unblocked in seen
        )
        other.method(1, commands.Basic.Qos(prefetch_count=2))
        assert isinstance(other.read_method()[1], commands.Basic.QosOk)


def test_a_client_left_without_channels_is_told_its_pool_is_blocked_with_the_reason(
    fresh_amqplexd, user, queue_name, memory_alarm
):
    """A client whose only channel is on the upstream the broker does not
    block is not blocked; once it closes that channel, its next one may go
    to the blocked upstream, so it is told Connection.Blocked, with the
    broker's own reason, and Unblocked when the alarm clears."""
    raise_alarm, clear_alarm = memory_alarm
    daemon = fresh_amqplexd(env={"AMQP_POOL_MIN_UPSTREAM_CONNECTIONS": "2"})
    caps = {"connection.blocked": True}
    with RawClient(daemon.port) as first, RawClient(daemon.port) as other:
        first.handshake(user.name, user.password, capabilities=caps)
        _consume_own_queue(first)
        wait_until(lambda: len(broker.proxy_connections(user.name)) == 2, what="two upstreams")
        other.handshake(user.name, user.password, capabilities=caps)
        _consume_own_queue(other)
        assert broker.consumers_by_upstream(user.name) == [1, 1], "not one client per upstream"
        raise_alarm()
        first.publish(1, b"under the alarm", routing_key=queue_name)
        told = _next_method(first, commands.Connection.Blocked)
        other.method(1, commands.Channel.Close(200, "done", 0, 0))
        seen = []
        assert _next_method(other, commands.Connection.Blocked, seen).reason == told.reason
        assert told.reason == "low on memory"
        assert commands.Channel.CloseOk in seen, "told before its channel was closed"
        clear_alarm()
        _next_method(other, commands.Connection.Unblocked)


def _next_method(client: RawClient, wanted: type, seen: list | None = None, timeout: float = 15):
    """The next `wanted` method the client gets; the types before it go in `seen`."""
    deadline = time.monotonic() + timeout
    while True:
        got = client.read_method(max(0.01, deadline - time.monotonic()))
        assert got is not None, "connection closed"
        if isinstance(got[1], wanted):
            return got[1]
        if seen is not None:
            seen.append(type(got[1]))


def owning(client: RawClient, user, queue: str) -> None:
    """`client` in as `user`, channel 1 open, `queue` declared exclusive."""
    client.handshake(user.name, user.password)
    client.open_channel(1)
    client.method(1, commands.Queue.Declare(queue=queue, exclusive=True))
    client.expect(commands.Queue.DeclareOk)


def _consume_own_queue(client: RawClient) -> None:
    client.open_channel(1)
    client.method(1, commands.Queue.Declare(queue="", exclusive=True))
    _, ok = client.expect(commands.Queue.DeclareOk)
    client.method(1, commands.Basic.Consume(queue=ok.queue, no_ack=True))
    client.expect(commands.Basic.ConsumeOk)
