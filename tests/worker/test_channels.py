"""Channels (issue 2, points 4 and 5; DESIGN rules 4 and 5): upstream channel
ids are never reused before the broker's CloseOk, closes in either direction
free their slot, a departing client's channels are closed upstream, and a
client's Channel.Open is answered from a pre-opened channel.

The daemon's upstream goes through the tests' own relay, so the assertions
read the proxy's upstream AMQP stream frame by frame.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import time
import uuid

import pika
import pika.exceptions
import pytest
from pamqp import commands, header
from pamqp import frame as pamqp_frame

from tests.conftest import broker_params, proxy_params
from tests.support import broker
from tests.support.rawclient import RawClient, body_frame, message
from tests.support.relay import DOWN, UP, Relay, RelayConnection
from tests.support.waiting import wait_until

SMALL_POOL = {"AMQP_POOL_MAX_CHANNELS": "5"}


# -- reading the upstream stream ----------------------------------------------------


def amqp_connections(relay: Relay) -> list[RelayConnection]:
    """Relay connections that carried an opened AMQP connection (the daemon's
    start-up read of the broker's server properties is left out)."""
    return [
        conn
        for conn in list(relay.connections)
        if any(isinstance(f.method, commands.Connection.OpenOk) for f in conn.frames(DOWN))
    ]


@dataclasses.dataclass
class ChannelLife:
    """One upstream channel id as the recorded stream shows it."""

    state: str = "free"  # free, opening, open, closing
    proxy_close_pending: bool = False  # proxy sent Close, broker's CloseOk not yet seen
    broker_close_pending: bool = False  # broker sent Close, proxy's CloseOk not yet sent
    opens: int = 0
    broker_closes: int = 0


def replay_channels(conn: RelayConnection) -> tuple[dict[int, ChannelLife], list[str]]:
    """Replay one upstream connection's channel methods in the relay's order.
    Returns each channel id's state and every Channel.Open the proxy sent on an
    id whose previous use had not finished closing in both directions."""
    lives: dict[int, ChannelLife] = {}
    violations: list[str] = []
    for frame in conn.timeline():
        method = frame.method
        if frame.channel == 0 or method is None:
            continue
        life = lives.setdefault(frame.channel, ChannelLife())
        sent = frame.direction == UP
        if sent and isinstance(method, commands.Channel.Open):
            if life.state != "free":
                violations.append(
                    f"connection {conn.number}: Channel.Open on {frame.channel} (seq {frame.seq}) "
                    f"while {life.state}, proxy close pending {life.proxy_close_pending}, "
                    f"broker close pending {life.broker_close_pending}"
                )
            life.state = "opening"
            life.opens += 1
        elif not sent and isinstance(method, commands.Channel.OpenOk):
            if life.state == "opening":
                life.state = "open"
        elif isinstance(method, commands.Channel.Close):
            life.state = "closing"
            if sent:
                life.proxy_close_pending = True
            else:
                life.broker_close_pending = True
                life.broker_closes += 1
        elif isinstance(method, commands.Channel.CloseOk):
            if sent:
                life.broker_close_pending = False
            else:
                life.proxy_close_pending = False
        if life.state == "closing" and not (life.proxy_close_pending or life.broker_close_pending):
            life.state = "free"
    return lives, violations


def upstream_frames(relay: Relay, predicate) -> list:
    """(connection, frame) for every proxy -> broker frame matching predicate."""
    return [
        (conn, frame)
        for conn in amqp_connections(relay)
        for frame in conn.frames(UP)
        if predicate(frame)
    ]


def unsettled_channels(relay: Relay) -> list[tuple[int, int, str]]:
    """Channels still opening or closing on any upstream connection."""
    return [
        (conn.number, channel, life.state)
        for conn in amqp_connections(relay)
        for channel, life in replay_channels(conn)[0].items()
        if life.state in ("opening", "closing")
    ]


def publish_to(routing_key: str):
    def matches(frame) -> bool:
        return (
            isinstance(frame.method, commands.Basic.Publish)
            and frame.method.routing_key == routing_key
        )

    return matches


def declare_of(queue: str):
    def matches(frame) -> bool:
        return isinstance(frame.method, commands.Queue.Declare) and frame.method.queue == queue

    return matches


# -- the broker's own view ---------------------------------------------------------------


def broker_channel_counts(user) -> list[int]:
    """Channels the broker counts on each connection amqplex opened for `user`."""
    out = broker.rabbitmqctl(
        "list_connections", "--formatter", "json", "user", "channels", "client_properties"
    )
    rows = [row for row in json.loads(out or "[]") if row["user"] == user.name]
    return [row["channels"] for row in rows if "amqplex" in json.dumps(row["client_properties"])]


@pytest.fixture
def filled_queue(queue_name):
    """A queue holding five messages, declared straight at the broker."""
    connection = pika.BlockingConnection(broker_params())
    channel = connection.channel()
    channel.queue_declare(queue_name)
    bodies = [f"m{i}".encode() for i in range(5)]
    for body in bodies:
        channel.basic_publish("", queue_name, body)
    connection.close()
    return queue_name, bodies


def ready_count(queue: str) -> int:
    connection = pika.BlockingConnection(broker_params())
    try:
        return connection.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        connection.close()


def missing_queue() -> str:
    return f"amqplex-missing-{uuid.uuid4().hex[:12]}"


def close_method(code: int = 200, text: str = "bye"):
    return dict(reply_code=code, reply_text=text, class_id=0, method_id=0)


# -- clients the tests run -----------------------------------------------------------------


def pika_churn(port: int, user, queue: str, rounds: int = 3) -> None:
    """Broker-initiated closes (404) and client Channel.Close, then Connection.Close."""
    connection = pika.BlockingConnection(proxy_params(port, user))
    try:
        for _ in range(rounds):
            channel = connection.channel()
            with pytest.raises(pika.exceptions.ChannelClosedByBroker) as caught:
                channel.queue_declare(missing_queue(), passive=True)
            assert caught.value.reply_code == 404
            channel = connection.channel()
            channel.basic_publish("", queue, b"churn")
            channel.queue_declare(queue, passive=True)
            channel.close()
        connection.channel()
    finally:
        connection.close()


def raw_churn(port: int, user, queue: str, ending: str) -> None:
    """A raw client with two open channels and a 404 on one, that leaves by
    Connection.Close, by vanishing with the broker's Close unanswered, or by
    vanishing while its 404 is still on the way."""
    raw = RawClient(port)
    try:
        raw.handshake(user.name, user.password)
        raw.open_channel(1)
        raw.open_channel(2)
        raw.method(2, commands.Queue.Declare(queue=queue, passive=True))
        raw.expect(commands.Queue.DeclareOk)
        raw.method(1, commands.Queue.Declare(queue=missing_queue(), passive=True))
        if ending == "vanish-in-flight":
            return
        channel, close = raw.expect(commands.Channel.Close)
        assert (channel, close.reply_code) == (1, 404)
        if ending == "connection-close":
            raw.method(0, commands.Connection.Close(**close_method()))
            raw.expect(commands.Connection.CloseOk)
    finally:
        raw.close()


# -- 1. ids are never reused early -------------------------------------------------------------


def test_upstream_channel_id_is_never_reopened_before_its_close_completes(
    fresh_amqplexd, relay, user, queue_name
):
    broker_connection = pika.BlockingConnection(broker_params())
    broker_connection.channel().queue_declare(queue_name)
    broker_connection.close()
    daemon = fresh_amqplexd(upstream=relay.url, env=SMALL_POOL)
    jobs = []
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=8)
    try:
        for i in range(8):
            jobs.append(executor.submit(pika_churn, daemon.port, user, queue_name))
            ending = ("connection-close", "vanish", "vanish-in-flight")[i % 3]
            jobs.append(executor.submit(raw_churn, daemon.port, user, queue_name, ending))
        # pika waits for a reply without a bound: a lost CloseOk would hang it.
        done, hung = concurrent.futures.wait(jobs, timeout=30)
        # What went upstream is checked first: it names the fault best.
        upstreams = amqp_connections(relay)
        assert upstreams, "no upstream connection went through the relay"
        for conn in upstreams:
            assert replay_channels(conn)[1] == []
        assert not hung, f"{len(hung)} clients hung waiting for the proxy"
        for job in done:
            job.result()
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
    # Every close, including those of vanished clients, completes both ways.
    wait_until(lambda: not unsettled_channels(relay), what="all upstream closes to complete")

    upstreams = amqp_connections(relay)
    opens = 0
    reused = 0
    broker_closes = 0
    for conn in upstreams:
        lives, violations = replay_channels(conn)
        assert violations == []
        assert max(lives, default=0) <= 5, f"channel ids above pool.max_channels: {sorted(lives)}"
        opens += sum(life.opens for life in lives.values())
        reused += sum(1 for life in lives.values() if life.opens > 1)
        broker_closes += sum(life.broker_closes for life in lives.values())
    # The run really exercised what it proves: ids were reused, and after
    # broker-initiated closes too (8 pika clients x 3 + 6 raw 404s at least).
    assert reused > 0 and opens > 5 * len(upstreams)
    assert broker_closes >= 8 * 3 + 8


