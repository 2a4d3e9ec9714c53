"""Load generator processes: started together, released at once, each
returning one result; everything bounded in time.

A worker function is called as fn(sync, *args). It calls sync.go() once its
setup is done (all workers then start together), and, for scenarios that
hold clients open, sync.ready() when they are up and sync.wait_release()
before tearing them down.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import queue
import signal
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, Protocol

# fork: workers inherit the pre-encoded frames and start in milliseconds.
CTX = multiprocessing.get_context("fork")


class BenchError(Exception):
    """A scenario failed: lost messages, refused clients, a timeout."""


class Sync:
    def __init__(self, parties: int, timeout: float) -> None:
        self.timeout = timeout
        self._go = CTX.Barrier(parties + 1)
        self._ready = CTX.Barrier(parties + 1)
        self._release = CTX.Event()

    def go(self) -> None:
        self._go.wait(self.timeout)

    def ready(self) -> None:
        self._ready.wait(self.timeout)

    def wait_release(self) -> None:
        if not self._release.wait(self.timeout):
            raise BenchError("never released")

    def abort(self) -> None:
        self._go.abort()
        self._ready.abort()


def _child(fn: Callable, index: int, args: tuple, sync: Sync, results: Any) -> None:
    try:
        value = fn(sync, *args)
    except BaseException:
        sync.abort()
        results.put((index, False, traceback.format_exc()))
    else:
        results.put((index, True, value))


class Group:
    """One process per entry of `args_list`, all running `fn`."""

    def __init__(self, name: str, fn: Callable, args_list: list[tuple], timeout: float) -> None:
        self.name = name
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.sync = Sync(len(args_list), timeout)
        self._results = CTX.Queue()
        self._procs = [
            CTX.Process(target=_child, args=(fn, i, args, self.sync, self._results), daemon=True)
            for i, args in enumerate(args_list)
        ]

    def __enter__(self) -> Group:
        for proc in self._procs:
            proc.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        for proc in self._procs:
            proc.join(max(0.1, self.deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                proc.join(5)

    def _barrier(self, barrier: threading.Barrier) -> None:
        try:
            barrier.wait(max(0.1, self.deadline - time.monotonic()))
        except threading.BrokenBarrierError:
            self.results()  # raises the worker's error if there is one
            raise BenchError(f"{self.name}: load generators not ready in time") from None

    def start(self) -> None:
        """Wait until every worker called go(), which releases them."""
        self._barrier(self.sync._go)

    def ready(self) -> None:
        """Wait until every worker called ready()."""
        self._barrier(self.sync._ready)

    def release(self) -> None:
        self.sync._release.set()

    def results(self) -> list[Any]:
        """Every worker's return value, in order; raises if any failed."""
        got: dict[int, tuple[bool, Any]] = {}
        while len(got) < len(self._procs):
            try:
                index, ok, value = self._results.get(
                    timeout=max(0.1, self.deadline - time.monotonic())
                )
            except queue.Empty:
                missing = len(self._procs) - len(got)
                raise BenchError(
                    f"{self.name}: {missing} load generator(s) not done in {self.timeout:.0f} s"
                ) from None
            got[index] = (ok, value)
            if not ok:
                self.sync.abort()
                raise BenchError(f"{self.name}: load generator {index} failed:\n{value}")
        return [got[i][1] for i in range(len(self._procs))]


class Meter(Protocol):
    def begin(self) -> None: ...
    def end(self) -> None: ...


def run(
    name: str, fn: Callable, args_list: list[tuple], timeout: float, meter: Meter | None = None
) -> list[Any]:
    """Run workers that only need go() and return their results. `meter` is
    started on release and stopped once every worker has returned."""
    with Group(name, fn, args_list, timeout) as group:
        group.start()
        if meter is not None:
            meter.begin()
        results = group.results()
        if meter is not None:
            meter.end()
        return results


SERVER_START_TIMEOUT = 10.0


def serve_loopback(
    factory: Callable[[asyncio.AbstractEventLoop], Callable[[], asyncio.Protocol]],
    report: Any,
) -> None:
    """A ChildServer's body: serve factory(loop)'s protocols on a free
    loopback port (uvloop when installed), send the port on `report`, run
    until SIGTERM."""
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(
        loop.create_server(factory(loop), "127.0.0.1", 0, backlog=4096)
    )
    report.send(server.sockets[0].getsockname()[1])
    loop.add_signal_handler(signal.SIGTERM, loop.stop)
    loop.run_forever()


class ChildServer:
    """A loopback server run in a child process by serve(*args, report),
    which calls report.send(port) once it listens; stopped on exit."""

    name = "server"

    def __init__(self, serve: Callable, *args: Any) -> None:
        self._serve = serve
        self._args = args
        self.port = 0
        self._proc = None

    @property
    def addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def __enter__(self) -> ChildServer:
        receive, send = CTX.Pipe(duplex=False)
        self._proc = CTX.Process(target=self._serve, args=(*self._args, send), daemon=True)
        self._proc.start()
        if not receive.poll(SERVER_START_TIMEOUT):
            self.__exit__()
            raise BenchError(f"{self.name} did not start")
        self.port = receive.recv()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
