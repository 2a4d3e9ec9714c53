"""The client session: the handshake the proxy answers itself, protocol
headers it cannot speak, heartbeats both ways, frame_max and the handshake
timeout — each checked through the real daemon against the real broker, and
where the broker's own answer matters, against the broker directly too."""

from __future__ import annotations

import itertools
import json
import socket
import time

import pika
import pytest
from pamqp import commands, frame

from amqplex.protocol.constants import FRAME_BODY, FRAME_HEADER, FRAME_HEARTBEAT, PROTOCOL_HEADER
from tests.conftest import broker_params, proxy_params
from tests.support import broker
from tests.support.rawclient import RawClient, message
from tests.support.relay import UP

BROKER = broker.BROKER_PORT
HUNDRED_KB = bytes(range(256)) * 400  # 102400 bytes: ~25 frames of 4096


def connection_start(port: int) -> commands.Connection.Start:
    with RawClient(port) as client:
        client.send(PROTOCOL_HEADER)
        _, start = client.expect(commands.Connection.Start)
        return start


def reply_to_header(port: int, header: bytes, timeout: float = 5) -> tuple[bytes, bool]:
    """Everything the server sends after `header`, and whether it then closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(header)
        received = b""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            sock.settimeout(remaining)
            try:
                data = sock.recv(4096)
            except TimeoutError:
                return received, False
            except ConnectionResetError:
                return received, True
            if not data:
                return received, True
            received += data
        return received, False


def methods_until_eof(client: RawClient, timeout: float) -> list:
    """Every method the server sends until it closes the socket (a reset counts)."""
    got = []
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            item = client.read_method(remaining)
        except ConnectionResetError:
            return got
        if item is None:
            return got
        got.append(item[1])
    raise AssertionError(f"server did not close the socket within {timeout}s; sent {got!r}")


def broker_connection_timeouts(user: str) -> dict[str, int]:
    """name -> negotiated heartbeat of the broker's connections for `user`."""
    out = broker.rabbitmqctl("list_connections", "--formatter", "json", "name", "user", "timeout")
    return {row["name"]: row["timeout"] for row in json.loads(out or "[]") if row["user"] == user}


# -- Connection.Start ------------------------------------------------------------


def test_start_offers_the_brokers_own_server_properties(amqplexd):
    direct = connection_start(BROKER).server_properties
    proxied = connection_start(amqplexd.port).server_properties
    assert "publisher_confirms" in direct["capabilities"]
    for key in ("product", "version", "capabilities"):
        assert proxied[key] == direct[key], key


def test_start_offers_plain_and_amqplain(amqplexd):
    mechanisms = connection_start(amqplexd.port).mechanisms
    if isinstance(mechanisms, bytes):
        mechanisms = mechanisms.decode()
    assert {"PLAIN", "AMQPLAIN"} <= set(mechanisms.split())


def test_pika_confirm_delivery_works_through_the_proxy(amqplexd, queue_name):
    connection = pika.BlockingConnection(proxy_params(amqplexd.port))
    try:
        assert connection._impl.publisher_confirms, "pika saw no publisher_confirms capability"
        channel = connection.channel()
        channel.queue_declare(queue_name)
        channel.confirm_delivery()
        for i in range(10):
            channel.basic_publish("", queue_name, str(i).encode())  # raises if nacked
        with pytest.raises(pika.exceptions.UnroutableError):
            channel.basic_publish("", f"{queue_name}-nowhere", b"x", mandatory=True)
        assert channel.queue_declare(queue_name, passive=True).method.message_count == 10
    finally:
        connection.close()


# -- protocol headers ------------------------------------------------------------

FOREIGN_HEADERS = [
    pytest.param(b"GET / HTTP/1.1\r\n\r\n", id="http"),
    pytest.param(b"AMQP\x00\x00\x09\x00", id="amqp-0-9-0"),
    pytest.param(b"AMQP\x01\x01\x00\x0a", id="amqp-0-10"),
    pytest.param(b"AMQP\x00\x00\x08\x00", id="amqp-0-8"),
]