# -- 2. a broker-initiated close reaches the client and frees the slot ---------------------------


def test_broker_channel_close_reaches_pika_with_404_and_frees_the_slot(fresh_amqplexd, relay, user):
    daemon = fresh_amqplexd(upstream=relay.url, env=SMALL_POOL)
    connection = pika.BlockingConnection(proxy_params(daemon.port, user))
    try:
        # Three times the pool's channels: a slot kept after each 404 would
        # fill the upstream and force a second one.
        for _ in range(15):
            missing = missing_queue()
            channel = connection.channel()
            with pytest.raises(pika.exceptions.ChannelClosedByBroker) as caught:
                channel.queue_declare(missing, passive=True)
            assert caught.value.reply_code == 404
            assert caught.value.reply_text == f"NOT_FOUND - no queue '{missing}' in vhost '/'"
        channel = connection.channel()
        declared = channel.queue_declare("", exclusive=True).method.queue
        channel.basic_publish("", declared, b"after the 404s")
        _, _, body = channel.basic_get(declared, auto_ack=True)
        assert body == b"after the 404s"
        assert len(amqp_connections(relay)) == 1
        counts = broker_channel_counts(user)
        assert len(counts) == 1 and counts[0] <= 5, counts
    finally:
        connection.close()


def test_broker_close_slot_is_released_only_after_the_client_close_ok(fresh_amqplexd, relay, user):
    daemon = fresh_amqplexd(upstream=relay.url)
    missing = missing_queue()
    with RawClient(daemon.port) as raw:
        raw.handshake(user.name, user.password)
        raw.open_channel(1)
        raw.method(1, commands.Queue.Declare(queue=missing, passive=True))
        channel, close = raw.expect(commands.Channel.Close)
        assert (channel, close.reply_code) == (1, 404)
        ((conn, declare),) = upstream_frames(relay, declare_of(missing))
        uid = declare.channel

        def close_oks_sent() -> int:
            return sum(
                1
                for frame in conn.frames(UP)
                if frame.channel == uid
                and frame.seq > declare.seq
                and isinstance(frame.method, commands.Channel.CloseOk)
            )

        # A round trip on another channel of the same upstream: had the proxy
        # answered the broker itself, its CloseOk would have left by now.
        raw.open_channel(2)
        raw.method(2, commands.Queue.Declare(queue="", exclusive=True))
        raw.expect(commands.Queue.DeclareOk)
        assert close_oks_sent() == 0, "the proxy answered the broker before its client did"
        assert replay_channels(conn)[0][uid].state == "closing"

        raw.method(1, commands.Channel.CloseOk())
        wait_until(lambda: close_oks_sent() == 1, what="the client's CloseOk to go upstream")
        wait_until(lambda: replay_channels(conn)[0][uid].state == "free", what="slot release")
        # The client's own channel id is free again too.
        raw.open_channel(1)
        raw.method(1, commands.Queue.Declare(queue="", exclusive=True))
        raw.expect(commands.Queue.DeclareOk)


