"""Configuration: the settings (settings.py) and where they come from (load.py)."""

from amqplex.config.load import ConfigError, apply_environment, load
from amqplex.config.settings import (
    ClientConfig,
    Config,
    ListenConfig,
    PoolConfig,
    TLSConfig,
    UpstreamConfig,
)

__all__ = [
    "ClientConfig",
    "Config",
    "ConfigError",
    "ListenConfig",
    "PoolConfig",
    "TLSConfig",
    "UpstreamConfig",
    "apply_environment",
    "load",
]
