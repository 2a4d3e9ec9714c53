"""Exponential backoff with jitter for redialling a broker that is away:
500 ms doubling to 30 s (DESIGN rule 8), each delay jittered by +-20% so
that many pools and workers do not redial in lockstep, at the cap too."""

from __future__ import annotations

import random

FIRST_DELAY = 0.5
MAX_DELAY = 30.0
JITTER = 0.2
# Doublings past the cap change nothing, and 2.0**1024 is no float: an
# outage of hours must not stop the redials.
_DOUBLINGS = 16


class Backoff:
    __slots__ = ("attempts",)

    def __init__(self) -> None:
        self.attempts = 0

    def next_delay(self) -> float:
        base = min(MAX_DELAY, FIRST_DELAY * 2.0 ** min(self.attempts, _DOUBLINGS))
        self.attempts += 1
        return base * random.uniform(1 - JITTER, 1 + JITTER)
