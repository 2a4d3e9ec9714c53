"""Every setting of amqplex, its default, its allowed values and what it is for.

The dataclasses are the schema: loading (load.py) fills them from a file,
the environment and the command line, and validates each value against the
bounds given here, naming the key when one is wrong.
"""

from __future__ import annotations

import dataclasses
import os
import urllib.parse

from amqplex.protocol.constants import MAX_MESSAGE_SIZE

# Over the long run, the share of the time one client's falling behind may
# hold its upstreams back (ClientSession.pause_writing): the others on them
# keep at least the rest.
STALL_SHARE = 0.1


def setting(default, help: str, *, minimum=None, maximum=None, choices=None, secret=False):
    """A dataclass field with its documentation and bounds."""
    meta = {"help": help, "min": minimum, "max": maximum, "choices": choices, "secret": secret}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(slots=True)
class ListenConfig:
    address: str = setting("0.0.0.0", "address clients connect to")
    port: int = setting(5673, "port clients connect to", minimum=1, maximum=65535)


@dataclasses.dataclass(slots=True)
class UpstreamConfig:
    url: str = setting(
        "amqp://127.0.0.1:5672",
        "the broker, amqp://host[:5672] or amqps://host[:5671] for TLS (user, password "
        "and vhost in it are ignored: each client brings its own)",
    )
    heartbeat: int = setting(
        60, "heartbeat (s) the proxy keeps with the broker; 0 for none", minimum=0, maximum=65535
    )
    connect_timeout: float = setting(
        10.0, "bound (s) on dialling and handshaking with the broker", minimum=0.1
    )
    read_gather: float = setting(
        0.001,
        "after a small read from the broker that came within this long (s) of the one "
        "before, wait this long before the next, so a stream of small deliveries arrives "
        "in larger reads (waits count whole milliseconds); 0 reads as soon as anything comes",
        minimum=0,
        maximum=0.1,
    )
    exchange_types: list = setting(
        [],
        "exchange types from broker plugins (e.g. x-delayed-message) that clients may "
        "declare, beside direct, fanout, topic and headers",
    )

    @property
    def host(self) -> str:
        return urllib.parse.urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = urllib.parse.urlsplit(self.url)
        return parts.port or (5671 if parts.scheme == "amqps" else 5672)


