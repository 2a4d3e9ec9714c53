"""Fixtures: the real broker, the real daemon, users of their own, a canary."""

from __future__ import annotations

import threading
import time
import uuid

import pika
import pytest

from tests.support import broker
from tests.support.certs import Certificates
from tests.support.daemon import Amqplexd


@pytest.fixture(scope="session")
def amqplexd():
    """One daemon shared by the tests that only need a proxy to talk to."""
    daemon = Amqplexd("-w", "1")
    yield daemon
    daemon.stop()


@pytest.fixture
def fresh_amqplexd():
    """A daemon of the test's own, for tests that count its connections or read its log."""
    daemons: list[Amqplexd] = []

    def start(*args: str, **kwargs) -> Amqplexd:
        daemon = Amqplexd("-w", "1", *args, **kwargs)
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:
        daemon.stop()


@pytest.fixture(scope="session", autouse=True)
def broker_users():
    """The users the suite made (broker.new_user) go when it ends."""
    yield
    broker.delete_users()


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Certificates:
    return Certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def user():
    """A broker user of the test's own: its pools on a shared daemon are its own."""
    return broker.new_user()


@pytest.fixture
def queue_name():
    name = f"amqplex-test-{uuid.uuid4().hex[:12]}"
    yield name
    try:
        connection = pika.BlockingConnection(broker_params())
        connection.channel().queue_delete(name)
        connection.close()
    except pika.exceptions.AMQPError:
        pass


def broker_params(**kwargs) -> pika.ConnectionParameters:
    return pika.ConnectionParameters(
        host=broker.BROKER_HOST,
        port=broker.BROKER_PORT,
        credentials=pika.PlainCredentials(broker.BROKER_USER, broker.BROKER_PASSWORD),
        **kwargs,
    )


def proxy_params(port: int, user=None, **kwargs) -> pika.ConnectionParameters:
    if user is None:
        credentials = pika.PlainCredentials(broker.BROKER_USER, broker.BROKER_PASSWORD)
    else:
        credentials = pika.PlainCredentials(user.name, user.password)
    return pika.ConnectionParameters(host="127.0.0.1", port=port, credentials=credentials, **kwargs)


class Canary:
    """A well-behaved client on the same upstream as a misbehaving one. It
    publishes and reads back its own messages in a thread until stopped;
    any failure is kept for the test to assert on."""

    def __init__(self, port: int, user) -> None:
        self.params = proxy_params(port, user)
        self.queue = f"canary-{uuid.uuid4().hex[:10]}"
        self.round_trips = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(20), f"canary did not start: {self.error!r}"

    def _run(self) -> None:
        try:
            connection = pika.BlockingConnection(self.params)
            channel = connection.channel()
            channel.queue_declare(self.queue, exclusive=True)
            channel.confirm_delivery()
            self._ready.set()
            while not self._stop.is_set():
                body = uuid.uuid4().bytes
                channel.basic_publish("", self.queue, body)
                method, _, got = channel.basic_get(self.queue, auto_ack=True)
                assert method is not None and got == body, "canary lost its message"
                self.round_trips += 1
                connection.sleep(0.01)
            connection.close()
        except BaseException as error:  # kept for the test to report
            self.error = error
            self._ready.set()

    def wait_round_trips(self, count: int, timeout: float = 10) -> None:
        target = self.round_trips + count
        deadline = time.monotonic() + timeout
        while self.round_trips < target and self.error is None:
            assert time.monotonic() < deadline, "canary stalled"
            time.sleep(0.01)
        assert self.error is None, f"canary failed: {self.error!r}"

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(20)
        assert self.error is None, f"canary failed: {self.error!r}"


@pytest.fixture
def canary_for():
    """canary_for(port, user) starts a Canary; the test ends by checking it survived."""
    canaries: list[Canary] = []

    def start(port: int, user) -> Canary:
        canary = Canary(port, user)
        canaries.append(canary)
        return canary

    yield start
    for canary in canaries:
        canary.stop()


@pytest.fixture
def relay():
    """A TCP relay to the broker the test owns (tests/support/relay.py): give it
    to a daemon as its upstream, read what travelled, inject faults."""
    from tests.support.relay import Relay

    started = Relay().start()
    yield started
    started.stop()
