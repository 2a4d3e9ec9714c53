"""The worker: accepts clients on the listening socket and owns the pools."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import typing

from amqplex.config import Config
from amqplex.worker.pool import Pools
from amqplex.worker.session import ClientSession
from amqplex.worker.upstream import Upstream, fetch_server_properties

log = logging.getLogger(__name__)

# Offered to clients until an upstream tells us the broker's own values.
_DEFAULT_FRAME_MAX = 131072
_DEFAULT_CHANNEL_MAX = 2047
_FALLBACK_SERVER_PROPERTIES = {
    "product": "amqplex",
    "capabilities": {
        "publisher_confirms": True,
        "exchange_exchange_bindings": True,
        "basic.nack": True,
        "consumer_cancel_notify": True,
        "connection.blocked": True,
        "authentication_failure_close": True,
        "per_consumer_qos": True,
    },
}


class Worker:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pools = Pools(self)
        self.sessions: set[ClientSession] = set()
        self.server_properties: dict = _FALLBACK_SERVER_PROPERTIES
        self.frame_max = _DEFAULT_FRAME_MAX
        self.channel_max = min(_DEFAULT_CHANNEL_MAX, config.pool.max_channels)
        self._tasks: set[asyncio.Task] = set()
        self._server: asyncio.Server | None = None
        self._stopped: asyncio.Event | None = None

    def spawn(self, coroutine: typing.Coroutine) -> asyncio.Task:
        """Run a background task the worker keeps a reference to."""
        task = self.loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def learn(self, upstream: Upstream) -> None:
        """Offer clients what the broker offers (DESIGN rules 1 and 3)."""
        self.server_properties = upstream.server_properties
        self.frame_max = upstream.frame_max

    async def start(self, sock: socket.socket | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        try:
            self.server_properties = await fetch_server_properties(self.config.upstream)
        except (TimeoutError, OSError) as error:
            log.warning("broker not reachable at start (%s); offering defaults", error)
        listen = self.config.listen
        if sock is not None:
            self._server = await self.loop.create_server(
                lambda: ClientSession(self), sock=sock, backlog=4096
            )
        else:
            self._server = await self.loop.create_server(
                lambda: ClientSession(self),
                listen.address,
                listen.port,
                reuse_port=True,
                backlog=4096,
            )
        log.info("listening on %s:%d", listen.address, listen.port)

    async def serve(self, sock: socket.socket | None = None) -> None:
        await self.start(sock)
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.loop.add_signal_handler(signum, self._stopped.set)
        await self._stopped.wait()
        await self.stop()

    async def stop(self) -> None:
        self._server.close()
        for session in list(self.sessions):
            session.force_close(
                320, "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'"
            )
        for pool in self.pools:
            for upstream in list(pool.upstreams):
                upstream.close()
        await asyncio.sleep(0)