@pytest.mark.parametrize("header", FOREIGN_HEADERS)
def test_broker_answers_foreign_header_with_0_9_1_and_closes(header):
    assert reply_to_header(BROKER, header) == (PROTOCOL_HEADER, True)


@pytest.mark.parametrize("header", FOREIGN_HEADERS)
def test_proxy_answers_foreign_header_with_0_9_1_and_closes(amqplexd, header):
    assert reply_to_header(amqplexd.port, header) == (PROTOCOL_HEADER, True)


def test_proxy_refuses_foreign_header_sent_byte_by_byte(amqplexd):
    with socket.create_connection(("127.0.0.1", amqplexd.port), timeout=5) as sock:
        sock.sendall(b"AM")
        sock.sendall(b"QP\x00\x00\x09")
        sock.sendall(b"\x00")
        received = b""
        while data := sock.recv(4096):
            received += data
    assert received == PROTOCOL_HEADER


# -- heartbeats with the client --------------------------------------------------


@pytest.mark.parametrize("place", ["broker", "proxy, pool ready", "proxy, new pool"])
def test_channel_open_sent_right_after_connection_open_is_served(amqplexd, user, place):
    """A client may send Channel.Open and more behind Connection.Open without
    waiting for OpenOk, as the broker allows; through the proxy they are
    served both when the pool is ready and while the broker is still asked
    about the client's vhost."""
    keeper = None
    if place == "proxy, pool ready":
        keeper = pika.BlockingConnection(proxy_params(amqplexd.port, user))
    with RawClient(BROKER if place == "broker" else amqplexd.port) as client:
        client.handshake(user.name, user.password, open_connection=False)
        client.send(
            frame.marshal(commands.Connection.Open(virtual_host="/"), 0)
            + frame.marshal(commands.Channel.Open(), 1)
            + frame.marshal(commands.Queue.Declare(queue="", exclusive=True), 1)
        )
        client.expect(commands.Connection.OpenOk, timeout=5)
        client.expect(commands.Channel.OpenOk, timeout=5)
        client.expect(commands.Queue.DeclareOk, timeout=5)
    if keeper is not None:
        keeper.close()


def test_idle_client_receives_heartbeats(amqplexd):
    with RawClient(amqplexd.port) as client:
        client.handshake(heartbeat=2)
        started = time.monotonic()
        frame_type, channel, raw = client.read_frame(timeout=3)
        assert (frame_type, channel) == (FRAME_HEARTBEAT, 0)
        assert time.monotonic() - started < 3


def test_silent_client_is_dropped_after_two_intervals(amqplexd):
    with RawClient(amqplexd.port) as client:
        _, opened = client.handshake(heartbeat=2)
        assert isinstance(opened, commands.Connection.OpenOk)
        started = time.monotonic()
        assert client.read_eof(timeout=8), "silent client was never dropped"
        elapsed = time.monotonic() - started
    # Two intervals are 4 s and the proxy looks every heartbeat/2: (4, 5] s.
    # (RabbitMQ itself drops such a client at ~6 s.)
    assert 3.5 <= elapsed <= 5.6, f"dropped after {elapsed:.2f}s"


def test_client_sending_heartbeats_stays_connected(amqplexd):
    with RawClient(amqplexd.port) as client:
        client.handshake(heartbeat=2)
        # Echo each of the proxy's heartbeats for well past the drop time.
        arrivals = [time.monotonic()]
        deadline = arrivals[0] + 7
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                got = client.read_frame(timeout=remaining)
            except TimeoutError:
                break
            assert got is not None, f"dropped after {len(arrivals) - 1} heartbeats"
            assert got[0] == FRAME_HEARTBEAT, got
            arrivals.append(time.monotonic())
            client.send(b"\x08\x00\x00\x00\x00\x00\x00\xce")
        # The proxy looks every half interval and sends when it wrote nothing
        # for that long: a heartbeat every 1 to 2 s (RabbitMQ's own pace is
        # one an interval), never a gap near the 4 s that drops a client.
        gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
        assert len(gaps) >= 3, arrivals
        assert max(gaps) < 2.5, gaps
        client.open_channel(1)


