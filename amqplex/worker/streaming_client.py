"""A client that streams, read straight into a buffer of its own.

Sessions start as an asyncio Protocol: the event loop reads every client
into one shared buffer and hands data_received a bytes copy of each read.
For the many clients that send a frame at a time that is the cheapest way
(one Python call a read, no memory of their own). A client whose reads are
large (big messages, or small ones back to back) pays for that copy on every
byte: 13% of a worker's CPU when publishing 64 KB messages, plus a join for
each frame that spans reads. Such a client's transport is switched to this
BufferedProtocol, so the kernel reads into the FrameReader's buffer and
large bodies leave as views of it (see FrameReader); the session is the
same. A read smaller than that which drained the socket, with no frame
left incomplete, switches it back.
"""

from __future__ import annotations

import asyncio
import logging
import typing

from amqplex.protocol.errors import ConnectionException
from amqplex.protocol.framing import FrameReader

if typing.TYPE_CHECKING:
    from amqplex.worker.session import ClientSession

log = logging.getLogger(__name__)

STREAMING_READ = 1 << 15
"""A client read this large (bytes) is streaming: it is switched, and back
after a smaller one. A client sending a frame at a time reads far less, a
few hundred bytes a read."""


class StreamingClient(asyncio.BufferedProtocol):
    __slots__ = ("session", "reader", "get_buffer")

    def __init__(self, session: ClientSession, reader: FrameReader) -> None:
        self.session = session
        self.reader = reader
        # The loop asks for a buffer before every read: the reader's.
        self.get_buffer = reader.get_buffer

    def buffer_updated(self, nbytes: int) -> None:
        session = self.session
        session.received(nbytes)
        try:
            frames = self.reader.frames(nbytes)
        except ConnectionException as error:
            session.fail(error)
            return
        session.frames_received(frames)
        reader, transport = self.reader, session.transport
        if (
            nbytes < STREAMING_READ
            and reader.drained
            and not reader.buffered
            and not transport.is_closing()
        ):
            # The stream has stopped: back to the shared read buffer, and
            # the reader lets go of its own (the transport may keep this
            # object until the client streams again or leaves).
            transport.set_protocol(session)
            reader.release()
            log.debug("client %s stopped streaming", session.peer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.connection_lost(exc)

    def pause_writing(self) -> None:
        self.session.pause_writing()

    def resume_writing(self) -> None:
        self.session.resume_writing()


def switch(session: ClientSession, transport: asyncio.Transport, held: bytes) -> None:
    """From now on read `session`'s client into a buffer of its own; `held`
    is what was read of a frame not yet complete, which comes first."""
    reader = FrameReader(session.frame_max, slack=session.splitter.slack)
    if held:
        reader.feed(held)  # an incomplete frame: no frames come out yet
    transport.set_protocol(StreamingClient(session, reader))
    log.debug("client %s streams: reading it into a buffer of its own", session.peer)
