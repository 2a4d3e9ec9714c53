"""Exponential backoff with jitter for redialling a broker that is away:
500 ms doubling to 30 s (DESIGN rule 8), each delay jittered by +-20% so
that many pools and workers do not redial in lockstep."""

from __future__ import annotations

import random

FIRST_DELAY = 0.5
MAX_DELAY = 30.0
JITTER = 0.2


class Backoff:
    __slots__ = ("attempts", "_first", "_cap")

    def __init__(self, first: float = FIRST_DELAY, cap: float = MAX_DELAY) -> None:
        self.attempts = 0
        self._first = first
        self._cap = cap

    def next_delay(self) -> float:
        base = min(self._cap, self._first * 2**self.attempts)
        self.attempts += 1
        return min(self._cap, base * random.uniform(1 - JITTER, 1 + JITTER))
