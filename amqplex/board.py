"""How many clients each worker holds, in memory the master maps before it
forks, so a worker can tell it holds more than its share (worker/gate.py).

One 8-byte slot per worker process, written by that worker while it lives;
the master hands slots out at fork and takes them back when it reaps the
worker. A slot of a worker that is not accepting (stopped, draining, gone)
holds NOT_ACCEPTING (the master writes it when it takes the slot back) and
is left out of what the others read.
"""

from __future__ import annotations

import mmap

NOT_ACCEPTING = 2**62
# Workers alive at once, old generations draining after a reload included;
# a worker forked when every slot is taken does without one (never stops).
CAPACITY = 128


class Board:
    def __init__(self, capacity: int = CAPACITY) -> None:
        # Anonymous and MAP_SHARED: forked workers write the same pages.
        self._map = mmap.mmap(-1, (capacity + 1) * 8)
        words = memoryview(self._map).cast("q")
        # The first word: how many slots have ever been handed out, so that
        # a worker reads only those (the lowest free slot goes first).
        self._used = words[:1]
        self.slots = words[1:]
        for index in range(capacity):
            self.slots[index] = NOT_ACCEPTING
        self._free = list(range(capacity - 1, -1, -1))

    def claim(self) -> Seat | None:
        """A slot for the worker about to be forked (the master's side)."""
        if not self._free:
            return None
        self._free.sort(reverse=True)
        index = self._free.pop()
        self._used[0] = max(self._used[0], index + 1)
        return Seat(self.slots, self._used, index)

    def release(self, seat: Seat) -> None:
        """The worker is gone: its slot no longer counts (the master's side)."""
        self.slots[seat.index] = NOT_ACCEPTING
        self._free.append(seat.index)


class Seat:
    """One worker's slot, and what it reads of the others (the worker's side)."""

    __slots__ = ("slots", "used", "index")

    def __init__(self, slots: memoryview, used: memoryview, index: int) -> None:
        self.slots = slots
        self.used = used
        self.index = index

    def post(self, clients: int) -> None:
        self.slots[self.index] = clients

    def leave(self) -> None:
        self.slots[self.index] = NOT_ACCEPTING

    @property
    def accepting(self) -> bool:
        """Whether its worker accepts clients (the master's side reads it)."""
        return self.slots[self.index] != NOT_ACCEPTING

    def counts(self) -> list[int]:
        """Clients of every accepting worker, this one included."""
        return [n for n in self.slots[: self.used[0]] if n != NOT_ACCEPTING]
