"""Once a second, the worker's counters and state go to the multiprocess
metrics the master serves: the data path itself only adds integers."""

from __future__ import annotations

import asyncio
import logging
import typing

from amqplex import logs, metrics
from amqplex.worker.session import SESSION_LOGGER
from amqplex.worker.stats import Stats

if typing.TYPE_CHECKING:
    from amqplex.worker.server import Worker

log = logging.getLogger(__name__)

INTERVAL = 1.0

# Stats field -> the counter it feeds.
_COUNTERS = {
    "client_connections": metrics.CLIENT_CONNECTIONS,
    "authentication_failures": metrics.AUTHENTICATION_FAILURES,
    "slow_client_disconnects": metrics.SLOW_CLIENT_DISCONNECTS,
    "channels_probed": metrics.CHANNELS_RECYCLED.labels(probe="sent"),
    "channels_unprobed": metrics.CHANNELS_RECYCLED.labels(probe="skipped"),
    "upstream_reconnect_attempts": metrics.UPSTREAM_RECONNECT_ATTEMPTS,
    "messages_published": metrics.MESSAGES_PUBLISHED,
    "messages_delivered": metrics.MESSAGES_DELIVERED,
    "frames_from_clients": metrics.FRAMES.labels(direction="from_clients"),
    "frames_to_clients": metrics.FRAMES.labels(direction="to_clients"),
    "bytes_from_clients": metrics.BYTES.labels(direction="from_clients"),
    "bytes_to_clients": metrics.BYTES.labels(direction="to_clients"),
}


class Exporter:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._sent = Stats()

    async def run(self) -> None:
        while True:
            try:
                self.flush()
            except Exception:  # a bug here must not end the metrics, nor the session lines
                log.exception("exporting the worker's metrics failed")
            logs.flush(SESSION_LOGGER)
            await asyncio.sleep(INTERVAL)

    def flush(self) -> None:
        stats, sent = self.worker.stats, self._sent
        totals = {name: getattr(stats, name) for name in _COUNTERS}
        for session in self.worker.sessions:
            totals["bytes_from_clients"] += session.bytes_in
            totals["bytes_to_clients"] += session.bytes_out
        for name, counter in _COUNTERS.items():
            delta = totals[name] - getattr(sent, name)
            if delta:
                counter.inc(delta)
                setattr(sent, name, totals[name])
        for code, count in stats.client_errors.items():
            delta = count - sent.client_errors.get(code, 0)
            if delta:
                metrics.CLIENT_ERRORS.labels(code=str(code)).inc(delta)
                sent.client_errors[code] = count
        self._handshakes()
        self._gauges()

    def _handshakes(self) -> None:
        stats, sent = self.worker.stats, self._sent
        counts = [
            now - before for now, before in zip(stats.handshakes, sent.handshakes, strict=True)
        ]
        if any(counts):
            seconds = stats.handshake_seconds - sent.handshake_seconds
            metrics.add_observations(metrics.CLIENT_HANDSHAKE_SECONDS, counts, seconds)
            sent.handshakes = list(stats.handshakes)
            sent.handshake_seconds = stats.handshake_seconds

    def _gauges(self) -> None:
        pools = list(self.worker.pools)
        upstreams = [upstream for pool in pools for upstream in pool.upstreams]
        slots = [slot for upstream in upstreams for slot in upstream.slots.values()]
        metrics.POOLS.set(len(pools))
        metrics.ACTIVE_CLIENTS.set(self.worker.running_sessions())
        metrics.UPSTREAM_CONNECTIONS.set(len(upstreams))
        metrics.UPSTREAM_RECONNECTING.set(sum(1 for pool in pools if pool.reconnecting))
        metrics.CHANNELS_USED.set(sum(1 for slot in slots if slot.client is not None))
        metrics.CHANNELS_PENDING_CLOSE.set(
            sum(1 for slot in slots if slot.awaiting_close_ok or slot.owes_close_ok)
        )