# -- 3. a departing client's channels are closed upstream -------------------------------------


@pytest.mark.parametrize("leave", ["connection-close", "vanish"])
def test_departed_client_unacked_messages_return_and_canary_is_untouched(
    fresh_amqplexd, relay, user, canary_for, filled_queue, leave
):
    queue, bodies = filled_queue
    daemon = fresh_amqplexd(upstream=relay.url)
    canary = canary_for(daemon.port, user)
    canary.wait_round_trips(3)
    upstreams_before = relay.connection_count

    raw = RawClient(daemon.port)
    raw.handshake(user.name, user.password)
    # Three deliveries to a consumer and two basic.gets, none acked.
    raw.open_channel(1)
    raw.method(1, commands.Basic.Qos(prefetch_count=3))
    raw.expect(commands.Basic.QosOk)
    raw.method(1, commands.Basic.Consume(queue=queue, consumer_tag="held"))
    raw.expect(commands.Basic.ConsumeOk)
    for _ in range(3):
        raw.expect(commands.Basic.Deliver)
    raw.open_channel(2)
    for _ in range(2):
        raw.method(2, commands.Basic.Get(queue=queue))
        raw.expect(commands.Basic.GetOk)
    assert ready_count(queue) == 0

    if leave == "connection-close":
        raw.method(0, commands.Connection.Close(**close_method()))
        raw.expect(commands.Connection.CloseOk)
        assert raw.read_eof(5)
    raw.close()

    wait_until(lambda: ready_count(queue) == len(bodies), what="unacked messages to return")
    connection = pika.BlockingConnection(broker_params())
    try:
        channel = connection.channel()
        returned = []
        for _ in bodies:
            method, _, body = channel.basic_get(queue, auto_ack=True)
            assert method is not None and method.redelivered, "message not marked redelivered"
            returned.append(body)
        assert sorted(returned) == sorted(bodies)
    finally:
        connection.close()

    canary.wait_round_trips(5)
    assert relay.connection_count == upstreams_before, "an upstream was re-dialled"
    # Both of its channels were closed upstream, by the proxy, not left open.
    wait_until(lambda: not unsettled_channels(relay), what="upstream closes to complete")