def test_broker_drops_a_silent_connection_with_heartbeat_1():
    """The control for the upstream heartbeat test: silence is fatal there."""
    with RawClient(BROKER) as client:
        client.handshake(heartbeat=1)
        assert client.read_eof(timeout=6)


def test_idle_consumer_outlives_the_brokers_heartbeat_timeout(fresh_amqplexd, user, queue_name):
    daemon = fresh_amqplexd(env={"AMQP_UPSTREAM_HEARTBEAT": "1"})
    connection = pika.BlockingConnection(proxy_params(daemon.port, user, heartbeat=0))
    try:
        channel = connection.channel()
        channel.queue_declare(queue_name)
        received = []
        channel.basic_consume(queue_name, lambda ch, m, p, body: received.append(body), True)
        before = broker_connection_timeouts(user.name)
        assert list(before.values()) == [1], f"upstream heartbeat not 1: {before}"
        connection.sleep(5)  # the idleness under test
        publisher = pika.BlockingConnection(broker_params())
        publisher.channel().basic_publish("", queue_name, b"after idling")
        publisher.close()
        deadline = time.monotonic() + 10
        while not received and time.monotonic() < deadline:
            connection.process_data_events(time_limit=0.2)
        assert received == [b"after idling"]
        assert broker_connection_timeouts(user.name) == before
    finally:
        if connection.is_open:
            connection.close()


# -- frame_max ---------------------------------------------------------------------


def test_small_frame_max_client_gets_large_messages_intact(amqplexd, queue_name):
    publisher = pika.BlockingConnection(broker_params())
    publisher.channel().queue_declare(queue_name)
    connection = pika.BlockingConnection(proxy_params(amqplexd.port, frame_max=4096))
    try:
        assert connection._impl.params.frame_max == 4096
        channel = connection.channel()
        bodies = [HUNDRED_KB, HUNDRED_KB[::-1]]
        # Confirmed, so both are queued, in order, before the get below.
        publishing = publisher.channel()
        publishing.confirm_delivery()
        for body in bodies:
            publishing.basic_publish("", queue_name, body)
        _, _, got = channel.basic_get(queue_name, auto_ack=True)
        assert got == bodies[0]
        for method, _, got in channel.consume(queue_name, auto_ack=True, inactivity_timeout=5):
            assert method is not None, "delivery did not arrive"
            assert got == bodies[1]
            break
        channel.cancel()
    finally:
        connection.close()
        publisher.close()


def test_small_frame_max_client_can_publish_large_messages(amqplexd, queue_name):
    connection = pika.BlockingConnection(proxy_params(amqplexd.port, frame_max=4096))
    try:
        channel = connection.channel()
        channel.queue_declare(queue_name)
        channel.confirm_delivery()
        channel.basic_publish("", queue_name, HUNDRED_KB)
    finally:
        connection.close()
    direct = pika.BlockingConnection(broker_params())
    try:
        _, _, got = direct.channel().basic_get(queue_name, auto_ack=True)
        assert got == HUNDRED_KB
    finally:
        direct.close()


def test_bodies_are_resplit_to_the_clients_frame_max(amqplexd, queue_name):
    publisher = pika.BlockingConnection(broker_params())
    try:
        publisher.channel().queue_declare(queue_name)
        publisher.channel().basic_publish("", queue_name, HUNDRED_KB)
    finally:
        publisher.close()
    with RawClient(amqplexd.port) as client:
        client.handshake(frame_max=4096)
        client.open_channel(1)
        client.method(1, commands.Basic.Get(queue=queue_name, no_ack=True))
        client.expect(commands.Basic.GetOk)
        frame_type, channel, header = client.read_frame()
        assert (frame_type, channel) == (FRAME_HEADER, 1)
        assert len(header) <= 4096
        body = b""
        while len(body) < len(HUNDRED_KB):
            frame_type, channel, raw = client.read_frame()
            assert (frame_type, channel) == (FRAME_BODY, 1)
            assert len(raw) <= 4096, f"body frame of {len(raw)} bytes"
            body += raw[7:-1]
        assert body == HUNDRED_KB


