"""The delaying relay (bench/relay.py) stands for a broker 10 ms away: every
byte arrives, in order, no sooner than its delay, and a new connection's
first bytes also wait out the connect's round trip it cannot delay; and
nor much later than that (the millisecond timers rounded every chunk up to
the next tick once, adding ~2 ms a round trip)."""

from __future__ import annotations

import os
import socket
import statistics
import time

from bench.relay import TIMER_SLACK, Relay
from tests.support.echo import TIMEOUT, Echo

DELAY = 0.02  # each way: far above the timers' millisecond grain
EARLY = 2 * TIMER_SLACK  # what the early-armed timers may take off a round trip
LATE = 0.0015  # what the timers' waking late may add to a round trip, at most


def _echo_once(client: socket.socket, data: bytes) -> float:
    began = time.monotonic()
    client.sendall(data)
    got = bytearray()
    while len(got) < len(data):
        got += client.recv(1 << 16)
    assert bytes(got) == data
    return time.monotonic() - began


def test_round_trips_take_twice_the_delay_and_the_first_one_a_connect_more():
    peer = Echo()
    try:
        with Relay(peer.addr, DELAY) as relay:
            began = time.monotonic()
            client = socket.create_connection(relay.addr, timeout=TIMEOUT)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _echo_once(client, b"header")
            first = time.monotonic() - began
            later = [_echo_once(client, os.urandom(size)) for size in (1, 1000, 100_000)]
            small = [_echo_once(client, b"x") for _ in range(7)]
            client.close()
            assert peer.ended.wait(TIMEOUT), "the relay did not pass the client's close on"
    finally:
        peer.close()
    assert first >= 4 * DELAY - EARLY, f"connect and first round trip took {first * 1000:.1f} ms"
    assert min(later + small) >= 2 * DELAY - EARLY, f"round trips of {later + small}"
    assert statistics.median(small) <= 2 * DELAY + LATE, f"round trips of {small}"