# -- 4. zero-round-trip Channel.Open, and no leftovers for the next client ------------------------


def wait_pool_warm(relay: Relay) -> None:
    """Every Channel.Open the proxy sent has been answered by the broker."""

    def warm() -> bool:
        for conn in amqp_connections(relay):
            if any(life.state == "opening" for life in replay_channels(conn)[0].values()):
                return False
        return bool(amqp_connections(relay))

    wait_until(warm, what="the pool's idle channels to open")


def test_channel_open_is_answered_from_a_pre_opened_channel(fresh_amqplexd, relay, user):
    daemon = fresh_amqplexd(upstream=relay.url)
    first = pika.BlockingConnection(proxy_params(daemon.port, user))
    first.channel().close()
    first.close()
    wait_pool_warm(relay)

    relay.delay(0.2)  # each way: a broker round trip now costs 400 ms
    with RawClient(daemon.port) as raw:
        raw.handshake(user.name, user.password)
        mark = relay.mark()
        started = time.monotonic()
        raw.open_channel(1)
        elapsed = time.monotonic() - started
        # Under the 400 ms a broker round trip takes, with room for a loaded host.
        assert elapsed < 0.3, f"Channel.Open took {elapsed:.3f}s: it waited for the broker"

        # The upstream channel that carries it was opened, and acknowledged by
        # the broker, before the client asked.
        routing_key = f"zero-rtt-{uuid.uuid4().hex}"
        raw.publish(1, b"x", routing_key=routing_key)
        ((conn, publish),) = wait_until(
            lambda: upstream_frames(relay, publish_to(routing_key)), what="the publish upstream"
        )
        uid = publish.channel
        timeline = [f for f in conn.timeline() if f.channel == uid and f.seq < publish.seq]
        opened = [f for f in timeline if isinstance(f.method, commands.Channel.Open)]
        answered = [f for f in timeline if isinstance(f.method, commands.Channel.OpenOk)]
        assert opened and answered, "the carrying channel was never opened upstream"
        assert opened[-1].seq <= mark and answered[-1].seq <= mark


