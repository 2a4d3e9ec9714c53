"""The master raises its soft open-files limit to the hard limit at start and
says in the log what the limit is (a warning when it is low), for itself
and the workers it forks."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest

from amqplex.master.limits import LOW_NOFILE
from tests.support.waiting import wait_until

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


def lowered(soft: int, hard: int):
    """A preexec_fn starting the daemon under RLIMIT_NOFILE (soft, hard), as a
    shell's `ulimit -Sn` or a bare init would leave it."""

    def lower_limits() -> None:  # in the child, before exec
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return lower_limits


def test_master_raises_soft_limit_to_hard_limit_and_logs_it(fresh_amqplexd):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard <= START_SOFT:
        pytest.skip(f"hard open-files limit here is {hard}")
    daemon = fresh_amqplexd(preexec_fn=lowered(START_SOFT, hard))
    assert open_files_limits(daemon.process.pid) == (hard, hard)
    # Forked after the raise: the worker has it too.
    worker = wait_until(lambda: children(daemon.process.pid))[0]
    assert open_files_limits(worker)[0] == hard
    said = [line for line in daemon.log_lines() if f"open-files limit is {hard}" in line]
    assert len(said) == 1, daemon.log_lines()
    level = "WARNING" if hard < LOW_NOFILE else "INFO"
    assert f" {level} amqplex.master.limits: " in said[0]


def test_master_warns_when_the_raised_limit_is_still_low(fresh_amqplexd):
    low_hard = 4096
    assert low_hard < LOW_NOFILE
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < low_hard:
        pytest.skip("hard open-files limit here is below the test's")
    daemon = fresh_amqplexd(preexec_fn=lowered(START_SOFT, low_hard))
    assert open_files_limits(daemon.process.pid) == (low_hard, low_hard)
    said = [line for line in daemon.log_lines() if "open-files limit is 4096" in line]
    assert len(said) == 1, daemon.log_lines()
    assert " WARNING amqplex.master.limits: " in said[0]
    assert "LimitNOFILE=" in said[0]  # tells the operator how to raise it
