"""How a worker's memory behaves under streams of large messages (glibc).

By default glibc maps every block over 128 KB (a whole 64 KB frame joined
from two reads, a 256 KB read) with mmap of its own, raising that threshold
as such blocks are freed, and hands the top of its heap back to the system
on every free past a second threshold. A stream of 64 KB messages then maps,
faults in and unmaps the same pages again and again: a quarter of a worker's
time went to page faults. So the thresholds are fixed (tune_allocator):
large frames live in the heap and reuse its pages.

The other half: glibc keeps what Python frees in its heap, so a worker's
resident size would stay at its high-water mark after a burst; malloc_trim,
once a second, returns the free pages to the system (release_forever).

Elsewhere (musl, macOS) both are no-ops.
"""

from __future__ import annotations

import asyncio
import ctypes

INTERVAL = 1.0
# Blocks below this come from the heap: frames are at most frame_max
# (128 KB from RabbitMQ) and reads 256 KB; only rare, larger ones get an mmap.
MMAP_THRESHOLD = 4 << 20
# Free heap top kept between trims rather than given back on each free.
TRIM_THRESHOLD = 32 << 20
# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


_LIBC = _libc()


def tune_allocator() -> None:
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def release_free_memory() -> None:
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


async def release_forever() -> None:
    while True:
        await asyncio.sleep(INTERVAL)
        release_free_memory()
