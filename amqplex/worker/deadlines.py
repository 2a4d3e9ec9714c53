"""The handshake deadlines of a worker's clients, kept by one timer.

Every client gets the same client.handshake_timeout from when it arrived
(connection_made: a TLS client's own handshake is bounded by the listener),
so clients expire in the order they arrived: a dict in insertion order is
the queue, and only its oldest entry needs a timer. A timer per client (a
call_later at accept, its cancel at OpenOk) was a visible part of what a
short-lived client costs; a dict entry in and out is a fraction of it.
"""

from __future__ import annotations

import asyncio
import typing

# uvloop's timers count whole milliseconds and may fire up to one early: a
# deadline this close is due, rather than a timer re-armed for the rest.
_EARLY = 0.001


class Expiring(typing.Protocol):
    def handshake_timed_out(self) -> None: ...


class HandshakeDeadlines:
    """Clients added with when they arrived; each not discarded by
    `timeout` seconds after that is told handshake_timed_out()."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self._loop = loop
        self._timeout = timeout
        self._waiting: dict[Expiring, float] = {}  # -> when it arrived, oldest first
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, client: Expiring, arrived: float) -> None:
        self._waiting[client] = arrived
        if self._timer is None:
            self._timer = self._loop.call_at(arrived + self._timeout, self._expire)

    def discard(self, client: Expiring) -> None:
        """Done with its handshake, or gone: it never expires."""
        self._waiting.pop(client, None)

    def _expire(self) -> None:
        self._timer = None
        waiting = self._waiting
        due = self._loop.time() + _EARLY - self._timeout  # arrived by then: expired
        while waiting:
            client, arrived = next(iter(waiting.items()))
            if arrived > due:
                self._timer = self._loop.call_at(arrived + self._timeout, self._expire)
                return
            del waiting[client]
            client.handshake_timed_out()