def test_a_channel_its_client_left_clean_is_closed_at_once_and_reused(
    fresh_amqplexd, relay, user, queue_name
):
    daemon = fresh_amqplexd(upstream=relay.url)
    setup = pika.BlockingConnection(proxy_params(daemon.port, user))
    setup.channel().queue_declare(queue_name)
    setup.close()
    wait_pool_warm(relay)
    relay.delay(0.2)  # each way: a broker round trip now costs 400 ms
    with RawClient(daemon.port) as a:
        a.handshake(user.name, user.password)
        a.open_channel(1)
        a.publish(1, b"from a", routing_key=queue_name)
        started = time.monotonic()
        a.method(1, commands.Channel.Close(**close_method()))
        a.expect(commands.Channel.CloseOk)
        assert time.monotonic() - started < 0.3, "the close waited for the broker"  # vs 0.4
    ((conn, first),) = wait_until(
        lambda: upstream_frames(relay, publish_to(queue_name)), what="A's publish upstream"
    )
    # The probe's round trip comes back clean: the channel is idle again.
    wait_until(
        lambda: any(
            f.channel == first.channel and isinstance(f.method, commands.Basic.RecoverOk)
            for f in conn.frames(DOWN)
        ),
        what="the probe's RecoverOk",
    )
    relay.delay(0)
    with RawClient(daemon.port) as b:
        b.handshake(user.name, user.password)
        channels = range(1, 9)  # more than the idle set: A's channel is among them
        for channel in channels:
            b.open_channel(channel)
            b.publish(channel, b"from b", routing_key=queue_name)
        wait_until(
            lambda: len(upstream_frames(relay, publish_to(queue_name))) == 1 + len(channels),
            what="B's publishes upstream",
        )
    reused = [p for _, p in upstream_frames(relay, publish_to(queue_name)) if p.seq > first.seq]
    assert first.channel in {p.channel for p in reused}
    closes = [
        f
        for f in conn.frames(UP)
        if f.channel == first.channel and isinstance(f.method, commands.Channel.Close)
    ]
    assert closes == [], "A's channel was closed upstream instead of reused"
    assert ready_count(queue_name) == 1 + len(channels)


def leave_a_recycled_channel(daemon, relay: Relay, user, requests: list) -> None:
    """A client sends `requests` on a channel (each answered) and closes it
    clean; returns once the probe has made that upstream channel idle again."""
    mark = relay.mark()
    with RawClient(daemon.port) as a:
        a.handshake(user.name, user.password)
        a.open_channel(1)
        for request in requests:
            a.method(1, request)
            a.read_method()
        a.method(1, commands.Channel.Close(**close_method()))
        a.expect(commands.Channel.CloseOk)
    wait_until(
        lambda: any(
            f.seq > mark and isinstance(f.method, commands.Basic.RecoverOk)
            for conn in amqp_connections(relay)
            for f in conn.frames(DOWN)
        ),
        what="the probe's RecoverOk",
    )


# More than the pool's idle set: the recycled channel is among them.
TAKEN = range(1, 9)


