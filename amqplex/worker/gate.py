"""Least connections across workers: a worker that holds clearly more
clients than the lightest worker still accepting stops accepting until it
is the lightest again.

All workers accept from one listening socket, and the kernel wakes them all
for a new connection; whoever calls accept first takes it, and libuv then
takes whatever else is queued. That spreads CPU well under churn (a busy
worker is late to accept) but not a few long-lived clients arriving one by
one, a millisecond apart: the worker that took the first is awake and tends
to take the next too, so three heavy publishers often shared one worker,
its upstream and its core while the other worker idled.

"Clearly more" is by more than a quarter of all the clients of the workers
accepting (STOP_SHARE): one client against none already is, so a handful of
long-lived clients spread evenly; a few clients either way under churn is
not, so churn keeps the kernel's spreading and rarely pays for a stop.

Stopping closes only this worker's libuv server, on its own descriptor of
the listener: the queue stays, the other workers keep taking from it. (What
libuv accepted in one go, before uvloop calls connection_made for any of
it, stays with this worker: the gate sees clients only as they arrive.) A
stopped worker is off the board (board.py), so the others never wait for
it, and it looks again every CHECK_INTERVAL: it resumes once it is the
lightest, or as soon as one of its own clients leaving makes it so. Clients
queued at every look for STUCK_AFTER mean the lighter workers are not taking
them (stuck, or gone between two reaps): the stopped worker then resumes
anyway, so nobody waits long on a worker that does not accept.
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
import typing

from amqplex.board import Seat

log = logging.getLogger(__name__)

STOP_SHARE = 4  # stop when ahead of the lightest by more than 1/4 of all clients
CHECK_INTERVAL = 0.002
STUCK_AFTER = 0.05
# After a failed opening (out of descriptors, say), before the next try.
RETRY_AFTER = 0.5

Listen = typing.Callable[[socket.socket], typing.Awaitable[asyncio.AbstractServer]]


class Gate:
    """`clients()` is how many clients the worker holds; it calls arrived()
    after one more began and left() after one ended."""

    def __init__(
        self,
        listener: socket.socket,
        seat: Seat | None,
        listen: Listen,
        clients: typing.Callable[[], int],
    ) -> None:
        self._listener = listener
        self._seat = seat
        self._listen = listen
        self._clients = clients
        self._loop = asyncio.get_running_loop()
        self._server: asyncio.AbstractServer | None = None
        self._stopped = False  # by the rule, until it opens again
        self._check: asyncio.TimerHandle | None = None  # set while stopped
        self._opening: asyncio.Task | None = None
        self._queued_since: float | None = None  # at every look since then
        self._closed = False
        self._queue_poll = select.poll()  # readable: a client is queued
        self._queue_poll.register(listener, select.POLLIN)

    @property
    def accepting(self) -> bool:
        return self._server is not None

    async def open(self) -> bool:
        """Accept clients (again); True once accepting. A failure is logged
        and tried again after RETRY_AFTER."""
        # The server closes the socket it is given when it closes: each
        # opening gets its own descriptor of the shared listener.
        sock = None
        try:
            sock = self._listener.dup()
            server = await self._listen(sock)
        except Exception:
            if sock is not None:
                sock.close()
            if self._closed:
                return False  # the listener went with the drain meanwhile
            log.exception("could not accept clients; trying again in %.1f s", RETRY_AFTER)
            self._check = self._loop.call_later(RETRY_AFTER, self._resume)
            return False
        finally:
            self._opening = None
        if self._closed:
            server.close()
            return False
        self._server = server
        self._stopped = False
        if self._seat is not None:
            self._seat.post(self._clients())
        return True

    def arrived(self) -> None:
        seat = self._seat
        if seat is None or self._server is None:
            return  # no board, or libuv's last batch before a stop
        clients = self._clients()
        seat.post(clients)
        counts = seat.counts()
        if (clients - min(counts)) * STOP_SHARE > sum(counts):
            self._stop()

    def left(self) -> None:
        seat = self._seat
        if seat is None:
            return
        if self._server is not None:
            seat.post(self._clients())
        elif self._stopped and self._opening is None and self._lightest():
            self._resume()

    def close(self) -> None:
        """Stop accepting for good (drain), and let the listener go: with every
        process's descriptor of it closed, new clients are refused at once
        rather than queued where nobody will take them."""
        self._closed = True
        self._stopped = False
        if self._check is not None:
            self._check.cancel()
            self._check = None
        if self._server is not None:
            self._server.close()
            self._server = None
        self._listener.close()
        if self._seat is not None:
            self._seat.leave()

    def _lightest(self) -> bool:
        """No accepting worker holds fewer clients (or none accepts)."""
        clients = self._clients()
        return clients <= min(self._seat.counts(), default=clients)

    def _stop(self) -> None:
        self._server.close()
        self._server = None
        self._stopped = True
        self._seat.leave()
        self._queued_since = None
        self._check = self._loop.call_later(CHECK_INTERVAL, self._look)

    def _look(self) -> None:
        now = self._loop.time()
        if not self._queue_poll.poll(0):
            self._queued_since = None
        elif self._queued_since is None:
            self._queued_since = now
        stuck = self._queued_since is not None and now - self._queued_since >= STUCK_AFTER
        if stuck or self._lightest():
            self._resume()
        else:
            self._check = self._loop.call_later(CHECK_INTERVAL, self._look)

    def _resume(self) -> None:
        if self._check is not None:
            self._check.cancel()
            self._check = None
        if self._opening is None and not self._closed:
            self._opening = self._loop.create_task(self.open())
