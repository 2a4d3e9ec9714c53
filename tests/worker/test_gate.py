"""Least connections across workers (amqplex/worker/gate.py), through a
real daemon: which worker holds each client is read from /proc."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import socket
import time

import uvloop

from amqplex.board import Board
from amqplex.worker import gate
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


def test_clients_connecting_back_to_back_each_go_to_a_worker_with_none(fresh_amqplexd):
    """Four long-lived clients connect one right after another (each within
    a fraction of a millisecond of the last, then all handshake), four
    workers: one each. Left to the kernel, the worker that took the first is
    awake and takes the next ones too."""
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
    assert set(held) == set(pids), held


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
        # It did stop (the client waited for it to see the queue stuck), and
        # it did not leave the client waiting on the frozen worker.
        assert gate.STUCK_AFTER <= waited < 2, f"the new client waited {waited:.2f} s"
        second.close()
    finally:
        os.kill(frozen, signal.SIGCONT)
        first.close()


# -- the gate on its own: a loopback listener, a board, no broker ------------


class Clients:
    """The worker's side of the gate: the clients it holds, as they come and go."""

    def __init__(self) -> None:
        self.count = 0
        self.gate: gate.Gate | None = None

    def arrive(self) -> None:
        self.count += 1
        self.gate.arrived()

    def leave(self) -> None:
        self.count -= 1
        self.gate.left()


def run_gate(scenario, listen=None) -> None:
    """Run `scenario(gate, other_seat, clients)` on uvloop with a gate on a
    fresh loopback listener, next to one other worker's seat."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        board = Board(4)
        mine, other = board.claim(), board.claim()
        other.post(0)

        def serve(sock: socket.socket):
            return loop.create_server(asyncio.Protocol, sock=sock)

        clients = Clients()
        gate_ = clients.gate = gate.Gate(listener, mine, listen or serve, lambda: clients.count)
        try:
            await scenario(gate_, other, clients)
        finally:
            gate_.close()
            listener.close()

    uvloop.run(main())


async def until(condition, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.001)


def test_a_worker_ahead_stops_and_resumes_when_one_of_its_clients_leaves():
    async def scenario(gate_, other, clients):
        assert await gate_.open()
        clients.arrive()  # one against none
        assert not gate_.accepting
        clients.leave()
        await until(lambda: gate_.accepting)

    run_gate(scenario)


def test_a_stopped_worker_resumes_once_the_others_catch_up():
    async def scenario(gate_, other, clients):
        assert await gate_.open()
        clients.arrive()
        assert not gate_.accepting
        other.post(1)
        await until(lambda: gate_.accepting)

    run_gate(scenario)


def test_a_failed_opening_is_tried_again(monkeypatch):
    monkeypatch.setattr(gate, "RETRY_AFTER", 0.01)
    calls = []

    async def scenario(gate_, other, clients):
        assert not await gate_.open()
        await until(lambda: gate_.accepting)
        assert len(calls) == 2

    def flaky_listen(sock: socket.socket):
        calls.append(sock)
        if len(calls) == 1:
            raise OSError(24, "Too many open files")
        return asyncio.get_running_loop().create_server(asyncio.Protocol, sock=sock)

    run_gate(scenario, flaky_listen)
    assert calls[0].fileno() == -1  # the failed opening's descriptor was closed


def test_closing_while_reopening_leaves_nothing_accepting():
    servers = []

    def listen(sock: socket.socket):
        async def opened():
            server = await asyncio.get_running_loop().create_server(asyncio.Protocol, sock=sock)
            servers.append(server)
            return server

        return opened()

    async def scenario(gate_, other, clients):
        assert await gate_.open()
        clients.arrive()
        clients.leave()  # resumes: the opening is under way
        gate_.close()  # and the listener goes with it
        await until(lambda: gate_._opening is None)
        assert not gate_.accepting
        assert not any(server.is_serving() for server in servers)

    run_gate(scenario, listen)
