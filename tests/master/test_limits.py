"""The master raises its soft open-files limit to the hard limit at start and
says in the log what the limit is (a warning when it is low), for itself
and the workers it forks."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from amqplex.master.limits import LOW_NOFILE
from tests.support.broker import BROKER_HOST, BROKER_PORT
from tests.support.daemon import TEST_ENV, free_port, wait_listening

START_SOFT = 256


def open_files_limits(pid: int) -> tuple[int, int]:
    """(soft, hard) RLIMIT_NOFILE of a running process, as the kernel has it."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no open-files line in /proc/{pid}/limits")


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()]


def wait_until(predicate, timeout: float = 15):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)
    return value


class LimitedDaemon:
    """amqplexd started under RLIMIT_NOFILE (soft, hard), as a shell's
    `ulimit -Sn` or a bare init would leave it."""

    def __init__(self, soft: int, hard: int) -> None:
        self.port = free_port()
        log_fd, self.log_path = tempfile.mkstemp(prefix="amqplexd-limits-", suffix=".log")

        def lower_limits() -> None:  # in the child, before exec
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "amqplex",
                f"amqp://{BROKER_HOST}:{BROKER_PORT}",
                "-l",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-w",
                "1",
            ],
            stdout=log_fd,
            stderr=subprocess.STDOUT,
            # Its status port too: the default (port + 1) may be another daemon's.
            env={**os.environ, **TEST_ENV, "AMQP_METRICS_PORT": str(free_port())},
            preexec_fn=lower_limits,
        )
        os.close(log_fd)
        wait_listening(self.port, time.monotonic() + 20, self.process)

    def log_lines(self) -> list[str]:
        return Path(self.log_path).read_text(errors="replace").splitlines()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        os.unlink(self.log_path)


@pytest.fixture
def limited_daemon():
    started: list[LimitedDaemon] = []

    def start(soft: int, hard: int) -> LimitedDaemon:
        daemon = LimitedDaemon(soft, hard)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


def test_master_raises_soft_limit_to_hard_limit_and_logs_it(limited_daemon):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard <= START_SOFT:
        pytest.skip(f"hard open-files limit here is {hard}")
    daemon = limited_daemon(START_SOFT, hard)
    assert open_files_limits(daemon.process.pid) == (hard, hard)
    # Forked after the raise: the worker has it too.
    worker = wait_until(lambda: children(daemon.process.pid))[0]
    assert open_files_limits(worker)[0] == hard
    said = [line for line in daemon.log_lines() if f"open-files limit is {hard}" in line]
    assert len(said) == 1, daemon.log_lines()
    level = "WARNING" if hard < LOW_NOFILE else "INFO"
    assert f" {level} amqplex.master.limits: " in said[0]


def test_master_warns_when_the_raised_limit_is_still_low(limited_daemon):
    low_hard = 4096
    assert low_hard < LOW_NOFILE
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < low_hard:
        pytest.skip("hard open-files limit here is below the test's")
    daemon = limited_daemon(START_SOFT, low_hard)
    assert open_files_limits(daemon.process.pid) == (low_hard, low_hard)
    said = [line for line in daemon.log_lines() if "open-files limit is 4096" in line]
    assert len(said) == 1, daemon.log_lines()
    assert " WARNING amqplex.master.limits: " in said[0]
    assert "LimitNOFILE=" in said[0]  # tells the operator how to raise it
