"""Giving memory back after bursts of large messages.

glibc keeps the blocks Python frees (large frames, write buffers) in its
heap, so a worker's resident size would stay at its high-water mark after
a burst of 64 KB messages; malloc_trim returns the free pages to the
system. Elsewhere (musl, macOS) this is a no-op.
"""

from __future__ import annotations

import asyncio
import ctypes

INTERVAL = 1.0


def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


def release_free_memory() -> None:
    if _TRIM is not None:
        _TRIM(0)


async def release_forever() -> None:
    while True:
        await asyncio.sleep(INTERVAL)
        release_free_memory()
