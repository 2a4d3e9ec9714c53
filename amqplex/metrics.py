"""The Prometheus metrics amqplex exports.

Workers write them through prometheus-client's multiprocess mode; the
master serves the sum on GET /metrics. Gauges are 'livesum' (a dead
worker's values vanish when the master marks it dead), but for the two
last-dial timestamps, the latest of any worker's, dead or alive. No label
carries a user name, password or address; every label's values are a
small fixed set.
"""

from __future__ import annotations

import typing

from prometheus_client import Counter, Gauge, Histogram, values

from amqplex import procid

if values.ValueClass is not values.MutexValue:
    # Multiprocess mode: each update checks whether the process forked, and
    # with os.getpid (the default) that is a system call per update.
    values.ValueClass = values.MultiProcessValue(process_identifier=procid.current)

# The six of the AMQPlex README.
ACTIVE_CLIENTS = Gauge(
    "amqplex_active_clients",
    "Client connections that finished their handshake and are open",
    multiprocess_mode="livesum",
)
UPSTREAM_CONNECTIONS = Gauge(
    "amqplex_upstream_connections",
    "Open connections to the broker",
    multiprocess_mode="livesum",
)
UPSTREAM_RECONNECTING = Gauge(
    "amqplex_upstream_reconnecting",
    "Pools that lost their broker connection and are redialling with backoff",
    multiprocess_mode="livesum",
)
CHANNELS_USED = Gauge(
    "amqplex_channels_used",
    "Upstream channels carrying a client channel",
    multiprocess_mode="livesum",
)
CHANNELS_PENDING_CLOSE = Gauge(
    "amqplex_channels_pending_close",
    "Upstream channels whose close handshake with the broker is not finished",
    multiprocess_mode="livesum",
)
UPSTREAM_RECONNECT_ATTEMPTS = Counter(
    "amqplex_upstream_reconnect_attempts",
    "Redial attempts after losing a broker connection",
)

# Beside them.
POOLS = Gauge(
    "amqplex_pools",
    "Pools, one per (user, password, vhost) in use",
    multiprocess_mode="livesum",
)
CLIENT_CONNECTIONS = Counter("amqplex_client_connections", "Client connections accepted")
AUTHENTICATION_FAILURES = Counter(
    "amqplex_authentication_failures", "Clients the broker refused (wrong credentials or vhost)"
)
CLIENT_ERRORS = Counter(
    "amqplex_client_errors",
    "Connection.Close the proxy sent clients, by AMQP reply code",
    ["code"],
)
FRAMES = Counter("amqplex_frames", "AMQP frames to and from clients", ["direction"])
BYTES = Counter("amqplex_bytes", "Bytes to and from clients", ["direction"])
MESSAGES_PUBLISHED = Counter("amqplex_messages_published", "Messages clients published")
MESSAGES_DELIVERED = Counter(
    "amqplex_messages_delivered", "Messages delivered to clients (Basic.Deliver, Basic.GetOk)"
)
CHANNELS_RECYCLED = Counter(
    "amqplex_channels_recycled",
    "Upstream channels a client left for the next one, by whether a probe "
    "(a Basic.Recover round trip) proved them clean first or quiet publishes let them skip it",
    ["probe"],
)
SLOW_CLIENT_DISCONNECTS = Counter(
    "amqplex_slow_client_disconnects",
    "Clients closed for not reading their deliveries (client.stall_timeout)",
)
WORKER_RESTARTS = Counter("amqplex_worker_restarts", "Workers that died and were replaced")
HANDSHAKE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
CLIENT_HANDSHAKE_SECONDS = Histogram(
    "amqplex_client_handshake_seconds",
    "From a client's connection (over TLS, its TLS handshake done) to its OpenOk",
    buckets=HANDSHAKE_BUCKETS,
)
UPSTREAM_DIAL_SECONDS = Histogram(
    "amqplex_upstream_dial_seconds",
    "Dialling and handshaking a broker connection",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
UPSTREAM_LAST_DIAL_SUCCESS = Gauge(
    "amqplex_upstream_last_dial_success_timestamp_seconds",
    "When a worker last opened a broker connection (Unix time)",
    multiprocess_mode="max",
)
UPSTREAM_LAST_DIAL_FAILURE = Gauge(
    "amqplex_upstream_last_dial_failure_timestamp_seconds",
    "When a worker last failed to reach the broker (Unix time)",
    multiprocess_mode="max",
)


def add_observations(histogram: Histogram, counts: typing.Sequence[int], total: float) -> None:
    """Leave `histogram` as observe() would after the observations counted
    in `counts` (by bucket: one per bound, then +Inf) summing to `total`.

    prometheus-client has no bulk observe, and each observe() writes the
    metric file twice: a few microseconds of every short-lived client's
    handshake. This adds to the histogram's bucket values as observe() does
    (tests/test_metrics.py holds it to observe()'s result)."""
    histogram._sum.inc(total)
    for bucket, count in zip(histogram._buckets, counts, strict=True):
        if count:
            bucket.inc(count)
