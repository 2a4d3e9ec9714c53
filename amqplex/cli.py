"""The amqplexd command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

from amqplex import __version__
from amqplex.config import Config, apply_environment


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
    parser.add_argument("-c", "--config", help="configuration file")
    parser.add_argument("-l", "--listen-address", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("-p", "--listen-port", type=int, help="port to listen on (default 5673)")
    parser.add_argument("-w", "--workers", type=int, help="worker processes (default: CPU count)")
    parser.add_argument("--version", action="version", version=f"amqplexd {__version__}")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> Config:
    config = Config()
    apply_environment(config, os.environ)
    if args.upstream_url:
        config.upstream.url = args.upstream_url
    if args.listen_address:
        config.listen.address = args.listen_address
    if args.listen_port is not None:
        config.listen.port = args.listen_port
    if args.workers is not None:
        config.workers = args.workers
    return config


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = build_config(args)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
    )
    from amqplex.worker.server import Worker

    run(Worker(config).serve())


def run(coroutine) -> None:
    """Run on uvloop when it is installed, else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coroutine)
    else:
        uvloop.run(coroutine)