@pytest.mark.parametrize(
    "request_",
    [
        commands.Basic.Get(queue=""),
        commands.Queue.Purge(queue=""),
        commands.Queue.Delete(queue=""),
        commands.Queue.Bind(queue="", exchange="amq.fanout"),
        commands.Basic.Consume(queue=""),
    ],
    ids=lambda method: method.name,
)
def test_an_empty_queue_name_never_means_the_queue_a_previous_client_declared(
    fresh_amqplexd, relay, user, filled_queue, request_
):
    """RabbitMQ takes an empty queue name for the channel's last declared
    queue; an upstream channel remembers the previous client's."""
    queue, bodies = filled_queue
    daemon = fresh_amqplexd(upstream=relay.url)
    pika.BlockingConnection(proxy_params(daemon.port, user)).close()
    wait_pool_warm(relay)
    leave_a_recycled_channel(
        daemon, relay, user, [commands.Queue.Declare(queue=queue, passive=True)]
    )
    with RawClient(daemon.port) as b:
        b.handshake(user.name, user.password)
        for channel in TAKEN:
            b.open_channel(channel)
            b.method(channel, request_)
            got, close = b.read_method()
            assert got == channel and isinstance(close, commands.Channel.Close), close
            assert (close.reply_code, close.reply_text) == (
                404,
                "NOT_FOUND - no previously declared queue",
            )
            assert (close.class_id << 16) + close.method_id == request_.index
            b.method(channel, commands.Channel.CloseOk())
        # Its own declare is what an empty name means to it.
        b.open_channel(20)
        b.method(20, commands.Queue.Declare(queue=queue, passive=True))
        b.expect(commands.Queue.DeclareOk)
        b.method(20, commands.Basic.Get(queue="", no_ack=True))
        b.expect(commands.Basic.GetOk)
    assert ready_count(queue) == len(bodies) - 1


def test_a_channel_that_got_messages_is_not_handed_on(fresh_amqplexd, relay, user, filled_queue):
    """A no-ack Basic.Get moves the channel's delivery tags on: the next
    client's first delivery must still be tag 1, as on a new channel."""
    queue, _ = filled_queue
    daemon = fresh_amqplexd(upstream=relay.url)
    pika.BlockingConnection(proxy_params(daemon.port, user)).close()
    wait_pool_warm(relay)
    mark = relay.mark()
    with RawClient(daemon.port) as a:
        a.handshake(user.name, user.password)
        a.open_channel(1)
        for _ in range(2):
            a.method(1, commands.Basic.Get(queue=queue, no_ack=True))
            a.expect(commands.Basic.GetOk)
            a.read_frame()  # its header
            a.read_frame()  # its body
        a.method(1, commands.Channel.Close(**close_method()))
        a.expect(commands.Channel.CloseOk)
    refill = pika.BlockingConnection(broker_params())
    for _ in TAKEN:
        refill.channel().basic_publish("", queue, b"more")
    refill.close()
    with RawClient(daemon.port) as b:
        b.handshake(user.name, user.password)
        for channel in TAKEN:
            b.open_channel(channel)
            b.method(channel, commands.Basic.Get(queue=queue))
            _, get_ok = b.expect(commands.Basic.GetOk)
            assert get_ok.delivery_tag == 1, f"channel {channel}"
            b.read_frame()
            b.read_frame()
    closed = [
        f
        for conn in amqp_connections(relay)
        for f in conn.frames(UP)
        if f.seq > mark and isinstance(f.method, commands.Channel.Close)
    ]
    assert closed, "A's channel was not closed at the broker"


def test_a_client_stopped_by_what_it_held_behind_a_cancel_is_read_again_at_the_close(
    fresh_amqplexd, relay, user, canary_for
):
    """A Cancel waits for its consumer's ConsumeOk (RabbitMQ's channel
    crashes otherwise), and over a megabyte sent behind it stops the proxy
    reading the client. The broker's 404 for the consume ends the wait: the
    client's CloseOk must be read, or its channel id is never freed."""
    daemon = fresh_amqplexd(upstream=relay.url)
    canary = canary_for(daemon.port, user)
    relay.delay(0.2)  # the 404 comes after all of it has been read
    consume = commands.Basic.Consume(queue=missing_queue(), consumer_tag="c")
    with RawClient(daemon.port) as client:
        client.handshake(user.name, user.password)
        client.open_channel(1)
        client.send(
            pamqp_frame.marshal(consume, 1)
            + pamqp_frame.marshal(commands.Basic.Cancel(consumer_tag="c"), 1)
            + b"".join(message(1, "q", b"x" * 65536) for _ in range(24))
        )
        _, close = client.expect(commands.Channel.Close)
        assert close.reply_code == 404
        client.method(1, commands.Channel.CloseOk())
        client.open_channel(1)  # its CloseOk was read: the id is free
    relay.delay(0)
    canary.wait_round_trips(5)


