"""The workers' shared client counts (amqplex/board.py)."""

from __future__ import annotations

import os

from amqplex.board import NOT_ACCEPTING, Board


def test_a_worker_reads_the_clients_of_every_worker_that_accepts():
    board = Board(8)
    first, second, third = board.claim(), board.claim(), board.claim()
    first.post(5)
    second.post(2)
    third.post(3)
    assert first.counts() == [5, 2, 3]
    second.leave()  # stopped or draining: it no longer counts
    assert first.counts() == [5, 3]


def test_a_reaped_workers_slot_no_longer_counts_and_goes_to_the_next_worker():
    board = Board(8)
    first, second = board.claim(), board.claim()
    first.post(4)
    second.post(1)
    board.release(second)
    assert first.counts() == [4]
    assert board.slots[second.index] == NOT_ACCEPTING
    assert board.claim().index == second.index


def test_claim_gives_nothing_once_every_slot_is_taken():
    board = Board(2)
    assert board.claim() is not None and board.claim() is not None
    assert board.claim() is None


def test_a_forked_worker_posts_where_the_others_read():
    board = Board(8)
    master_side, worker_side = board.claim(), board.claim()
    master_side.post(7)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            worker_side.post(3)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert master_side.counts() == [7, 3]
