"""A TCP relay that holds every chunk `delay` seconds before passing it on,
in both directions: a broker that is 2 x delay of round trip away.

It runs in its own process (asyncio, uvloop when installed) so it never
shares a core's interpreter with the harness. Chunks leave in the order they
came, each at its arrival time plus the delay; a stalled destination pauses
reading on the source. The TCP handshake is local, so a connection's first
bytes are also held until one round trip after it was accepted, as if the
connect had taken that long.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
import typing

from bench.procs import ChildServer, serve_loopback

# uvloop's timers are whole milliseconds (rounded) and wake ~0.2 ms late on
# this VM: they are armed this much early, and chunks due within it go.
TIMER_SLACK = 0.0005  # s


class _Side(asyncio.Protocol):
    """One socket of a relayed connection; forwards what it reads to `peer`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float, inbound: bool) -> None:
        self.loop = loop
        self.delay = delay
        # Nothing leaves before this (time.monotonic()): the connect's round
        # trip, for the side the client dialled.
        self.connected = time.monotonic() + 2 * delay if inbound else 0.0
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.pending: collections.deque[tuple[float, bytes]] = collections.deque()
        self.timer: asyncio.TimerHandle | None = None
        self.ended = False  # this socket is done: close the peer once flushed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.delay and not self.pending and self._peer_open():
            self.peer.transport.write(data)
            return
        # time.monotonic(), not loop.time(): uvloop's clock is whole
        # milliseconds cached per loop turn, which made round trips ~12 ms.
        due = max(time.monotonic(), self.connected) + self.delay
        self.pending.append((due, data))
        if self.timer is None:
            self._arm(due)

    def _arm(self, due: float) -> None:
        wait = due - time.monotonic() - TIMER_SLACK
        self.timer = self.loop.call_later(max(0.0, wait), self.flush)

    def _peer_open(self) -> bool:
        return (
            self.peer is not None
            and self.peer.transport is not None
            and not self.peer.transport.is_closing()
        )

    def eof_received(self) -> bool:
        return False  # close this transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        if self.timer is None:
            self.flush()

    def flush(self) -> None:
        """Write every chunk that is due; re-arm for the next one."""
        self.timer = None
        peer = self.peer
        if peer is None or peer.transport is None:  # still dialling
            self.timer = self.loop.call_later(0.001, self.flush)
            return
        if peer.transport.is_closing():  # nobody left to deliver to
            self.pending.clear()
            if self.transport is not None:
                self.transport.close()
            return
        now = time.monotonic() + TIMER_SLACK
        while self.pending and self.pending[0][0] <= now:
            peer.transport.write(self.pending.popleft()[1])
        if self.pending:
            self._arm(self.pending[0][0])
        elif self.ended:
            peer.transport.close()

    def pause_writing(self) -> None:
        if self._peer_open():
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self._peer_open():
            self.peer.transport.resume_reading()


async def _dial(inbound: _Side, target: tuple[str, int]) -> None:
    loop = inbound.loop
    try:
        outward = functools.partial(_Side, loop, inbound.delay, inbound=False)
        _, outbound = await loop.create_connection(outward, *target)
    except OSError:
        inbound.transport.close()
        return
    inbound.peer, outbound.peer = outbound, inbound


def _serve(target: tuple[str, int], delay: float, report) -> None:  # noqa: ANN001
    def sides(loop: asyncio.AbstractEventLoop) -> typing.Callable[[], _Side]:
        tasks: set[asyncio.Task] = set()

        def accept() -> _Side:
            inbound = _Side(loop, delay, inbound=True)
            task = loop.create_task(_dial(inbound, target))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            return inbound

        return accept

    serve_loopback(sides, report)


class Relay(ChildServer):
    """The delaying relay in front of `target`, in a child process."""

    name = "relay"

    def __init__(self, target: tuple[str, int], delay: float) -> None:
        super().__init__(_serve, target, delay)

    @property
    def url(self) -> str:
        return f"amqp://127.0.0.1:{self.port}"