def test_bodies_are_recut_for_an_upstream_offering_less_than_the_client_was(
    fresh_amqplexd, relay, queue_name
):
    """A client told the first broker's frame_max, whose channel lands on an
    upstream offered less (another node of a cluster, say): its bodies are
    re-cut to that upstream's size, both those sent while the channel waited
    for the upstream and those sent after."""
    daemon = fresh_amqplexd(
        upstream=relay.url, env={"AMQP_POOL_MAX_CHANNELS": "1", "AMQP_POOL_IDLE_CHANNELS": "0"}
    )
    bodies = [HUNDRED_KB, HUNDRED_KB[::-1]]
    with RawClient(daemon.port) as first, RawClient(daemon.port) as client:
        first.handshake()
        client.handshake()
        assert client.tune.frame_max > len(HUNDRED_KB) + 8, "the body must fit one frame"
        first.open_channel(1)  # fills the first upstream
        first.method(1, commands.Queue.Declare(queue=queue_name))
        first.expect(commands.Queue.DeclareOk)
        relay.offer_frame_max(4096)
        # The channel waits for a second upstream; the first message with it.
        client.send(frame.marshal(commands.Channel.Open(), 1) + message(1, queue_name, bodies[0]))
        client.expect(commands.Channel.OpenOk)
        client.send(message(1, queue_name, bodies[1]))
        client.method(1, commands.Queue.Declare(queue=queue_name, passive=True))
        client.expect(commands.Queue.DeclareOk)
    second = relay.connections[-1]
    sizes = [len(f.raw) for f in second.frames(UP) if f.frame_type == FRAME_BODY]
    assert sizes and max(sizes) <= 4096, f"body frames of {max(sizes)} bytes upstream"
    direct = pika.BlockingConnection(broker_params())
    try:
        channel = direct.channel()
        assert [channel.basic_get(queue_name, auto_ack=True)[2] for _ in bodies] == bodies
    finally:
        direct.close()


def _onto_an_upstream_offering_4096(fresh_amqplexd, relay, queue_name: str):
    """An amqplexd whose first upstream (two channels, both taken by the
    client returned, which keeps them) was offered the broker's frame_max,
    and whose next upstream will be offered 4096."""
    daemon = fresh_amqplexd(
        upstream=relay.url, env={"AMQP_POOL_MAX_CHANNELS": "2", "AMQP_POOL_IDLE_CHANNELS": "0"}
    )
    first = RawClient(daemon.port)
    first.handshake()
    for channel in (1, 2):
        first.open_channel(channel)
    first.method(1, commands.Queue.Declare(queue=queue_name))
    first.expect(commands.Queue.DeclareOk)
    relay.offer_frame_max(4096)
    return daemon, first


def _canary_works(client: RawClient, channel: int, queue_name: str) -> None:
    client.method(channel, commands.Queue.Declare(queue=queue_name, passive=True))
    client.expect(commands.Queue.DeclareOk)


def test_a_content_header_too_large_for_its_upstream_is_refused_to_its_client_alone(
    fresh_amqplexd, relay, queue_name
):
    """A content header cannot be re-cut as a body can: one larger than the
    frame_max of the upstream its channel is on (though not than the
    client was offered) gets the client RabbitMQ's own 501 from that
    upstream's broker, and the upstream, with a canary on it, stays up."""
    daemon, first = _onto_an_upstream_offering_4096(fresh_amqplexd, relay, queue_name)
    with first, RawClient(daemon.port) as canary, RawClient(daemon.port) as client:
        client.handshake()  # before the worker learns 4096 from the next upstream
        assert client.tune.frame_max > 8192
        canary.handshake()
        canary.open_channel(1)  # dials the second upstream, offered 4096
        upstreams = relay.open_connections
        client.open_channel(1)  # beside the canary's
        properties = commands.Basic.Properties(headers={"pad": "x" * 6000})
        client.publish(1, b"too large a header", routing_key=queue_name, properties=properties)
        close = client.expect_connection_close()
        assert close.reply_code == 501
        assert "frame_too_large" in close.reply_text and ",4088}" in close.reply_text
        _canary_works(canary, 1, queue_name)
        assert relay.open_connections == upstreams, "an upstream was closed or replaced"


