"""Batched writes: every frame written during one loop turn leaves in one
call to the transport (one writev), instead of a syscall per frame."""

import asyncio
import typing


class BatchedWriter:
    __slots__ = ("_transport", "_loop", "_chunks", "_scheduled", "last_write")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._chunks: list = []
        self._scheduled = False
        self.last_write = loop.time()

    def write(self, data: bytes) -> None:
        self._chunks.append(data)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def write_many(self, frames: typing.Iterable) -> None:
        self._chunks.extend(frames)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        chunks, self._chunks = self._chunks, []
        if chunks and not self._transport.is_closing():
            self._transport.writelines(chunks)
            self.last_write = self._loop.time()

    def buffered(self) -> int:
        """Bytes accepted but not yet sent to the peer."""
        return sum(map(len, self._chunks)) + self._transport.get_write_buffer_size()
