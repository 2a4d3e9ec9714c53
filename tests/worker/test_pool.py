"""Pools (DESIGN rules 2 and 4): clients with the same credentials share a
few upstream connections, each carrying at most min(broker channel_max,
pool.max_channels) channels; credentials are the broker's to judge, a
refusal leaves nothing behind, and no password ever reaches the log."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import json
import math
import os
import re
import struct
import time
import uuid

import pika
import pytest
from pamqp import commands, encode, frame, header

from amqplex.protocol.constants import FRAME_METHOD, PROTOCOL_HEADER
from amqplex.protocol.framing import FrameReader
from tests.conftest import broker_params, proxy_params
from tests.support import broker
from tests.support.broker import BROKER_HOST, BROKER_PORT, rabbitmqctl
from tests.support.rawclient import RawClient, amqplain_response, body_frame
from tests.support.waiting import wait_until

# Pre-opened idle channels each pool keeps (PoolConfig.idle_channels).
IDLE_CHANNELS = 4
# A pool that keeps two upstreams and spreads its clients over them.
TWO_UPSTREAMS = {"AMQP_POOL_MIN_UPSTREAM_CONNECTIONS": "2"}


def message_count(queue: str) -> int:
    connection = pika.BlockingConnection(broker_params())
    try:
        return connection.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        connection.close()


def declare_queue(queue: str) -> None:
    connection = pika.BlockingConnection(broker_params())
    try:
        connection.channel().queue_declare(queue)
    finally:
        connection.close()


def wait_messages(queue: str, count: int, timeout: float = 20) -> None:
    """The broker holds exactly `count` messages in `queue` (and no more)."""
    wait_until(lambda: message_count(queue) >= count, timeout, 0.2, f"{count} messages")
    assert message_count(queue) == count


def upstream_stats(user: str) -> list[dict]:
    """The broker's own view of the connections amqplex opened for `user`,
    with their negotiated channel_max and open channel count."""
    names = {row["name"] for row in broker.proxy_connections(user)}
    out = rabbitmqctl("list_connections", "--formatter", "json", "name", "channels", "channel_max")
    return [row for row in json_rows(out) if row["name"] in names]


def json_rows(out: str) -> list[dict]:
    return json.loads(out or "[]")


def upstreams_opened(daemon, user: str) -> int:
    """How many upstreams the daemon has ever opened for `user` (its log
    says so for each), so a short-lived extra one cannot go unseen."""
    opened = re.compile(rf"upstream \d+ for <Pool user='{re.escape(user)}' .*> open ")
    return len(opened.findall(daemon.log_text()))


def daemon_pids(daemon) -> list[int]:
    """The daemon's master and its forked workers."""
    master = daemon.process.pid
    with open(f"/proc/{master}/task/{master}/children") as handle:
        return [master, *(int(pid) for pid in handle.read().split())]


def open_fds(daemon) -> int:
    """Open files across the daemon's processes: every client socket and
    upstream socket it holds."""
    return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in daemon_pids(daemon))


# -- an asyncio client on raw frames: thousands of them fit in one process --------


class AsyncClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.frame_reader = FrameReader(1 << 20)
        self.frames: collections.deque = collections.deque()

    @classmethod
    async def connect(cls, port: int, user: str, password: str, vhost: str = "/") -> AsyncClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        try:
            await client._handshake(user, password, vhost)
        except BaseException:
            client.abort()
            raise
        return client

    async def _handshake(self, user: str, password: str, vhost: str) -> None:
        self.writer.write(PROTOCOL_HEADER)
        await self.expect(commands.Connection.Start)
        self.send(
            0,
            commands.Connection.StartOk(
                client_properties={"product": "test_pool"},
                mechanism="PLAIN",
                response=f"\x00{user}\x00{password}",
                locale="en_US",
            ),
        )
        tune = await self.expect(commands.Connection.Tune)
        self.send(0, commands.Connection.TuneOk(tune.channel_max, tune.frame_max, 0))
        self.send(0, commands.Connection.Open(virtual_host=vhost))
        await self.expect(commands.Connection.OpenOk)

    def send(self, channel: int, method) -> None:
        self.writer.write(frame.marshal(method, channel))

    async def read_method(self):
        while True:
            while not self.frames:
                data = await self.reader.read(65536)
                if not data:
                    raise ConnectionError("the proxy closed the connection")
                self.frames.extend(self.frame_reader.feed(data))
            frame_type, channel, raw = self.frames.popleft()
            if frame_type == FRAME_METHOD:
                return channel, frame.unmarshal(raw)[2]

    async def expect(self, method_class):
        _, method = await self.read_method()
        if not isinstance(method, method_class):
            detail = getattr(method, "reply_text", "")
            raise AssertionError(f"expected {method_class.__name__}, got {method!r} {detail}")
        return method

    async def open_channel(self, channel: int = 1) -> None:
        self.send(channel, commands.Channel.Open())
        await self.expect(commands.Channel.OpenOk)

    def publish(self, channel: int, routing_key: str, body: bytes) -> None:
        self.writer.write(
            frame.marshal(commands.Basic.Publish(exchange="", routing_key=routing_key), channel)
            + frame.marshal(
                header.ContentHeader(0, len(body), commands.Basic.Properties()), channel
            )
            + body_frame(channel, body)
        )

    async def close(self) -> None:
        self.send(0, commands.Connection.Close(200, "bye", 0, 0))
        await self.expect(commands.Connection.CloseOk)
        self.abort()

    def abort(self) -> None:
        self.writer.transport.abort()


async def _gather_bounded(tasks: list[asyncio.Task], timeout: float) -> None:
    """Wait for every task; on the first failure or the deadline, cancel the rest."""
    try:
        done, pending = await asyncio.wait(
            tasks, timeout=timeout, return_when=asyncio.FIRST_EXCEPTION
        )
        for task in done:
            task.result()  # the first failure, if any
        assert not pending, f"{len(pending)} of {len(tasks)} clients unfinished in {timeout} s"
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def short_lived_clients(port: int, user, queue: str, count: int, timeout: float) -> None:
    """`count` clients at once: connect, open a channel, publish, close."""

    async def one(i: int) -> None:
        client = await AsyncClient.connect(port, user.name, user.password)
        try:
            await client.open_channel()
            client.publish(1, queue, str(i).encode())
            await client.close()
        finally:
            client.abort()

    await _gather_bounded([asyncio.create_task(one(i)) for i in range(count)], timeout)