def test_a_method_too_large_for_its_upstream_held_while_its_channel_waited_is_refused(
    fresh_amqplexd, relay, queue_name
):
    """The same for a method sent with Channel.Open while the channel waited
    for its upstream to be dialled: found too large when the channel is
    bound, from the pool's side, not the client's read."""
    daemon, first = _onto_an_upstream_offering_4096(fresh_amqplexd, relay, queue_name)
    with first, RawClient(daemon.port) as client, RawClient(daemon.port) as canary:
        client.handshake()
        declare = commands.Queue.Declare(queue=queue_name, arguments={"x-pad": "x" * 6000})
        client.send(frame.marshal(commands.Channel.Open(), 1) + frame.marshal(declare, 1))
        close = client.expect_connection_close()
        assert close.reply_code == 501
        assert "frame_too_large" in close.reply_text
        upstreams = relay.open_connections
        canary.handshake()
        canary.open_channel(1)  # on the upstream the client's channel was bound to
        _canary_works(canary, 1, queue_name)
        assert relay.open_connections == upstreams, "an upstream was closed or replaced"


def test_a_frame_over_the_minimum_size_before_tune_is_refused_with_501(amqplexd):
    """Until TuneOk, RabbitMQ takes frames of FRAME_MIN_SIZE (4096 octets of
    payload) only: a larger StartOk is its 501 frame_too_large, before any
    login, so no client can make the proxy hold more than that unchecked."""
    with RawClient(amqplexd.port) as client:
        client.send(PROTOCOL_HEADER)
        client.expect(commands.Connection.Start)
        start_ok = commands.Connection.StartOk(
            client_properties={"pad": "x" * 5000}, response="\x00guest\x00guest"
        )
        client.send(frame.marshal(start_ok, 0))
        close = client.expect_connection_close(timeout=5)
    assert close.reply_code == 501
    assert "frame_too_large" in close.reply_text and ",4088}" in close.reply_text


def test_capabilities_that_are_not_a_table_are_ignored(amqplexd):
    """As RabbitMQ ignores them: the client is in, with neither capability."""
    with RawClient(amqplexd.port) as client:
        _, answer = client.handshake(capabilities="not a table")
        assert isinstance(answer, commands.Connection.OpenOk)
        client.open_channel(1)


# -- frame_max below the minimum ---------------------------------------------------


def test_broker_refuses_tune_ok_below_frame_min_size():
    """RabbitMQ 3.10 refuses with not_allowed (530) — it logs "negotiated
    frame_max = 4095 is lower than the minimum allowed value (4096)" — and,
    the handshake not being done, closes the socket after its silent-close
    delay without sending the Close (older brokers did send it)."""
    with RawClient(BROKER) as client:
        client.handshake(frame_max=4095, open_connection=False)
        client.method(0, commands.Connection.Open(virtual_host="/"))
        got = methods_until_eof(client, timeout=8)
    assert not any(isinstance(method, commands.Connection.OpenOk) for method in got)
    assert all(
        method.reply_code == 530 for method in got if isinstance(method, commands.Connection.Close)
    ), got


@pytest.mark.parametrize("frame_max", [4095, 1024])
def test_proxy_refuses_tune_ok_below_frame_min_size_with_530(amqplexd, frame_max):
    with RawClient(amqplexd.port) as client:
        client.handshake(frame_max=frame_max, open_connection=False)
        client.method(0, commands.Connection.Open(virtual_host="/"))
        close = client.expect_connection_close(timeout=5)
        assert close.reply_code == 530
        assert close.reply_text.startswith("NOT_ALLOWED - ")
        assert str(frame_max) in close.reply_text
        assert (close.class_id, close.method_id) == (10, 31)
        assert methods_until_eof(client, timeout=5) == []


