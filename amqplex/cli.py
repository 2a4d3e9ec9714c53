"""The amqplexd command line."""

from __future__ import annotations

import argparse
import os
import sys

from amqplex import __version__, logs
from amqplex.config import Config, ConfigError, load
from amqplex.config.load import describe, reference
from amqplex.master import metrics_dir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="amqplexd", description="AMQP 0-9-1 multiplexing proxy for RabbitMQ."
    )
    parser.add_argument(
        "upstream_url",
        nargs="?",
        help="broker URL, amqp://host:port (default amqp://127.0.0.1:5672); "
        "user, password and vhost in it are ignored",
    )
    parser.add_argument(
        "-c",
        "--config",
        help="YAML or TOML configuration file "
        "(default: ./amqplex.yaml, then /etc/amqplex/amqplex.yaml)",
    )
    parser.add_argument("-l", "--listen-address", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("-p", "--listen-port", type=int, help="port to listen on (default 5673)")
    parser.add_argument("-w", "--workers", type=int, help="worker processes (default: CPU count)")
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate the configuration, print it with secrets masked, and exit",
    )
    parser.add_argument(
        "--print-defaults",
        action="store_true",
        help="print every setting with its default and meaning, as YAML, and exit",
    )
    parser.add_argument("--version", action="version", version=f"amqplexd {__version__}")
    return parser.parse_args(argv)


def overrides(args: argparse.Namespace) -> dict[str, object]:
    """Command-line flags, as configuration keys; they win over file and environment."""
    chosen = {
        "upstream.url": args.upstream_url,
        "listen.address": args.listen_address,
        "listen.port": args.listen_port,
        "workers": args.workers,
    }
    return {key: value for key, value in chosen.items() if value is not None}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    master_pid = os.getpid()
    if args.print_defaults:
        print(reference(), end="")
        sys.exit(0)
    try:
        config = load(args.config, os.environ, overrides(args))
    except ConfigError as error:
        print(f"amqplexd: configuration error: {error}", file=sys.stderr)
        sys.exit(1)
    if args.check:
        print(describe(config), end="")
        sys.exit(0)
    logs.configure(config.log.level, config.log.format)
    # Before anything imports prometheus_client: it picks multiprocess mode then.
    metrics_path, made_here = metrics_dir.prepare()
    from amqplex.master.arbiter import Arbiter
    from amqplex.worker.process import run_worker

    def reload() -> Config:
        return load(args.config, os.environ, overrides(args))

    try:
        code = Arbiter(config, reload, run_worker).run()
    except ConfigError as error:  # what could not be bound: no traceback
        print(f"amqplexd: {error}", file=sys.stderr)
        code = 1
    finally:
        if made_here and os.getpid() == master_pid:
            metrics_dir.remove(metrics_path)
    sys.exit(code)
