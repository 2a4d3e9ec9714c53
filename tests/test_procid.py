"""procid: the process id, cached, and right again in a forked child (the
workers are forked from the master)."""

from __future__ import annotations

import os

from amqplex import procid


def test_current_is_this_process():
    assert procid.current() == os.getpid()


def test_a_forked_child_sees_its_own_id():
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            os.write(write, f"{procid.current()} {os.getpid()}".encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        seen, actual = map(int, pipe.read().split())
    os.waitpid(child, 0)
    assert seen == actual == child != procid.current()
