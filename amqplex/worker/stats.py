"""What a worker counts, as plain integers: the data path pays one integer
add per event; the metrics exporter turns deltas into Prometheus counters
off the hot path."""

from __future__ import annotations

import bisect
import dataclasses

from amqplex.metrics import HANDSHAKE_BUCKETS


@dataclasses.dataclass(slots=True)
class Stats:
    client_connections: int = 0
    authentication_failures: int = 0
    slow_client_disconnects: int = 0
    # Channels recycled after a probe, and at once (worker/quiet.py).
    channels_probed: int = 0
    channels_unprobed: int = 0
    upstream_reconnect_attempts: int = 0
    messages_published: int = 0
    messages_delivered: int = 0
    frames_from_clients: int = 0
    frames_to_clients: int = 0
    # Of sessions that have ended: live sessions count their own (bytes_in,
    # bytes_out), and the exporter adds them up.
    bytes_from_clients: int = 0
    bytes_to_clients: int = 0
    # Connection.Close reply codes the proxy sent clients, by code.
    client_errors: dict[int, int] = dataclasses.field(default_factory=dict)
    # Handshakes by how long they took, counted by HANDSHAKE_BUCKETS bucket
    # (the last: over every bound), and their seconds summed.
    handshakes: list[int] = dataclasses.field(
        default_factory=lambda: [0] * (len(HANDSHAKE_BUCKETS) + 1)
    )
    handshake_seconds: float = 0.0

    def client_error(self, code: int) -> None:
        self.client_errors[code] = self.client_errors.get(code, 0) + 1

    def session_ended(self, bytes_in: int, bytes_out: int) -> None:
        self.bytes_from_clients += bytes_in
        self.bytes_to_clients += bytes_out

    def handshake_done(self, seconds: float) -> None:
        self.handshakes[bisect.bisect_left(HANDSHAKE_BUCKETS, seconds)] += 1
        self.handshake_seconds += seconds