def mask_password(url: str) -> str:
    """`url` with the password in it, if any, masked: for --check, logs and ps.
    Read as text, up to the last "@", not as a URL: a password with a "/",
    "?" or "#" left unescaped ends a URL's authority early, and the URL
    parser would find no password to hide."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if not (sep and at and ":" in userinfo):
        return url
    return f"{scheme}://{userinfo.partition(':')[0]}:********@{hostpart}"


@dataclasses.dataclass(slots=True)
class PoolConfig:
    max_channels: int = setting(
        2047,
        "channels per upstream connection (the broker's channel_max caps it too)",
        minimum=1,
        maximum=65535,
    )
    max_upstream_connections: int = setting(
        0, "upstream connections per (user, password, vhost); 0 for no limit", minimum=0
    )
    min_upstream_connections: int = setting(
        1,
        "upstream connections per (user, password, vhost) a worker keeps while it has "
        "clients for them, putting each new client on the one carrying fewest channels: "
        "RabbitMQ reads each connection with one process, which caps what one carries, "
        "so heavy publishers want more than one; capped by max_upstream_connections",
        minimum=1,
        maximum=64,
    )
    max_client_connections: int = setting(
        0, "client connections per worker; 0 for no limit", minimum=0
    )
    idle_channels: int = setting(
        4,
        "pre-opened upstream channels per pool, so a client's Channel.Open costs no round trip",
        minimum=0,
        maximum=1000,
    )
    max_idle_channels: int = setting(
        64,
        "most channels a pool keeps open for reuse when clients give them back",
        minimum=0,
        maximum=65535,
    )
    acquire_timeout: float = setting(
        5.0,
        "how long (s) a client's Channel.Open may wait for an upstream channel when "
        "every allowed upstream is full, before the client is refused",
        minimum=0.1,
    )
    idle_timeout: float = setting(
        300.0,
        "an upstream with no client channels this long (s) is closed, but for the "
        "min_upstream_connections a pool keeps while it has clients",
        minimum=0,
    )
    cleanup_interval: float = setting(
        30.0, "how often (s) idle upstreams are looked for", minimum=0.1
    )


@dataclasses.dataclass(slots=True)
class ClientConfig:
    handshake_timeout: float = setting(
        10.0,
        "a client must finish its handshake (header to Connection.Open) in this time (s)",
        minimum=0.1,
    )
    heartbeat: int = setting(
        60,
        "heartbeat (s) offered to clients; they may ask for less or none",
        minimum=0,
        maximum=65535,
    )
    max_output_buffer: int = setting(
        4 * 1024 * 1024,
        "bytes queued for a client before its upstream stops reading until the client "
        "catches up (as TCP would slow the broker for it)",
        minimum=65536,
    )
    stall_timeout: float = setting(
        2.0,
        "how long (s) one client that does not read may hold its upstream back before it "
        "is closed with 320 so the other clients on that upstream go on (spent while it "
        f"holds others back, earned back at {STALL_SHARE:.0%} of the time since)",
        minimum=0.05,
    )
    close_timeout: float = setting(5.0, "how long (s) a Close waits for its CloseOk", minimum=0.1)
    max_message_size: int = setting(
        MAX_MESSAGE_SIZE,
        "the largest message body (bytes) a client may publish: a larger one is refused "
        "406 at its content header, as RabbitMQ's own max_message_size (same default)",
        minimum=1,
    )


@dataclasses.dataclass(slots=True)
class TLSConfig:
    # Every certificate and key: a PEM file path or the PEM base64-encoded.
    cert: str = setting(
        "",
        "PEM certificate (chain) of the client listener, which speaks TLS when this and key "
        "are set (file path or base64 PEM)",
    )
    key: str = setting("", "PEM private key for cert (file path or base64 PEM)", secret=True)
    client_ca_cert: str = setting(
        "",
        "CA bundle that verifies client certificates (see verify_client); not the one "
        "that verifies the broker",
    )
    verify_client: str = setting(
        "none",
        "ask clients for a certificate signed by client_ca_cert: none, optional (verified "
        "when given) or required",
        choices=("none", "optional", "required"),
    )
    ca_cert: str = setting(
        "", "CA bundle that verifies an amqps:// broker's certificate (default: the OS's)"
    )
    client_cert: str = setting(
        "", "certificate presented to an amqps:// broker that asks for one (mTLS)"
    )
    client_key: str = setting("", "PEM private key for client_cert", secret=True)
    skip_verify: bool = setting(
        False, "do not verify the amqps:// broker's certificate or host name (logged at start)"
    )


@dataclasses.dataclass(slots=True)
class MetricsConfig:
    address: str = setting(
        "", "address of the health and metrics HTTP server (default: listen.address)"
    )
    port: int = setting(
        0, "port of GET /, /ready and /metrics; 0 means listen.port + 1", minimum=0, maximum=65535
    )


@dataclasses.dataclass(slots=True)
class LogConfig:
    level: str = setting(
        "info", "least severe log level written", choices=("debug", "info", "warning", "error")
    )
    format: str = setting("text", "log line format", choices=("text", "json"))


@dataclasses.dataclass(slots=True)
class Config:
    listen: ListenConfig = dataclasses.field(default_factory=ListenConfig)
    upstream: UpstreamConfig = dataclasses.field(default_factory=UpstreamConfig)
    pool: PoolConfig = dataclasses.field(default_factory=PoolConfig)
    client: ClientConfig = dataclasses.field(default_factory=ClientConfig)
    tls: TLSConfig = dataclasses.field(default_factory=TLSConfig)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    workers: int = setting(
        os.cpu_count() or 1, "worker processes (default: CPU count)", minimum=1, maximum=256
    )
    drain_timeout: float = setting(
        30.0, "on TERM/INT, how long (s) connected clients get to finish", minimum=0
    )
