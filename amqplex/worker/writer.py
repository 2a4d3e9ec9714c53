"""Batched writes: every frame written during one loop turn leaves in one
call to the transport (one writev), instead of a syscall per frame; on an
upstream, with the channels of that turn taking turns (interleaved: in
Python here, the reference, and in C in _walk.c where it was built). A
reply that is all its turn writes may go at once (write_now)."""

import asyncio
import itertools
import typing

from pamqp import commands

from amqplex.protocol.constants import FRAME_METHOD
from amqplex.protocol.framing import _walk, method_index  # _walk: None where not built

# About how many chunks (frames, or whole messages) of one channel go in a
# row when one flush holds several channels'. RabbitMQ hands a channel only
# so many messages (its credit flow: 400, topped up by 200) ahead of what
# the channel has processed, and its connection's reader waits while one
# channel's run goes on: two publishers' 256 B messages sent directly on one
# connection went at 105-107k a second in runs of 230 messages a channel,
# 80-81k in runs of 7,000 (bench/RESULTS.md).
TURN = 64
# The methods whose runs take turns (pamqp's indices, as method_index reads
# them): streams. Any other method frame stays where it was
# written, and so does everything around it on its side of it: the broker
# sees control methods (Channel.Open and Close, declares, deletes,
# Connection.Close) in the order the proxy wrote them.
_STREAMED = frozenset(
    method.index
    for method in (
        commands.Basic.Publish,
        commands.Basic.Ack,
        commands.Basic.Reject,
        commands.Basic.Nack,
    )
)


class BatchedWriter:
    __slots__ = ("_transport", "_loop", "_chunks", "_scheduled", "_interleave", "last_write")

    def __init__(
        self,
        transport: asyncio.Transport,
        loop: asyncio.AbstractEventLoop,
        interleave: bool = False,
    ) -> None:
        self._transport = transport
        self._loop = loop
        self._chunks: list = []
        self._scheduled = False
        self._interleave = interleave
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

    def write_now(self, data: bytes) -> None:
        """write(), at once if nothing is waiting: for a reply that is all
        its turn writes (a short-lived client's handshake, channel open and
        close), which then needs no flush scheduled for it."""
        if self._chunks:
            self.write(data)
        elif not self._transport.is_closing():
            self._transport.write(data)
            self.last_write = self._loop.time()

    def flush(self) -> None:
        self._scheduled = False
        chunks, self._chunks = self._chunks, []
        if self._interleave and len(chunks) > 2 * TURN:
            chunks = interleaved(chunks)
        if chunks and not self._transport.is_closing():
            self._transport.writelines(chunks)
            self.last_write = self._loop.time()

    def buffered(self) -> int:
        """Bytes accepted but not yet sent to the peer."""
        return sum(map(len, self._chunks)) + self._transport.get_write_buffer_size()


def interleaved(chunks: list) -> list:
    """`chunks` with their channels taking turns of TURN chunks or so: each
    channel's own order kept, a turn ending only before a method frame (a
    message's frames stay together), and only streams reordered (_STREAMED):
    any other method frame is a fence that nothing crosses.

    A chunk is a whole frame or message as bytes, or, after a large body's
    7-byte header, that body's payload as a memoryview (framing.retarget,
    whole_publish): what every writer of an upstream hands over."""
    out: list = []
    segment: list = []
    for chunk in chunks:
        if (
            type(chunk) is not memoryview
            and chunk[0] == FRAME_METHOD
            and method_index(chunk) not in _STREAMED
        ):
            out += _taking_turns(segment)
            out.append(chunk)
            segment = []
        else:
            segment.append(chunk)
    out += _taking_turns(segment)
    return out


def _taking_turns(chunks: list) -> list:
    channels: dict[int, list] = {}
    current = None
    for chunk in chunks:
        if type(chunk) is memoryview:  # a payload: its header's channel
            if current is None:  # never first, by construction
                return chunks
            current.append(chunk)
            continue
        key = chunk[1] << 8 | chunk[2]
        current = channels.get(key)
        if current is None:
            current = channels[key] = []
        current.append(chunk)
    if len(channels) < 2 or max(map(len, channels.values())) <= TURN:
        return chunks
    out: list = []
    for turns in itertools.zip_longest(*map(_turns, channels.values()), fillvalue=()):
        for turn in turns:
            out += turn
    return out


def _turns(run: list) -> typing.Iterator[list]:
    """One channel's chunks in turns of TURN or so, each ending before a
    method frame."""
    start = 0
    while start < len(run):
        end = min(start + TURN, len(run))
        while end < len(run) and (type(run[end]) is memoryview or run[end][0] != FRAME_METHOD):
            end += 1
        yield run[start:end]
        start = end


# Every chunk of every upstream flush goes through interleaved(): in Python
# it was a fifth of a worker's CPU publishing small messages (over 700 ns a
# chunk; 20 compiled).
reference_interleaved = interleaved
if _walk is not None:

    def interleaved(chunks: list) -> list:
        return _walk.interleaved(chunks, TURN, _STREAMED)
