"""Polling with a deadline: the tests' stand-in for an event they cannot get."""

from __future__ import annotations

import time
import typing

T = typing.TypeVar("T")


def wait_until(
    predicate: typing.Callable[[], T],
    timeout: float = 15,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """Poll until `predicate()` is truthy and return its value; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)