def test_a_channel_with_state_is_closed_at_the_broker(fresh_amqplexd, relay, user):
    daemon = fresh_amqplexd(upstream=relay.url)
    pika.BlockingConnection(proxy_params(daemon.port, user)).close()
    wait_pool_warm(relay)
    relay.delay(0.2)
    with RawClient(daemon.port) as client:
        client.handshake(user.name, user.password)
        client.open_channel(1)
        client.method(1, commands.Confirm.Select())
        client.expect(commands.Confirm.SelectOk)
        started = time.monotonic()
        client.method(1, commands.Channel.Close(**close_method()))
        client.expect(commands.Channel.CloseOk)
        # The broker's own CloseOk: a full round trip through the delay.
        assert time.monotonic() - started >= 0.4


@pytest.mark.parametrize(
    "properties",
    [commands.Basic.Properties(), commands.Basic.Properties(headers={"k": "v"})],
    ids=["compiled-run", "headers-table-by-the-reference"],
)
def test_a_whole_mandatory_publish_makes_its_channel_closed_at_the_broker(
    fresh_amqplexd, relay, user, queue_name, properties
):
    """Its Basic.Return may still come (to this channel, and so to no other
    client): the channel is stateful, whichever whole-publish path took it."""
    daemon = fresh_amqplexd(upstream=relay.url)
    setup = pika.BlockingConnection(proxy_params(daemon.port, user))
    setup.channel().queue_declare(queue_name)
    setup.close()
    wait_pool_warm(relay)
    relay.delay(0.2)
    with RawClient(daemon.port) as client:
        client.handshake(user.name, user.password)
        client.open_channel(1)
        publish = commands.Basic.Publish(routing_key=queue_name, mandatory=True)
        client.send(
            pamqp_frame.marshal(publish, 1)
            + pamqp_frame.marshal(header.ContentHeader(0, 1, properties), 1)
            + body_frame(1, b"m")
        )
        started = time.monotonic()
        client.method(1, commands.Channel.Close(**close_method()))
        client.expect(commands.Channel.CloseOk)
        assert time.monotonic() - started >= 0.4, "answered at once, as if stateless"
    assert ready_count(queue_name) == 1


def take_channels_then_resume(client: RawClient, relay: Relay, channels: range) -> list:
    """With the relay stalled DOWN: `client` opens `channels`, a passive
    declare on each; once the declares are upstream (the proxy has handed it
    every channel), the relay resumes. The methods the client then gets."""
    mark = relay.mark()
    for channel in channels:
        client.method(channel, commands.Channel.Open())
        client.method(channel, commands.Exchange.Declare(exchange="amq.direct", passive=True))

    def declares_upstream() -> bool:
        declares = upstream_frames(
            relay, lambda f: f.seq > mark and isinstance(f.method, commands.Exchange.Declare)
        )
        return len(declares) == len(channels)

    wait_until(declares_upstream, what="the declares to go upstream")
    relay.resume(DOWN)
    return [client.read_method(timeout=10) for _ in range(2 * len(channels))]


