"""amqplexd under test: the real daemon, started as a subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import typing

from bench.daemon import free_ports
from tests.support.broker import BROKER_HOST, BROKER_PORT
from tests.support.waiting import wait_until

# Tests stop daemons often: a client a test left connected must not hold up
# the drain for the production default of 30 s.
TEST_ENV = {"AMQP_DRAIN_TIMEOUT": "2"}


def free_port() -> int:
    return free_ports(1)[0]


def wait_listening(port: int, deadline: float, process: subprocess.Popen | None = None) -> None:
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"amqplexd exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port}")


class Amqplexd:
    """One amqplexd process in front of the test broker (or `upstream`)."""

    def __init__(
        self,
        *args: str,
        upstream: str | None = None,
        env: dict | None = None,
        preexec_fn: typing.Callable[[], None] | None = None,
    ) -> None:
        self.port, self.status_port = free_ports(2)
        self.upstream = upstream or f"amqp://{BROKER_HOST}:{BROKER_PORT}"
        log_fd, self.log_path = tempfile.mkstemp(prefix="amqplexd-", suffix=".log")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "amqplex",
                self.upstream,
                "-l",
                "127.0.0.1",
                "-p",
                str(self.port),
                *args,
            ],
            stdout=log_fd,
            stderr=subprocess.STDOUT,
            env={
                **os.environ,
                **TEST_ENV,
                "AMQP_METRICS_PORT": str(self.status_port),
                **(env or {}),
            },
            preexec_fn=preexec_fn,
        )
        os.close(log_fd)
        wait_listening(self.port, time.monotonic() + 20, self.process)

    def log_text(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def log_lines(self) -> list[str]:
        return self.log_text().splitlines()

    def wait_for_log(self, text: str, timeout: float = 10) -> str:
        """The first log line with `text`, once one is written (workers
        write client-session lines in batches, within a second)."""

        def line() -> str | None:
            return next((line for line in self.log_lines() if text in line), None)

        return wait_until(line, timeout, what=f"{text!r} in the log")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        os.unlink(self.log_path)
        return self.process.returncode
