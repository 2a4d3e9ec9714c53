"""The worker: accepts clients on the listening socket and owns the pools."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import typing

from pamqp import commands
from setproctitle import setproctitle

from amqplex import tls
from amqplex.board import Seat
from amqplex.config import Config
from amqplex.master.listener import BACKLOG
from amqplex.protocol import methods
from amqplex.protocol.auth import MECHANISMS
from amqplex.protocol.constants import ReplyCode
from amqplex.worker import memory
from amqplex.worker.deadlines import HandshakeDeadlines
from amqplex.worker.exporter import Exporter
from amqplex.worker.gate import Gate
from amqplex.worker.pool import Pools
from amqplex.worker.rules import EXCHANGE_TYPES
from amqplex.worker.session import ClientSession
from amqplex.worker.stats import Stats
from amqplex.worker.upstream import Upstream, fetch_server_properties

log = logging.getLogger(__name__)

# Offered to clients until an upstream tells us the broker's own values.
_DEFAULT_FRAME_MAX = 131072
_DEFAULT_CHANNEL_MAX = 2047
# Distinct handshake frames kept decoded: a few per client library and login.
HANDSHAKE_CACHE_SIZE = 256
SHUTDOWN_TEXT = "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'"
# How often a worker checks that its master is still there (gunicorn's
# workers do the same): orphaned, it drains and exits instead of serving on
# with nobody to restart, reload or stop it.
MASTER_CHECK_INTERVAL = 1.0
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
    def __init__(self, config: Config, slot: int = 1) -> None:
        self.config = config
        self.slot = slot
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pools = Pools(self)
        self.stats = Stats()
        # What clients may declare: the broker's own types and its plugins'.
        self.exchange_types = EXCHANGE_TYPES | frozenset(config.upstream.exchange_types)
        # SSL contexts for the listener and for amqps:// upstreams (amqplex/tls.py).
        self.tls = tls.install(config)
        self.sessions: set[ClientSession] = set()
        # How many of them are past their handshake: a count kept as they
        # come and go, since pool.max_client_connections is checked at every
        # client's Open, where a walk over thousands of sessions would cost
        # more than the Open itself.
        self.running = 0
        self.server_properties: dict = _FALLBACK_SERVER_PROPERTIES
        self.frame_max = _DEFAULT_FRAME_MAX
        self.channel_max = min(_DEFAULT_CHANNEL_MAX, config.pool.max_channels)
        self._encode_handshake()
        # Clients' channel-0 methods (StartOk, TuneOk, Open, Close) and
        # Channel.Close, decoded once per distinct frame: churning clients
        # send the same ones.
        self.connection_methods = methods.DecodeCache(HANDSHAKE_CACHE_SIZE)
        self._tasks: set[asyncio.Task] = set()
        self.gate: Gate | None = None
        self.handshakes: HandshakeDeadlines | None = None
        self.exporter: Exporter | None = None

    def spawn(self, coroutine: typing.Coroutine) -> asyncio.Task:
        """Run a background task the worker keeps a reference to."""
        task = self.loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def session_began(self, session: ClientSession) -> None:
        self.sessions.add(session)
        self.gate.arrived()

    def session_ended(self, session: ClientSession) -> None:
        self.sessions.discard(session)
        self.gate.left()

    def running_sessions(self) -> int:
        """Client sessions past their handshake and not yet ended."""
        return self.running

    def learn(self, upstream: Upstream) -> None:
        """Offer clients what the broker offers (DESIGN rules 1 and 3)."""
        if (upstream.server_properties, upstream.frame_max) != (
            self.server_properties,
            self.frame_max,
        ):
            self.server_properties = upstream.server_properties
            self.frame_max = upstream.frame_max
            self._encode_handshake()

    def _encode_handshake(self) -> None:
        """Connection.Start and Tune as every client gets them, encoded once."""
        self.start_frame = methods.encode(
            0,
            commands.Connection.Start(
                server_properties=self.server_properties, mechanisms=MECHANISMS, locales="en_US"
            ),
        )
        self.tune_frame = methods.encode(
            0,
            commands.Connection.Tune(
                channel_max=self.channel_max,
                frame_max=self.frame_max,
                heartbeat=self.config.client.heartbeat,
            ),
        )

    async def start(self, listener: socket.socket, seat: Seat | None) -> None:
        self.loop = asyncio.get_running_loop()
        self.handshakes = HandshakeDeadlines(self.loop, self.config.client.handshake_timeout)
        try:
            self.server_properties = await fetch_server_properties(self.config.upstream)
            self._encode_handshake()
        except (TimeoutError, OSError) as error:
            log.warning("broker not reachable at start (%s); offering defaults", error)
        listen = self.config.listen
        self.gate = Gate(listener, seat, self._serve_on, lambda: len(self.sessions))
        if await self.gate.open():
            log.info(
                "listening on %s:%d (event loop: %s)",
                listen.address,
                listen.port,
                type(self.loop).__module__.split(".")[0],
            )
        self.spawn(self._sweep_forever())
        self.exporter = Exporter(self)
        self.spawn(self.exporter.run())
        self.spawn(memory.release_forever())

    def _serve_on(self, sock: socket.socket) -> typing.Awaitable[asyncio.AbstractServer]:
        return self.loop.create_server(
            lambda: ClientSession(self), sock=sock, backlog=BACKLOG, **self.tls.listener_args()
        )

    async def _sweep_forever(self) -> None:
        """Close idle upstreams and drop unused pools (pool.cleanup_interval)."""
        while True:
            await asyncio.sleep(self.config.pool.cleanup_interval)
            self.pools.sweep(self.loop.time())

    async def serve(self, listener: socket.socket, seat: Seat | None) -> None:
        """Serve until TERM/INT (drain, then exit), QUIT (exit now) or the
        master's end (drain, then exit)."""
        master = os.getppid()
        await self.start(listener, seat)
        stop = self.loop.create_future()
        quit_now = self.loop.create_future()

        def stopping(graceful: bool) -> None:
            if not stop.done():
                stop.set_result(graceful)
            if not graceful and not quit_now.done():
                quit_now.set_result(None)

        for signum, graceful in (
            (signal.SIGTERM, True),
            (signal.SIGINT, True),
            (signal.SIGQUIT, False),
        ):
            self.loop.add_signal_handler(signum, stopping, graceful)
        self.spawn(self._watch_master(master, stopping))
        if await stop:
            setproctitle(f"amqplexd: worker {self.slot} (draining)")
            draining = self.loop.create_task(self.drain(self.config.drain_timeout))
            # QUIT cuts a drain short as it would have cut serving.
            await asyncio.wait((draining, quit_now), return_when=asyncio.FIRST_COMPLETED)
            if not draining.done():
                draining.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await draining
            # The last second's counters too (the drain's 320s, the last
            # sessions' bytes): the exporter would next run after the exit.
            self.exporter.flush()

    async def _watch_master(self, master: int, stopping: typing.Callable[[bool], None]) -> None:
        while os.getppid() == master:
            await asyncio.sleep(MASTER_CHECK_INTERVAL)
        log.warning("master %d is gone: draining", master)
        stopping(True)

    async def drain(self, timeout: float) -> None:
        """Stop accepting; give clients `timeout` to leave, then close them
        with 320 and close the upstreams politely."""
        self.gate.close()
        await self._until(lambda: not self.sessions, timeout)
        for session in list(self.sessions):
            session.force_close(ReplyCode.CONNECTION_FORCED, SHUTDOWN_TEXT)
        await self._until(lambda: not self.sessions, self.config.client.close_timeout)
        upstreams = [upstream for pool in self.pools for upstream in pool.upstreams]
        for upstream in upstreams:
            upstream.close()
        await self._until(
            lambda: all(u.transport.is_closing() for u in upstreams),
            self.config.client.close_timeout,
        )

    async def _until(self, condition: typing.Callable[[], bool], timeout: float) -> None:
        """Wait for `condition`, checking each loop turn's worth of 50 ms."""
        deadline = self.loop.time() + timeout
        while not condition() and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
