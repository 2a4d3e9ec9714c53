"""A worker process, as the master forks it: its title, its signals, its loop."""

from __future__ import annotations

import asyncio
import signal
import socket

from setproctitle import setproctitle

from amqplex import logs
from amqplex.board import Seat
from amqplex.config import Config
from amqplex.worker import memory
from amqplex.worker.server import Worker
from amqplex.worker.session import SESSION_LOGGER


def run_worker(config: Config, sock: socket.socket, slot: int, seat: Seat | None) -> int:
    setproctitle(f"amqplexd: worker {slot}")
    # Reload and resizing are the master's: a worker only drains or quits.
    for name in ("SIGHUP", "SIGTTIN", "SIGTTOU"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    logs.buffer_output(SESSION_LOGGER)
    memory.tune_allocator()
    worker = Worker(config, slot)
    run_loop(worker.serve(sock, seat))
    return 0


def run_loop(coroutine) -> None:
    """Run on uvloop when it is installed, else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coroutine)
    else:
        uvloop.run(coroutine)
