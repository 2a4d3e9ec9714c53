"""Redial backoff: 500 ms doubling to a 30 s cap, jittered (DESIGN rule 8)."""

from __future__ import annotations

from amqplex.worker.backoff import JITTER, Backoff


def test_delays_double_from_half_a_second_to_a_thirty_second_cap():
    backoff = Backoff()
    delays = [backoff.next_delay() for _ in range(10)]
    bases = [0.5, 1, 2, 4, 8, 16, 30, 30, 30, 30]
    for delay, base in zip(delays, bases, strict=True):
        assert base * (1 - JITTER) <= delay <= min(30, base * (1 + JITTER))


def test_delays_are_jittered():
    delays = {Backoff().next_delay() for _ in range(50)}
    assert len(delays) > 40