async def held_clients(port: int, user, queue: str | None, count: int, while_held, timeout: float):
    """`count` clients at once, each connected with a channel open (and one
    message published to `queue`) until all are; then `while_held()` runs
    (in a thread) and they all close. Returns what while_held returned."""
    ready = 0
    all_ready = asyncio.Event()
    release = asyncio.Event()

    async def one(i: int) -> None:
        nonlocal ready
        client = await AsyncClient.connect(port, user.name, user.password)
        try:
            await client.open_channel()
            if queue is not None:
                client.publish(1, queue, str(i).encode())
            ready += 1
            if ready == count:
                all_ready.set()
            await release.wait()
            await client.close()
        finally:
            client.abort()

    tasks = [asyncio.create_task(one(i)) for i in range(count)]
    waiter = asyncio.create_task(all_ready.wait())
    try:
        done, _ = await asyncio.wait(
            [waiter, *tasks], timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        for task in done:
            task.result()
        assert waiter in done, f"only {ready} of {count} clients connected in {timeout} s"
        result = await asyncio.to_thread(while_held)
        release.set()
        await _gather_bounded(tasks, timeout)
        return result
    finally:
        waiter.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(waiter, *tasks, return_exceptions=True)


# -- multiplexing ------------------------------------------------------------------


def test_500_concurrent_short_lived_clients_share_at_most_two_upstreams(
    fresh_amqplexd, user, queue_name
):
    daemon = fresh_amqplexd()
    declare_queue(queue_name)
    started = time.monotonic()
    asyncio.run(short_lived_clients(daemon.port, user, queue_name, 500, timeout=60))
    elapsed = time.monotonic() - started
    wait_messages(queue_name, 500)
    assert 1 <= len(broker.proxy_connections(user.name)) <= 2
    assert 1 <= upstreams_opened(daemon, user.name) <= 2, "extra upstreams came and went"
    print(f"500 short-lived clients in {elapsed:.1f} s")


def sequential_publishers(port: int, user, queue: str, count: int) -> None:
    declare_queue(queue)
    for i in range(count):
        connection = pika.BlockingConnection(proxy_params(port, user))
        connection.channel().basic_publish("", queue, str(i).encode())
        connection.close()
    wait_messages(queue, count)


def test_sequential_clients_reuse_one_upstream(fresh_amqplexd, user, queue_name):
    daemon = fresh_amqplexd()
    sequential_publishers(daemon.port, user, queue_name, 20)
    assert len(broker.proxy_connections(user.name)) == 1
    assert upstreams_opened(daemon, user.name) == 1


def test_with_two_min_upstreams_sequential_clients_dial_two_and_no_more(
    fresh_amqplexd, user, queue_name
):
    daemon = fresh_amqplexd(env=TWO_UPSTREAMS)
    sequential_publishers(daemon.port, user, queue_name, 20)
    wait_until(lambda: len(broker.proxy_connections(user.name)) == 2, what="two upstreams")
    assert upstreams_opened(daemon, user.name) == 2, "extra upstreams came and went"


def test_with_two_min_upstreams_new_clients_go_to_the_one_carrying_fewest(fresh_amqplexd, user):
    """RabbitMQ reads each connection with one process, so heavy clients on
    one upstream would share what it reads. Asked to, the pool keeps two
    upstreams and puts each new client on the one carrying fewest channels."""
    daemon = fresh_amqplexd(env=TWO_UPSTREAMS)
    clients = [consumer(daemon.port, user)]
    try:
        wait_until(lambda: upstreams_opened(daemon, user.name) == 2, what="two upstreams")
        clients += [consumer(daemon.port, user) for _ in range(3)]
        assert broker.consumers_by_upstream(user.name) == [2, 2]
        assert upstreams_opened(daemon, user.name) == 2
    finally:
        for connection in clients:
            connection.close()


def test_with_two_min_upstreams_clients_spread_when_the_idle_channels_are_on_one(
    fresh_amqplexd, user
):
    """A burst while the broker refused a second connection leaves all the
    pool's idle channels on the first upstream; once the second is up, new
    clients still alternate, not follow the idle channels."""
    rabbitmqctl("set_user_limits", user.name, '{"max-connections": 1}')
    daemon = fresh_amqplexd(env=TWO_UPSTREAMS)
    burst = [pika.BlockingConnection(proxy_params(daemon.port, user)) for _ in range(10)]
    for connection in burst:
        connection.channel()
    for connection in burst:
        connection.close()
    rabbitmqctl("clear_user_limits", user.name, "max-connections")

    def second_upstream() -> bool:
        # A client's channel is what makes the pool dial toward its minimum
        # (once the backoff after the refusals has passed).
        with contextlib.closing(pika.BlockingConnection(proxy_params(daemon.port, user))) as c:
            c.channel()
        return upstreams_opened(daemon, user.name) == 2

    wait_until(second_upstream, timeout=20, what="the second upstream")
    clients = []
    try:
        clients = [consumer(daemon.port, user) for _ in range(4)]
        assert broker.consumers_by_upstream(user.name) == [2, 2]
    finally:
        for connection in clients:
            connection.close()


def test_with_two_min_upstreams_a_burst_opens_few_channels_beyond_its_clients(
    fresh_amqplexd, relay, user
):
    """With the broker's answers slow, a burst of clients finds no channel
    ready and each opens its own; the pool opens a few idle ones besides
    (idle_channels, one more per upstream), not one per client."""
    daemon = fresh_amqplexd(upstream=relay.url, env=TWO_UPSTREAMS)
    first = pika.BlockingConnection(proxy_params(daemon.port, user))
    first.channel()
    wait_until(lambda: upstreams_opened(daemon, user.name) == 2, what="two upstreams")
    first.close()
    relay.delay(0.2)
    clients = 20

    def settled() -> int:
        # Every channel asked for has reached the broker: the count stops moving.
        counts = []
        wait_until(
            lambda: (
                (counts.append(sum(r["channels"] for r in upstream_stats(user.name))))
                or counts[-2:] == [counts[-1]] * 2
            ),
            what="the broker's channel count to settle",
        )
        return counts[-1]

    channels = asyncio.run(held_clients(daemon.port, user, None, clients, settled, timeout=30))
    assert clients <= channels <= clients + IDLE_CHANNELS + 2, channels


def consumer(port: int, user) -> pika.BlockingConnection:
    """A client with one channel consuming from a queue of its own."""
    connection = pika.BlockingConnection(proxy_params(port, user))
    channel = connection.channel()
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.basic_consume(queue, lambda *args: None)
    return connection


def test_min_upstreams_stay_while_the_pool_has_clients(fresh_amqplexd, user):
    daemon = fresh_amqplexd(
        env={
            "AMQP_POOL_IDLE_TIMEOUT": "0.3",
            "AMQP_POOL_CLEANUP_INTERVAL": "0.1",
            **TWO_UPSTREAMS,
        }
    )
    held = pika.BlockingConnection(proxy_params(daemon.port, user))
    held.channel()
    wait_until(lambda: len(broker.proxy_connections(user.name)) == 2, what="two upstreams")
    # The second carries nobody, idle far past idle_timeout, and is kept: the
    # next client (or the next burst) needs it while the pool is in use.
    watched_until = time.monotonic() + 2
    while time.monotonic() < watched_until:
        assert len(broker.proxy_connections(user.name)) == 2
    assert "closing upstream" not in daemon.log_text()
    held.close()
    wait_until(lambda: not broker.proxy_connections(user.name), timeout=20, interval=0.5)


def test_a_broker_that_refuses_a_second_upstream_is_not_asked_at_every_client(
    fresh_amqplexd, user, queue_name
):
    rabbitmqctl("set_user_limits", user.name, '{"max-connections": 1}')
    daemon = fresh_amqplexd(env=TWO_UPSTREAMS)
    started = time.monotonic()
    sequential_publishers(daemon.port, user, queue_name, 30)
    elapsed = time.monotonic() - started
    assert len(broker.proxy_connections(user.name)) == 1
    failed = daemon.log_text().count(f"dial for <Pool user='{user.name}'")
    # Retries back off from 0.5 s, doubling: a handful in the run, not 30.
    assert 1 <= failed <= 2 + math.log2(1 + elapsed / 0.5), (failed, elapsed)


# -- channels per upstream -----------------------------------------------------------


def test_pool_max_channels_caps_each_upstream_and_another_is_dialled(fresh_amqplexd, user):
    max_channels, clients = 10, 25
    daemon = fresh_amqplexd(env={"AMQP_POOL_MAX_CHANNELS": str(max_channels)})

    def broker_view() -> list[dict]:
        # Channels the broker counts: every client's, plus the pool's idle ones.
        return wait_until(
            lambda: (
                (rows := upstream_stats(user.name))
                and sum(row["channels"] for row in rows) >= clients
                and rows
            ),
            what=f"{clients} channels at the broker",
        )

    rows = asyncio.run(held_clients(daemon.port, user, None, clients, broker_view, timeout=30))
    # The pool fills an upstream before dialling another, and keeps
    # IDLE_CHANNELS pre-opened channels besides the clients' own.
    assert len(rows) == math.ceil((clients + IDLE_CHANNELS) / max_channels) == 3, rows
    assert all(row["channel_max"] == max_channels for row in rows), rows
    assert all(row["channels"] <= max_channels for row in rows), rows
    assert clients <= sum(row["channels"] for row in rows) <= clients + IDLE_CHANNELS, rows
    assert upstreams_opened(daemon, user.name) == 3


def test_3000_concurrent_clients_all_succeed(fresh_amqplexd, user, queue_name):
    clients = 3000
    daemon = fresh_amqplexd()
    declare_queue(queue_name)
    started = time.monotonic()
    rows = asyncio.run(
        held_clients(
            daemon.port, user, queue_name, clients, lambda: upstream_stats(user.name), timeout=90
        )
    )
    elapsed = time.monotonic() - started
    wait_messages(queue_name, clients, timeout=30)
    # The broker's channel_max (2047) caps each upstream: 3000 clients and the
    # idle channels need exactly two.
    channel_max = min(row["channel_max"] for row in rows)
    assert len(rows) == math.ceil((clients + IDLE_CHANNELS) / channel_max) == 2, rows
    assert all(row["channels"] <= row["channel_max"] for row in rows), rows
    print(f"{clients} held clients in {elapsed:.1f} s")


def test_5000_concurrent_clients_on_one_worker_connect_publish_and_leave(
    fresh_amqplexd, user, queue_name
):
    clients = 5000
    daemon = fresh_amqplexd("-w", "1")
    declare_queue(queue_name)
    rows = asyncio.run(
        held_clients(
            daemon.port, user, queue_name, clients, lambda: upstream_stats(user.name), timeout=120
        )
    )
    wait_messages(queue_name, clients, timeout=60)
    assert len(rows) == math.ceil((clients + IDLE_CHANNELS) / 2047) == 3, rows
    assert "ERROR" not in daemon.log_text()


# -- authentication ---------------------------------------------------------------------


@pytest.fixture
def forbidden_vhost(user):
    """A vhost that exists but `user` has no permissions on."""
    name = f"amqplex-test-{uuid.uuid4().hex[:10]}"
    rabbitmqctl("add_vhost", name)
    yield name
    rabbitmqctl("delete_vhost", name)


def broker_refusal(user: str, password: str, vhost: str = "/") -> commands.Connection.Close:
    """What RabbitMQ itself answers these credentials with (the client
    advertises authentication_failure_close so the broker says why)."""
    with RawClient(BROKER_PORT, host=BROKER_HOST) as client:
        client.send(PROTOCOL_HEADER)
        client.expect(commands.Connection.Start)
        client.method(0, _start_ok("PLAIN", f"\x00{user}\x00{password}"))
        channel, method = client.read_method()
        if isinstance(method, commands.Connection.Tune):
            client.method(0, commands.Connection.TuneOk(method.channel_max, method.frame_max, 0))
            client.method(0, commands.Connection.Open(virtual_host=vhost))
            channel, method = client.read_method()
        assert isinstance(method, commands.Connection.Close), method
        return method


def _start_ok(mechanism: str, response: str) -> commands.Connection.StartOk:
    return commands.Connection.StartOk(
        client_properties={"capabilities": {"authentication_failure_close": True}},
        mechanism=mechanism,
        response=response,
        locale="en_US",
    )


def proxy_refusal(port: int, user: str, password: str, vhost: str = "/", **kwargs):
    """The proxy's answer to Connection.Open with these credentials: it must
    be Connection.Close, and no OpenOk before it."""
    with RawClient(port) as client:
        got = client.handshake(user, password, vhost, **kwargs)
        assert got is not None, "socket closed without Connection.Close"
        channel, method = got
        assert isinstance(method, commands.Connection.Close), f"not refused: {method!r}"
        assert channel == 0
        client.method(0, commands.Connection.CloseOk())
        assert client.read_eof(5), "socket left open after the refusal"
        return method


def test_plain_login_is_accepted(amqplexd, user):
    connection = pika.BlockingConnection(proxy_params(amqplexd.port, user))
    try:
        channel = connection.channel()
        queue = channel.queue_declare("", exclusive=True).method.queue
        channel.basic_publish("", queue, b"plain")
        assert channel.basic_get(queue, auto_ack=True)[2] == b"plain"
    finally:
        connection.close()
    assert len(broker.proxy_connections(user.name)) == 1


def test_amqplain_login_is_accepted(amqplexd, user):
    # pamqp encodes the response as text; the table is ASCII for ASCII credentials.
    response = amqplain_response(user.name, user.password).decode("latin-1")
    with RawClient(amqplexd.port) as client:
        channel, method = client.handshake(mechanism="AMQPLAIN", response=response)
        assert isinstance(method, commands.Connection.OpenOk), method
        client.open_channel(1)
        client.method(1, commands.Queue.Declare(queue="", exclusive=True))
        _, declared = client.expect(commands.Queue.DeclareOk)
        assert declared.queue.startswith("amq.gen-")
        # The broker saw these credentials: the upstream is this user's.
        assert len(broker.proxy_connections(user.name)) == 1


def test_wrong_password_is_refused_403_as_the_broker_refuses_it(amqplexd, user):
    refusal = proxy_refusal(amqplexd.port, user.name, "wrong-" + user.password)
    direct = broker_refusal(user.name, "wrong-" + user.password)
    assert refusal.reply_code == direct.reply_code == 403
    assert refusal.reply_text == direct.reply_text
    assert refusal.reply_text.startswith("ACCESS_REFUSED - ")
    assert broker.proxy_connections(user.name) == []


def test_amqplain_wrong_password_is_refused_403(amqplexd, user):
    response = amqplain_response(user.name, "wrong").decode("latin-1")
    refusal = proxy_refusal(amqplexd.port, "", "", mechanism="AMQPLAIN", response=response)
    assert refusal.reply_code == 403
    assert refusal.reply_text.startswith("ACCESS_REFUSED - ")


def test_wrong_password_is_refused_while_a_pool_for_the_user_is_open(amqplexd, user):
    good = pika.BlockingConnection(proxy_params(amqplexd.port, user))
    try:
        channel = good.channel()
        queue = channel.queue_declare("", exclusive=True).method.queue
        assert len(broker.proxy_connections(user.name)) == 1
        for wrong in ("wrong", user.password + "x", user.password[:-1], ""):
            refusal = proxy_refusal(amqplexd.port, user.name, wrong)
            assert refusal.reply_code == 403, wrong
            assert refusal.reply_text.startswith("ACCESS_REFUSED - "), wrong
        # The pooled upstream and its client are untouched.
        channel.basic_publish("", queue, b"still here")
        assert channel.basic_get(queue, auto_ack=True)[2] == b"still here"
        assert len(broker.proxy_connections(user.name)) == 1
    finally:
        good.close()


def test_vhost_not_granted_is_refused_530_as_the_broker_refuses_it(amqplexd, user, forbidden_vhost):
    good = pika.BlockingConnection(proxy_params(amqplexd.port, user))
    try:
        refusal = proxy_refusal(amqplexd.port, user.name, user.password, forbidden_vhost)
        direct = broker_refusal(user.name, user.password, forbidden_vhost)
        assert refusal.reply_code == direct.reply_code == 530
        assert refusal.reply_text == direct.reply_text
        assert refusal.reply_text == (
            f"NOT_ALLOWED - access to vhost '{forbidden_vhost}' refused for user '{user.name}'"
        )
        assert good.channel().is_open
    finally:
        good.close()
    assert {row["vhost"] for row in broker.proxy_connections(user.name)} == {"/"}


def test_an_empty_vhost_is_the_brokers_to_refuse(amqplexd, user):
    """Not taken for "/": RabbitMQ has no vhost "" and says so, word for word."""
    refusal = proxy_refusal(amqplexd.port, user.name, user.password, "")
    direct = broker_refusal(user.name, user.password, "")
    assert refusal.reply_code == direct.reply_code == 530
    assert refusal.reply_text == direct.reply_text


def test_refusals_leave_no_upstream_behind(fresh_amqplexd, user, forbidden_vhost):
    daemon = fresh_amqplexd()
    stranger = broker.new_user()
    good = pika.BlockingConnection(proxy_params(daemon.port, user))
    try:
        baseline_fds = open_fds(daemon)
        attempts = [(user.name, f"wrong-{i}", "/", 403) for i in range(50)]
        attempts += [(stranger.name, f"wrong-{i}", "/", 403) for i in range(50)]
        attempts += [(user.name, user.password, forbidden_vhost, 530)] * 50

        def refused(attempt) -> tuple[int, int]:
            name, password, vhost, expected = attempt
            return proxy_refusal(daemon.port, name, password, vhost).reply_code, expected

        # Eight at a time: refusals of one triple also overlap its dial.
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            for code, expected in pool.map(refused, attempts, timeout=60):
                assert code == expected
        # No socket of a refused client or a refused upstream stays open...
        wait_until(
            lambda: open_fds(daemon) <= baseline_fds,
            what=f"daemon back to {baseline_fds} open files",
        )
        # ...and the broker sees only the one good upstream.
        names = [f"'amqplex pid {pid}'" for pid in daemon_pids(daemon)]
        daemon_rows = [
            row
            for row in broker.connections()
            if any(name in str(row["client_properties"]) for name in names)
        ]
        assert [(row["user"], row["vhost"]) for row in daemon_rows] == [(user.name, "/")]
        assert broker.proxy_connections(stranger.name) == []
        assert upstreams_opened(daemon, user.name) == 1
        assert upstreams_opened(daemon, stranger.name) == 0
        assert good.channel().is_open
    finally:
        good.close()
    # A refusal is not remembered either: the right password works at once.
    connection = pika.BlockingConnection(proxy_params(daemon.port, stranger))
    assert connection.channel().is_open
    connection.close()


def test_pika_sees_a_wrong_password_as_against_the_broker(amqplexd, user):
    """Against RabbitMQ, pika raises ProbableAuthenticationError (the broker
    closes before Connection.Tune); through the proxy it must too."""

    def attempt(params: pika.ConnectionParameters):
        with pytest.raises(pika.exceptions.AMQPConnectionError) as raised:
            pika.BlockingConnection(params)
        return raised.value

    wrong = pika.PlainCredentials(user.name, "wrong")
    direct = attempt(pika.ConnectionParameters(BROKER_HOST, BROKER_PORT, credentials=wrong))
    proxied = attempt(pika.ConnectionParameters("127.0.0.1", amqplexd.port, credentials=wrong))
    assert "(403)" in str(proxied) and "ACCESS_REFUSED" in str(proxied), proxied
    assert isinstance(direct, pika.exceptions.ProbableAuthenticationError), direct
    assert type(proxied) is type(direct), f"proxy: {proxied!r}; broker: {direct!r}"


def test_pika_sees_a_forbidden_vhost_as_against_the_broker(amqplexd, user, forbidden_vhost):
    credentials = pika.PlainCredentials(user.name, user.password)
    with pytest.raises(pika.exceptions.ProbableAccessDeniedError) as raised:
        pika.BlockingConnection(
            pika.ConnectionParameters(
                "127.0.0.1", amqplexd.port, forbidden_vhost, credentials=credentials
            )
        )
    assert "(530)" in str(raised.value) and "NOT_ALLOWED" in str(raised.value)


# -- no password in the log ---------------------------------------------------------------


def _raw_start_ok(mechanism: bytes, response: bytes) -> bytes:
    """A StartOk frame with an arbitrary (even non-UTF-8) response."""
    payload = (
        struct.pack(">HH", 10, 11)
        + encode.field_table({"product": "test_pool"})
        + struct.pack(">B", len(mechanism))
        + mechanism
        + struct.pack(">I", len(response))
        + response
        + b"\x05en_US"
    )
    return struct.pack(">BHI", 1, 0, len(payload)) + payload + b"\xce"


def _amqplain_table(login: bytes, password: bytes) -> bytes:
    """AMQPLAIN's response with arbitrary bytes (pamqp encodes only text)."""

    def field(name: bytes, value: bytes) -> bytes:
        return bytes([len(name)]) + name + b"S" + struct.pack(">I", len(value)) + value

    return field(b"LOGIN", login) + field(b"PASSWORD", password)


def _raw_login(port: int, start_ok: bytes, vhost: str = "/"):
    """Send `start_ok` (raw bytes) and, if the proxy tunes, Connection.Open:
    the method that ends the handshake (OpenOk or Close), None on EOF."""
    with RawClient(port) as client:
        client.send(PROTOCOL_HEADER)
        client.expect(commands.Connection.Start)
        client.send(start_ok)
        got = client.read_method(10)
        if got is not None and isinstance(got[1], commands.Connection.Tune):
            tune = got[1]
            client.method(0, commands.Connection.TuneOk(tune.channel_max, tune.frame_max, 0))
            client.method(0, commands.Connection.Open(virtual_host=vhost))
            got = client.read_method(10)
        return None if got is None else got[1]


def _send_start_ok(port: int, start_ok: bytes) -> commands.Connection.Close | None:
    """Send a StartOk; the Connection.Close that answers the login, if any."""
    method = _raw_login(port, start_ok)
    return method if isinstance(method, commands.Connection.Close) else None


def test_non_utf8_credentials_are_refused_403(amqplexd, user):
    response = b"\x00" + user.name.encode() + b"\x00\xff\xfe" + user.password.encode()
    refusal = _send_start_ok(amqplexd.port, _raw_start_ok(b"PLAIN", response))
    assert refusal is not None, "no Connection.Close for a non-UTF-8 password"
    assert refusal.reply_code == 403
    table = _amqplain_table(user.name.encode(), b"\xff\xfe")
    refusal = _send_start_ok(amqplexd.port, _raw_start_ok(b"AMQPLAIN", table))
    assert refusal is not None and refusal.reply_code == 403


def test_non_ascii_password_logs_in_with_plain_and_amqplain(amqplexd, user):
    password = f"pässwörd-€-密码-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("change_password", user.name, password)
    connection = pika.BlockingConnection(
        pika.ConnectionParameters(
            "127.0.0.1", amqplexd.port, credentials=pika.PlainCredentials(user.name, password)
        )
    )
    assert connection.channel().is_open
    connection.close()
    table = encode.field_table({"LOGIN": user.name, "PASSWORD": password})[4:]
    got = _raw_login(amqplexd.port, _raw_start_ok(b"AMQPLAIN", table))
    assert isinstance(got, commands.Connection.OpenOk), got
    plain = f"\x00{user.name}\x00{password}".encode()
    got = _raw_login(amqplexd.port, _raw_start_ok(b"PLAIN", plain))
    assert isinstance(got, commands.Connection.OpenOk), got


def test_no_client_can_make_the_proxy_log_a_password(fresh_amqplexd, user, forbidden_vhost):
    daemon = fresh_amqplexd()
    secret = f"Sekr3t-{uuid.uuid4().hex}"
    wrong = f"Wr0ng-{uuid.uuid4().hex}"
    rabbitmqctl("change_password", user.name, secret)
    plain = f"\x00{user.name}\x00{secret}"
    amqplain = amqplain_response(user.name, secret)
    # Good logins, PLAIN and AMQPLAIN.
    connection = pika.BlockingConnection(
        pika.ConnectionParameters(
            "127.0.0.1", daemon.port, credentials=pika.PlainCredentials(user.name, secret)
        )
    )
    connection.close()
    with RawClient(daemon.port) as client:
        got = client.handshake(mechanism="AMQPLAIN", response=amqplain.decode("latin-1"))
        assert isinstance(got[1], commands.Connection.OpenOk)
    # Refused logins: wrong password (with and without a pool), forbidden vhost.
    for password in (wrong, secret + "x"):
        assert proxy_refusal(daemon.port, user.name, password).reply_code == 403
    assert proxy_refusal(daemon.port, f"nobody-{uuid.uuid4().hex}", secret).reply_code == 403
    assert proxy_refusal(daemon.port, user.name, secret, forbidden_vhost).reply_code == 530
    # Responses the proxy itself must reject, each carrying the secret.
    for mechanism, response in (
        (b"PLAIN", f"{secret}\x00{user.name}\x00{secret}\x00{secret}".encode()),
        (b"PLAIN", secret.encode()),
        (b"PLAIN", f"\x00{user.name}\x00\xff{secret}".encode("latin-1")),
        (b"AMQPLAIN", encode.field_table({"PASSWORD": secret})[4:]),
        (b"AMQPLAIN", b"\x08PASSWORDS" + struct.pack(">I", 999) + secret.encode()),
        (b"AMQPLAIN", secret.encode()),
        (b"EXTERNAL", plain.encode()),
    ):
        refusal = _send_start_ok(daemon.port, _raw_start_ok(mechanism, response))
        assert refusal is not None and refusal.reply_code == 403, (mechanism, response)
    # Truncated StartOk frames: every place the decoder can fail.
    whole = _raw_start_ok(b"PLAIN", plain.encode())
    payload = whole[7:-1]
    for cut in range(4, len(payload), 3):
        part = payload[:cut]
        _send_start_ok(daemon.port, struct.pack(">BHI", 1, 0, len(part)) + part + b"\xce")

    # Workers write INFO lines in batches, at least once a second.
    def logged() -> str:
        text = daemon.log_text()
        return text if "unsupported authentication" in text else ""

    log = wait_until(logged, what="the refusals to be logged")
    assert secret not in log and wrong not in log
    assert secret[:16] not in log
