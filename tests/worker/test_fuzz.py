"""Arbitrary frame sequences from one client beside a canary on the same
upstream: the canary never fails and the upstream never reconnects
(issue 5 point 7; DESIGN rule 6)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pamqp import commands, frame, header

from tests.support import broker
from tests.support.rawclient import RawClient

# Requests a client may well send, to mix with garbage: well-formed frames
# reach deeper states (open channels, half-sent content, confirm mode).
WELL_FORMED = [
    commands.Channel.Open(),
    commands.Channel.Close(reply_code=200, reply_text="", class_id=0, method_id=0),
    commands.Channel.CloseOk(),
    commands.Channel.Flow(active=True),
    commands.Channel.Flow(active=False),
    commands.Basic.Qos(prefetch_count=5),
    commands.Basic.Qos(prefetch_size=1),
    commands.Basic.Ack(delivery_tag=7),
    commands.Basic.Reject(delivery_tag=1),
    commands.Basic.Recover(requeue=True),
    commands.Basic.Cancel(consumer_tag="nope"),
    commands.Basic.Publish(exchange="", routing_key="amqplex-fuzz-nowhere"),
    commands.Basic.Publish(exchange="amqplex-fuzz-missing", routing_key="x"),
    commands.Exchange.Declare(exchange="amq.direct", passive=True),
    commands.Exchange.Declare(exchange="amqplex-fuzz", exchange_type="x-bogus"),
    commands.Queue.Declare(queue="", exclusive=True),
    commands.Tx.Select(),
    commands.Tx.Commit(),
    commands.Confirm.Select(),
    commands.Connection.Close(reply_code=200, reply_text="", class_id=0, method_id=0),
    commands.Connection.Tune(),
    commands.Basic.Deliver("c", 1, False, "", "q"),
]

channels = st.integers(0, 3)


@st.composite
def frames(draw) -> bytes:
    kind = draw(st.sampled_from(["method", "garbage-method", "header", "body", "heartbeat", "raw"]))
    channel = draw(channels)
    if kind == "method":
        return frame.marshal(draw(st.sampled_from(WELL_FORMED)), channel)
    if kind == "header":
        size = draw(st.integers(0, 40))
        return frame.marshal(header.ContentHeader(0, size, commands.Basic.Properties()), channel)
    if kind == "body":
        payload = draw(st.binary(max_size=40))
        return struct.pack(">BHI", 3, channel, len(payload)) + payload + b"\xce"
    if kind == "heartbeat":
        return struct.pack(">BHI", 8, channel, 0) + b"\xce"
    if kind == "garbage-method":
        index = draw(st.sampled_from(sorted(commands.INDEX_MAPPING)) | st.integers(0, 2**32 - 1))
        payload = struct.pack(">I", index) + draw(st.binary(max_size=24))
        return struct.pack(">BHI", 1, channel, len(payload)) + payload + b"\xce"
    return draw(st.binary(min_size=1, max_size=24))


@pytest.fixture(scope="module")
def shared(amqplexd):
    return broker.new_user()


@pytest.fixture(scope="module")
def canary(amqplexd, shared):
    from tests.conftest import Canary

    watched = Canary(amqplexd.port, shared)
    watched.wait_round_trips(3)
    yield watched
    watched.stop()


def test_arbitrary_frames_never_reach_the_canary_or_the_upstream(amqplexd, shared, canary):
    # The shared upstreams are read from the broker before the first example
    # and after the last (each rabbitmqctl call costs most of a second): a
    # replaced one would show under a new name, and the canary, closed with
    # it (DESIGN rule 8), fails its round trips at that example. A closed
    # canary stays closed, so every later example would fail as well:
    # shrinking would report a trivial sequence, not the one to blame, and
    # is left out.
    before = _upstreams(shared.name)

    @settings(
        max_examples=40,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
    )
    @given(sequence=st.lists(frames(), min_size=1, max_size=12))
    def misbehave(sequence: list[bytes]) -> None:
        with RawClient(amqplexd.port, timeout=5) as client:
            client.handshake(shared.name, shared.password)
            client.open_channel(1)
            try:
                for chunk in sequence:
                    client.send(chunk)
                # Whatever the proxy makes of it, it answers or closes in time.
                client.read_method(timeout=1)
            except (TimeoutError, ConnectionError, BrokenPipeError):
                pass
        canary.wait_round_trips(2, timeout=10)

    misbehave()
    assert _upstreams(shared.name) == before, "the shared upstream was replaced"


def _upstreams(user: str) -> list[str]:
    return sorted(row["name"] for row in broker.proxy_connections(user))
