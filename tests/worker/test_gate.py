"""Least connections across workers (amqplex/worker/gate.py), through a
real daemon: which worker holds each client is read from /proc."""

from __future__ import annotations

import collections
import os
import signal
import time

from tests.support.procs import holder, workers
from tests.support.rawclient import RawClient
from tests.support.waiting import wait_until


def accepting(fresh_amqplexd, count: int):
    """A daemon with `count` workers, all of them accepting, and their pids."""
    daemon = fresh_amqplexd("-w", str(count))
    wait_until(
        lambda: daemon.log_text().count("worker.server: listening on") == count,
        what="every worker listening",
    )
    return daemon, sorted(workers(daemon.process.pid))


def connected(port: int, timeout: float = 10) -> RawClient:
    client = RawClient(port, timeout=timeout)
    client.handshake()
    client.open_channel()
    return client


def test_clients_connecting_at_once_each_go_to_a_worker_with_none(fresh_amqplexd):
    """Four long-lived clients connect at the same moment (all queued before
    any worker wakes), four workers: one each. Left to libuv, the first
    worker awake takes every one of them."""
    daemon, pids = accepting(fresh_amqplexd, 4)
    clients = [RawClient(daemon.port) for _ in range(4)]
    try:
        for client in clients:
            client.handshake()
            client.open_channel()
        held = collections.Counter(holder(client.sock, pids) for client in clients)
    finally:
        for client in clients:
            client.close()
    assert sorted(held) == pids, held


def test_a_stopped_worker_takes_clients_the_lighter_worker_does_not(fresh_amqplexd):
    """The lighter worker is frozen (SIGSTOP): the worker that stopped
    accepting because it held more must not leave a new client queued."""
    daemon, pids = accepting(fresh_amqplexd, 2)
    first = connected(daemon.port)
    busy = holder(first.sock, pids)
    frozen = next(pid for pid in pids if pid != busy)
    os.kill(frozen, signal.SIGSTOP)
    try:
        started = time.monotonic()
        second = connected(daemon.port, timeout=5)
        waited = time.monotonic() - started
        assert holder(second.sock, pids) == busy
        assert waited < 2, f"the new client waited {waited:.2f} s"
        second.close()
    finally:
        os.kill(frozen, signal.SIGCONT)
        first.close()