@pytest.mark.parametrize("field", ["frame_max", "channel_max"])
def test_tune_ok_asking_for_no_limit_is_refused_as_the_broker_refuses_it(amqplexd, field):
    """0, "no limit", against a server that has one: RabbitMQ refuses it
    (not_allowed, "frame_max=0 > 131072 max size"), and so does the proxy,
    with the Close the broker leaves out during the handshake."""
    for port in (BROKER, amqplexd.port):
        with RawClient(port) as client:
            client.send(PROTOCOL_HEADER)
            client.expect(commands.Connection.Start)
            client.method(0, commands.Connection.StartOk(response="\x00guest\x00guest"))
            _, tune = client.expect(commands.Connection.Tune)
            values = {"frame_max": tune.frame_max, "channel_max": tune.channel_max, field: 0}
            client.method(0, commands.Connection.TuneOk(heartbeat=0, **values))
            client.method(0, commands.Connection.Open(virtual_host="/"))
            got = methods_until_eof(client, timeout=8)
        assert not any(isinstance(m, commands.Connection.OpenOk) for m in got), (port, got)
        closes = [m for m in got if isinstance(m, commands.Connection.Close)]
        if port == amqplexd.port:
            assert [c.reply_code for c in closes] == [530]
            maximum = tune.frame_max if field == "frame_max" else tune.channel_max
            assert closes[0].reply_text == f"NOT_ALLOWED - {field}=0 > {maximum} max size"


# -- handshake timeout ---------------------------------------------------------------


@pytest.mark.parametrize("stage", ["partial-header", "after-start-ok", "after-tune-ok"])
def test_stalled_handshake_is_closed_after_the_timeout(fresh_amqplexd, stage):
    daemon = fresh_amqplexd(env={"AMQP_CLIENT_HANDSHAKE_TIMEOUT": "1"})
    with RawClient(daemon.port) as client:
        started = time.monotonic()
        if stage == "partial-header":
            client.send(PROTOCOL_HEADER[:5])
        else:
            client.send(PROTOCOL_HEADER)
            client.expect(commands.Connection.Start)
            client.method(
                0,
                commands.Connection.StartOk(
                    client_properties={}, mechanism="PLAIN", response="\0guest\0guest"
                ),
            )
            _, tune = client.expect(commands.Connection.Tune)
            if stage == "after-tune-ok":
                client.method(
                    0,
                    commands.Connection.TuneOk(
                        channel_max=tune.channel_max, frame_max=tune.frame_max, heartbeat=0
                    ),
                )
        assert client.read_eof(timeout=5), "stalled client was never closed"
        elapsed = time.monotonic() - started
    assert 0.8 <= elapsed <= 3, f"closed after {elapsed:.2f}s"


def test_clients_stalled_at_different_times_are_each_closed_at_their_own_deadline(
    fresh_amqplexd,
):
    """One timer keeps every client's deadline (worker/deadlines.py): the
    second client's comes later, and a handshake finishing between the two
    moves neither."""
    daemon = fresh_amqplexd("-w", "1", env={"AMQP_CLIENT_HANDSHAKE_TIMEOUT": "1"})
    with RawClient(daemon.port) as first:
        first_started = time.monotonic()  # a client's time counts from its connect
        first.send(PROTOCOL_HEADER)
        first.expect(commands.Connection.Start)
        with RawClient(daemon.port) as finished:
            finished.handshake()
            assert first.read_eof(timeout=0.5) is False
            with RawClient(daemon.port) as second:
                second_started = time.monotonic()
                second.send(PROTOCOL_HEADER)
                second.expect(commands.Connection.Start)
                assert first.read_eof(timeout=5), "the first stalled client was never closed"
                first_closed = time.monotonic()
                assert second.read_eof(timeout=5), "the second stalled client was never closed"
                second_closed = time.monotonic()
            finished.open_channel(1)
    assert 0.8 <= first_closed - first_started <= 3
    assert 0.8 <= second_closed - second_started <= 3
    assert second_closed - first_closed >= 0.3


def test_handshake_timeout_spares_a_finished_handshake(fresh_amqplexd):
    daemon = fresh_amqplexd(env={"AMQP_CLIENT_HANDSHAKE_TIMEOUT": "1"})
    with RawClient(daemon.port) as client:
        _, opened = client.handshake()
        assert isinstance(opened, commands.Connection.OpenOk)
        assert not client.read_eof(timeout=2)
        client.open_channel(1)
