"""Where settings come from, lowest priority first: the defaults, a YAML or
TOML file, AMQP_<SECTION>_<KEY> environment variables, the command line.

Every value is checked against its setting's type and bounds; a bad one is
refused with a ConfigError naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import socket
import tomllib
import typing
import urllib.parse

import yaml

from amqplex import tls
from amqplex.config.settings import Config, mask_password

DEFAULT_PATHS = ("./amqplex.yaml", "/etc/amqplex/amqplex.yaml")
ENV_PREFIX = "AMQP_"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}


class ConfigError(ValueError):
    """A setting that cannot be used; the message starts with its key."""


def load(
    path: str | None = None,
    environ: typing.Mapping[str, str] | None = None,
    overrides: typing.Mapping[str, object] | None = None,
) -> Config:
    """The effective configuration: defaults < file < environment < overrides."""
    config = Config()
    if path is None:
        path = next((p for p in DEFAULT_PATHS if os.path.exists(p)), None)
    if path is not None:
        apply_mapping(config, read_file(path), source=path)
    apply_environment(config, os.environ if environ is None else environ)
    for key, value in (overrides or {}).items():
        set_value(config, key, value)
    validate(config)
    return config


def read_file(path: str) -> dict:
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
    try:
        data = tomllib.loads(raw.decode()) if path.endswith(".toml") else yaml.safe_load(raw) or {}
    except (tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid {_format(path)}: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def _format(path: str) -> str:
    return "TOML" if path.endswith(".toml") else "YAML"


def apply_mapping(config: Config, data: dict, source: str) -> None:
    sections = _sections(config)
    for key, value in data.items():
        if key in sections:
            if value is None:
                continue  # `tls:` with every key under it commented out
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a section of settings, got {value!r}")
            for name, item in value.items():
                set_value(config, f"{key}.{name}", item, source)
        elif key in _top_level(config):
            set_value(config, key, value, source)
        else:
            known = ", ".join(sorted([*sections, *_top_level(config)]))
            raise ConfigError(f"{key}: unknown key in {source} (known: {known})")


def apply_environment(config: Config, environ: typing.Mapping[str, str]) -> None:
    """AMQP_<SECTION>_<KEY> sets section.key (AMQP_POOL_MAX_CHANNELS=100);
    AMQP_<KEY> sets a top-level key (AMQP_WORKERS=4)."""
    for key in _all_keys(config):
        name = ENV_PREFIX + key.replace(".", "_").upper()
        if name in environ:
            set_value(config, key, environ[name], source=name)


def set_value(config: Config, key: str, value: object, source: str | None = None) -> None:
    target, field = _locate(config, key)
    setattr(target, field.name, _coerce(key, value, field, from_text=_is_text_source(source)))


def _is_text_source(source: str | None) -> bool:
    return source is not None and source.startswith(ENV_PREFIX)


def validate(config: Config) -> None:
    for key in _all_keys(config):
        target, field = _locate(config, key)
        value = getattr(target, field.name)
        meta = field.metadata
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value}")
        if meta.get("min") is not None and value < meta["min"]:
            raise ConfigError(f"{key}: must be at least {meta['min']}, got {value}")
        if meta.get("max") is not None and value > meta["max"]:
            raise ConfigError(f"{key}: must be at most {meta['max']}, got {value}")
        if meta.get("choices") and value not in meta["choices"]:
            allowed = ", ".join(meta["choices"])
            raise ConfigError(f"{key}: must be one of {allowed}, got {value!r}")
    url = urllib.parse.urlsplit(config.upstream.url)
    if url.scheme not in ("amqp", "amqps") or not url.hostname:
        raise ConfigError(
            f"upstream.url: expected amqp://host[:port] or amqps://host[:port], "
            f"got {mask_password(config.upstream.url)!r}"
        )
    try:
        port = url.port
    except ValueError:
        port = 0
    if port == 0 and url.netloc.rpartition("@")[2].rpartition("]")[2].count(":"):
        raise ConfigError(f"upstream.url: bad port in {mask_password(config.upstream.url)!r}")
    if url.query:
        raise ConfigError(
            f"upstream.url: query parameters are not read ({url.query}): "
            "set upstream.heartbeat, upstream.connect_timeout and the tls settings instead"
        )
    for section in ("listen", "metrics"):
        address = getattr(config, section).address
        if address:
            _check_address(f"{section}.address", address)
    if not config.metrics.port and config.listen.port == 65535:
        raise ConfigError(
            "metrics.port: listen.port is 65535, so the default (listen.port + 1) "
            "is no port; set metrics.port"
        )
    metrics_address = config.metrics.address or config.listen.address
    same_address = metrics_address == config.listen.address or _WILDCARDS & {
        metrics_address,
        config.listen.address,
    }
    if same_address and config.metrics.port == config.listen.port:
        raise ConfigError(f"metrics.port: {config.metrics.port} is listen.port's too")
    try:
        # Files read, keys matched to certificates, expiry checked: now, not
        # when the first client comes (and on HUP, before the running config goes).
        tls.build(config)
    except tls.SettingError as error:
        raise ConfigError(str(error)) from None


# Addresses that bind every interface: a port there is taken on every address.
_WILDCARDS = frozenset(("0.0.0.0", "::"))


def _check_address(key: str, address: str) -> None:
    """An address this host could listen on (a literal, or a name it resolves)."""
    try:
        socket.getaddrinfo(address, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as error:
        raise ConfigError(f"{key}: not an address to listen on: {address!r} ({error})") from None


def describe(config: Config) -> str:
    """The effective configuration as YAML, with secrets masked."""
    out: dict = {}
    for key in _all_keys(config):
        target, field = _locate(config, key)
        value = getattr(target, field.name)
        if (field.metadata.get("secret") or _holds_key(value)) and value:
            value = "********"
        elif isinstance(value, str) and "://" in value:
            value = mask_password(value)
        if "." in key:
            section, name = key.split(".", 1)
            out.setdefault(section, {})[name] = value
        else:
            out[key] = value
    return yaml.safe_dump(out, sort_keys=False)


def _holds_key(value: object) -> bool:
    # A certificate setting may bundle its private key (tls.cert).
    return isinstance(value, str) and tls.holds_private_key(value)


def reference() -> str:
    """Every key with its default and its help, as a commented YAML file:
    what etc/amqplex.yaml is made of (amqplexd --print-defaults)."""
    config = Config()
    lines = [
        "# amqplex configuration: every key, with its default.",
        "# Environment variables AMQP_<SECTION>_<KEY> override this file",
        "# (AMQP_POOL_MAX_CHANNELS=500); command-line flags override both.",
        "# Durations are seconds, or text like 500ms, 30s, 5m, 1h.",
    ]
    current_section = None
    for key in _all_keys(config):
        target, field = _locate(config, key)
        section, _, name = key.rpartition(".")
        if section != current_section:
            lines.append("")
            if section:
                lines.append(f"{section}:")
            current_section = section
        indent = "  " if section else ""
        rendered = yaml.safe_dump(
            {name: getattr(target, field.name)}, default_flow_style=True
        ).strip()[1:-1]
        lines.append(f"{indent}# {field.metadata['help']}")
        if key == "workers":
            # The default is the CPU count of the machine that runs amqplexd, not
            # of the one that generated this file: left unset, and said so.
            rendered = f"# {name}: <CPU count>"
        lines.append(f"{indent}{rendered}")
    return "\n".join(lines) + "\n"


# -- the schema, walked --------------------------------------------------------


def _sections(config: Config) -> list[str]:
    return [
        f.name for f in dataclasses.fields(config) if dataclasses.is_dataclass(f.default_factory)
    ]


def _top_level(config: Config) -> list[str]:
    return [f.name for f in dataclasses.fields(config) if f.name not in _sections(config)]


def _all_keys(config: Config) -> list[str]:
    keys = []
    for section in _sections(config):
        keys.extend(f"{section}.{f.name}" for f in dataclasses.fields(getattr(config, section)))
    keys.extend(_top_level(config))
    return keys


def _locate(config: Config, key: str) -> tuple[object, dataclasses.Field]:
    if "." in key:
        section, name = key.split(".", 1)
        if section not in _sections(config):
            raise ConfigError(f"{key}: unknown section '{section}'")
        target = getattr(config, section)
    else:
        target, name = config, key
    fields = {f.name: f for f in dataclasses.fields(target)}
    if name not in fields or name in _sections(config):
        known = ", ".join(sorted(fields))
        raise ConfigError(f"{key}: unknown key (known here: {known})")
    return target, fields[name]


def _coerce(key: str, value: object, field: dataclasses.Field, from_text: bool) -> object:
    kind = type(field.default) if field.default is not dataclasses.MISSING else list
    if kind is bool:
        if isinstance(value, bool):
            return value
        if from_text and str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if from_text and str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_text and re.fullmatch(r"\s*-?\d+\s*", str(value)):
            return int(value)
        raise ConfigError(f"{key}: expected a whole number, got {value!r}")
    if kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and (match := _DURATION.match(value)):
            return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        raise ConfigError(
            f"{key}: expected seconds, as a number or like '500ms', '30s', '5m', got {value!r}"
        )
    if kind is list:
        if isinstance(value, str) and from_text:
            return [item.strip() for item in value.split(",") if item.strip()]
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return list(value)
        raise ConfigError(f"{key}: expected a list of names, got {value!r}")
    if isinstance(value, str):
        return value
    raise ConfigError(f"{key}: expected text, got {value!r}")