@pytest.mark.parametrize("leave", ["channel-close", "connection-close", "vanish"])
def test_next_client_never_sees_a_departed_clients_404(
    fresh_amqplexd, relay, user, canary_for, leave
):
    daemon = fresh_amqplexd(upstream=relay.url)
    canary = canary_for(daemon.port, user)
    canary.wait_round_trips(2)
    wait_pool_warm(relay)

    # Nothing comes back from the broker until B has been handed its channels:
    # A's 404s are still pending upstream when B's Channel.Opens are answered.
    relay.stall(DOWN)
    exchanges = [f"amqplex-missing-{uuid.uuid4().hex[:12]}" for _ in range(3)]
    b = RawClient(daemon.port)
    try:
        for exchange in exchanges:
            with RawClient(daemon.port) as a:
                a.handshake(user.name, user.password)
                a.open_channel(1)  # answered from the idle set, no broker needed
                a.publish(1, b"to nowhere", exchange=exchange)
                if leave == "channel-close":
                    a.method(1, commands.Channel.Close(**close_method()))
                    a.expect(commands.Channel.CloseOk)
                if leave in ("channel-close", "connection-close"):
                    a.method(0, commands.Connection.Close(**close_method()))
                    a.expect(commands.Connection.CloseOk)
        b.handshake(user.name, user.password)
        # More channels than the pool keeps idle: A's, had they gone back to
        # the idle set, would be among them.
        channels = range(1, 7)
        got = take_channels_then_resume(b, relay, channels)
    finally:
        relay.resume(DOWN)
        b.close()
    closes = [(ch, m.reply_code) for ch, m in got if isinstance(m, commands.Channel.Close)]
    assert closes == [], f"B was handed a channel with A's error pending: {closes}"
    for channel in channels:
        assert [type(m) for ch, m in got if ch == channel] == [
            commands.Channel.OpenOk,
            commands.Exchange.DeclareOk,
        ]
    canary.wait_round_trips(3)

    # Each of A's publishes did fail upstream, and the proxy answered the
    # broker's Close itself.
    wait_until(lambda: not unsettled_channels(relay), what="upstream closes to complete")
    publishes = upstream_frames(
        relay,
        lambda f: isinstance(f.method, commands.Basic.Publish) and f.method.exchange in exchanges,
    )
    assert len(publishes) == len(exchanges)
    for conn, publish in publishes:
        broker_close = next(
            f
            for f in conn.frames(DOWN)
            if f.channel == publish.channel
            and f.seq > publish.seq
            and isinstance(f.method, commands.Channel.Close)
        )
        assert broker_close.method.reply_code == 404
    for conn in amqp_connections(relay):
        assert replay_channels(conn)[1] == []


def test_consumers_sharing_an_upstream_get_their_deliveries_on_their_own_channel_ids(
    fresh_amqplexd, relay, user
):
    """Deliveries are renumbered in the proxy's read buffer, a run of frames
    at a time (framing.cut_routed): each client still gets exactly its own
    messages, whole and in order, on the channel ids it opened."""
    daemon = fresh_amqplexd(upstream=relay.url)
    queues = {name: f"amqplex-routes-{name}-{uuid.uuid4().hex[:8]}" for name in "abc"}
    admin = pika.BlockingConnection(broker_params())
    try:
        channel = admin.channel()
        for queue in queues.values():
            channel.queue_declare(queue, auto_delete=True)
        with RawClient(daemon.port) as first, RawClient(daemon.port) as second:
            # (client, its channel id, the queue it consumes)
            consumers = [(first, 7, "a"), (second, 3, "b"), (second, 9, "c")]
            for client in (first, second):
                client.handshake(user.name, user.password)
            for client, cid, name in consumers:
                client.open_channel(cid)
                client.method(cid, commands.Basic.Consume(queue=queues[name], no_ack=True))
                client.expect(commands.Basic.ConsumeOk)
            assert len(amqp_connections(relay)) == 1, "the consumers do not share an upstream"

            count = 50
            for i in range(count):  # interleaved, so the broker's stream mixes channels
                for name, queue in queues.items():
                    channel.basic_publish("", queue, f"{name}-{i}".encode() * (1 + i % 7))
            for client, cids in ((first, {7}), (second, {3, 9})):
                bodies: dict[int, list[bytes]] = {cid: [] for cid in cids}
                while sum(map(len, bodies.values())) < count * len(cids):
                    frame_type, cid, value = client.read_frame()
                    assert cid in cids, f"a frame on channel {cid}, which this client never opened"
                    if frame_type == 3:
                        bodies[cid].append(bytes(value[7:-1]))
                for client_, cid, name in consumers:
                    if client_ is client:
                        expected = [f"{name}-{i}".encode() * (1 + i % 7) for i in range(count)]
                        assert bodies[cid] == expected
    finally:
        admin.close()
