"""Redial backoff: 500 ms doubling to a 30 s cap, jittered (DESIGN rule 8)."""

from __future__ import annotations

from amqplex.worker.backoff import JITTER, Backoff


def test_delays_double_from_half_a_second_to_a_thirty_second_cap():
    backoff = Backoff()
    delays = [backoff.next_delay() for _ in range(10)]
    bases = [0.5, 1, 2, 4, 8, 16, 30, 30, 30, 30]
    for delay, base in zip(delays, bases, strict=True):
        assert base * (1 - JITTER) <= delay <= base * (1 + JITTER)


def test_delays_are_jittered():
    delays = {Backoff().next_delay() for _ in range(50)}
    assert len(delays) > 40


def test_delays_at_the_cap_stay_jittered_however_long_the_outage():
    backoff = Backoff()
    for _ in range(2000):  # hours of redials at the cap
        backoff.next_delay()
    delays = [backoff.next_delay() for _ in range(50)]
    assert all(30 * (1 - JITTER) <= delay <= 30 * (1 + JITTER) for delay in delays)
    assert len(set(delays)) > 40  # not bunched on the cap itself
