"""This process's id, read from the kernel once and again after each fork.

Log records and prometheus-client's multiprocess values would each ask the
kernel for it (getpid is a system call) on every line and every update, and
both happen for every client session.
"""

from __future__ import annotations

import os

_pid = os.getpid()


def current() -> int:
    return _pid


def _refresh() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_refresh)
