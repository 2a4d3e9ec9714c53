"""Configuration: the settings every part of amqplex reads, with defaults.

Loading files, the environment and validation belong to the process-model
work; the core only needs these values and the command line.
"""

import dataclasses
import os
import typing
import urllib.parse


@dataclasses.dataclass(slots=True)
class ListenConfig:
    address: str = "0.0.0.0"
    port: int = 5673


@dataclasses.dataclass(slots=True)
class UpstreamConfig:
    # User, password and vhost in the URL are ignored: each client brings its own.
    url: str = "amqp://127.0.0.1:5672"
    # Heartbeat the proxy asks of the broker on its own connections (seconds).
    heartbeat: int = 60
    # Dial plus AMQP handshake with the broker.
    connect_timeout: float = 10.0

    @property
    def host(self) -> str:
        return urllib.parse.urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        return urllib.parse.urlsplit(self.url).port or 5672


@dataclasses.dataclass(slots=True)
class PoolConfig:
    # Channels per upstream connection (the broker's channel_max caps it too).
    max_channels: int = 2047
    # Upstream connections per (user, password, vhost); 0 means no limit.
    max_upstream_connections: int = 0
    # Client connections per worker; 0 means no limit.
    max_client_connections: int = 0
    # Pre-opened upstream channels kept ready so Channel.Open costs no round trip.
    idle_channels: int = 4


@dataclasses.dataclass(slots=True)
class ClientConfig:
    # A client must finish its handshake (header to Connection.Open) in this time.
    handshake_timeout: float = 10.0
    # Heartbeat the proxy offers clients; they may ask for less or none.
    heartbeat: int = 60
    # Bytes queued for a client that does not read before it is disconnected.
    max_output_buffer: int = 64 * 1024 * 1024
    # How long a Close may wait for its CloseOk.
    close_timeout: float = 5.0


@dataclasses.dataclass(slots=True)
class Config:
    listen: ListenConfig = dataclasses.field(default_factory=ListenConfig)
    upstream: UpstreamConfig = dataclasses.field(default_factory=UpstreamConfig)
    pool: PoolConfig = dataclasses.field(default_factory=PoolConfig)
    client: ClientConfig = dataclasses.field(default_factory=ClientConfig)
    workers: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)


ENV_PREFIX = "AMQP_"


def apply_environment(config: Config, environ: typing.Mapping[str, str]) -> None:
    """AMQP_<SECTION>_<KEY> overrides a setting (dots become underscores):
    AMQP_POOL_MAX_CHANNELS=100 sets pool.max_channels."""
    for section in dataclasses.fields(config):
        value = getattr(config, section.name)
        if not dataclasses.is_dataclass(value):
            continue
        for field in dataclasses.fields(value):
            name = f"{ENV_PREFIX}{section.name}_{field.name}".upper()
            if name in environ:
                current = getattr(value, field.name)
                setattr(value, field.name, _convert(name, environ[name], type(current)))


def _convert(name: str, raw: str, kind: type) -> object:
    """The environment's text as the setting's own type."""
    if kind is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}: expected true or false, got {raw!r}")
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{name}: expected {kind.__name__}, got {raw!r}") from None
