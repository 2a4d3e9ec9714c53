"""A TCP relay the tests own, between amqplexd and the broker.

It forwards bytes both ways, records them per connection (so a test can read
the proxy's upstream AMQP stream frame by frame) and injects faults: sever
every connection, stall a direction, add latency per chunk, refuse new
connections, tell the proxy a smaller frame_max than the broker's. It runs
its own asyncio loop in a background thread, so synchronous pytest tests
drive it with plain method calls.

Directions are named from the proxy's side: UP is proxy -> broker, DOWN is
broker -> proxy. Every chunk read is stamped with a relay-wide sequence
number, so frames of both directions of a connection (and of different
connections) can be put in the order the relay saw them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import typing

from amqplex.protocol import methods
from amqplex.protocol.constants import FRAME_METHOD, PROTOCOL_HEADER
from amqplex.protocol.framing import FrameReader
from tests.support.broker import BROKER_HOST, BROKER_PORT

UP = "up"
DOWN = "down"
BOTH = (UP, DOWN)
_CHUNK = 65536
_CONTROL_TIMEOUT = 10.0


@dataclasses.dataclass(frozen=True, slots=True)
class Chunk:
    seq: int
    time: float
    data: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class RecordedFrame:
    """One frame the relay carried: `seq` is that of the chunk that completed it."""

    seq: int
    time: float
    direction: str
    frame_type: int
    channel: int
    raw: bytes
    # The decoded method for method frames, else None.
    method: typing.Any = None


class RelayConnection:
    """One proxied TCP connection and what travelled on it."""

    def __init__(self, relay: Relay, number: int) -> None:
        self.relay = relay
        self.number = number
        self.chunks: dict[str, list[Chunk]] = {UP: [], DOWN: []}
        self.closed = False
        # Reset at once because the relay was refusing (see Relay.refuse).
        self.refused = False
        self._transports: list[asyncio.BaseTransport] = []

    def __repr__(self) -> str:
        return f"<RelayConnection {self.number} closed={self.closed}>"

    def data(self, direction: str) -> bytes:
        return b"".join(chunk.data for chunk in list(self.chunks[direction]))

    def frames(self, direction: str) -> list[RecordedFrame]:
        """The AMQP frames of one direction so far (UP skips the 8-byte protocol
        header); an incomplete last frame is left out."""
        reader = FrameReader(1 << 30)
        skip = len(PROTOCOL_HEADER) if direction == UP else 0
        frames: list[RecordedFrame] = []
        for chunk in list(self.chunks[direction]):
            data = chunk.data
            if skip:
                taken = min(skip, len(data))
                skip -= taken
                data = data[taken:]
                if not data:
                    continue
            for frame_type, channel, raw in reader.feed(data):
                method = methods.decode(raw) if frame_type == FRAME_METHOD else None
                frames.append(
                    RecordedFrame(
                        chunk.seq, chunk.time, direction, frame_type, channel, raw, method
                    )
                )
        return frames

    def timeline(self) -> list[RecordedFrame]:
        """Both directions' frames in the order the relay read them."""
        frames = self.frames(UP) + self.frames(DOWN)
        # Stable: frames of one chunk keep their order.
        frames.sort(key=lambda frame: frame.seq)
        return frames


class Relay:
    """Listens on 127.0.0.1:<free port> and forwards each connection to the
    target (the broker by default)."""

    def __init__(self, target_host: str = BROKER_HOST, target_port: int = BROKER_PORT) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.connections: list[RelayConnection] = []
        self.seq = 0
        self._delay = {UP: 0.0, DOWN: 0.0}
        # While set, new connections are reset at once: "the broker is away".
        self.refusing = False
        # While set, the broker's Connection.Tune reaches new connections
        # with this frame_max instead of its own.
        self.tune_frame_max: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._flowing: dict[str, asyncio.Event] = {}
        # Per connection: the task that handles it, and the tasks that write
        # each direction out.
        self._handlers: set[asyncio.Task] = set()
        self._senders: set[asyncio.Task] = set()
        self._ready = threading.Event()
        self._start_error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"amqp://127.0.0.1:{self.port}"

    @property
    def connection_count(self) -> int:
        """Connections accepted since start (refused ones included)."""
        return len(self.connections)

    @property
    def open_connections(self) -> list[RelayConnection]:
        return [conn for conn in list(self.connections) if not conn.closed]

    def mark(self) -> int:
        """A point in the relay's order: chunks read before this call have
        seq <= mark, chunks read after it have seq > mark."""
        return self.seq

    # -- life --------------------------------------------------------------------

    def start(self, timeout: float = _CONTROL_TIMEOUT) -> Relay:
        self._thread = threading.Thread(target=self._run, name="relay", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("relay did not start")
        if self._start_error is not None:
            raise self._start_error
        return self

    def stop(self, timeout: float = _CONTROL_TIMEOUT) -> None:
        if self._loop is None or self._thread is None:
            return
        if self._thread.is_alive():
            self._call(self._shutdown(), timeout)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("relay thread did not stop")

    def __enter__(self) -> Relay:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._listen())
        except BaseException as error:  # reported by start()
            self._start_error = error
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _listen(self) -> None:
        self._flowing = {direction: asyncio.Event() for direction in BOTH}
        for event in self._flowing.values():
            event.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        self._server.close()
        await self._sever()
        # Senders may wait on a delay or a stall; the connection handlers end
        # on their own once their sockets are gone (cancelling them would make
        # asyncio's stream callback log the cancellation).
        for task in list(self._senders):
            task.cancel()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=_CONTROL_TIMEOUT / 2)
        # Let the aborted transports finish closing before the loop stops.
        await asyncio.sleep(0)

    # -- fault injection (callable from any thread) -------------------------------

    def sever(self) -> None:
        """Cut every open connection now (both sockets reset, nothing flushed)."""
        self._call(self._sever())

    def stall(self, direction: str | tuple[str, ...] = BOTH) -> None:
        """Stop forwarding in `direction` (bytes are still read and recorded,
        and delivered once resumed)."""
        self._call(self._set_flow(_directions(direction), False))

    def resume(self, direction: str | tuple[str, ...] = BOTH) -> None:
        self._call(self._set_flow(_directions(direction), True))

    def refuse(self, refusing: bool = True) -> None:
        """Reset new connections at once (the broker is away) until refuse(False)."""
        self.refusing = refusing

    def offer_frame_max(self, frame_max: int | None) -> None:
        """Connections from now on are offered `frame_max` in the broker's
        Connection.Tune (None: the broker's own). The proxy's TuneOk then
        says it, and the broker holds the connection to it: a larger frame
        gets 501 and the connection closed, as from a broker configured so."""
        self.tune_frame_max = frame_max

    def delay(self, seconds: float, direction: str | tuple[str, ...] = BOTH) -> None:
        """Hold every chunk read from now on `seconds` before forwarding it."""
        for name in _directions(direction):
            self._delay[name] = seconds

    def _call(self, coroutine: typing.Coroutine, timeout: float = _CONTROL_TIMEOUT) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    async def _sever(self) -> None:
        for conn in self.connections:
            conn.closed = True
            for transport in conn._transports:
                transport.abort()

    async def _set_flow(self, directions: tuple[str, ...], flowing: bool) -> None:
        for name in directions:
            if flowing:
                self._flowing[name].set()
            else:
                self._flowing[name].clear()

    # -- forwarding ---------------------------------------------------------------

    async def _accept(self, client_reader, client_writer) -> None:
        conn = RelayConnection(self, len(self.connections))
        self.connections.append(conn)
        conn._transports.append(client_writer.transport)
        if self.refusing:
            conn.refused = conn.closed = True
            client_writer.transport.abort()
            return
        task = asyncio.current_task()
        self._handlers.add(task)
        try:
            try:
                broker_reader, broker_writer = await asyncio.wait_for(
                    asyncio.open_connection(*self.target), _CONTROL_TIMEOUT
                )
            except (OSError, TimeoutError):
                client_writer.transport.abort()
                return
            conn._transports.append(broker_writer.transport)
            if conn.closed:  # severed while dialling
                broker_writer.transport.abort()
                client_writer.transport.abort()
                return
            await asyncio.gather(
                self._pipe(conn, UP, client_reader, broker_writer),
                self._pipe(conn, DOWN, broker_reader, client_writer),
                return_exceptions=True,
            )
        finally:
            conn.closed = True
            for transport in conn._transports:
                transport.abort()
            self._handlers.discard(task)

    async def _pipe(self, conn: RelayConnection, direction: str, reader, writer) -> None:
        """Read, record and queue chunks; a second task writes them out after
        their delay and while the direction flows, keeping their order."""
        retune = self.tune_frame_max if direction == DOWN else None
        queue: asyncio.Queue = asyncio.Queue()
        sender = asyncio.create_task(self._send(direction, queue, writer))
        self._senders.add(sender)
        sender.add_done_callback(self._senders.discard)
        try:
            while True:
                try:
                    data = await reader.read(_CHUNK)
                except (OSError, asyncio.IncompleteReadError):
                    data = b""
                if not data:
                    break
                if retune is not None and (tuned := _retuned(data, retune)) is not None:
                    data, retune = tuned, None
                self.seq += 1
                conn.chunks[direction].append(Chunk(self.seq, time.monotonic(), data))
                queue.put_nowait((time.monotonic() + self._delay[direction], data))
        finally:
            queue.put_nowait(None)
            await asyncio.gather(sender, return_exceptions=True)

    async def _send(self, direction: str, queue: asyncio.Queue, writer) -> None:
        try:
            while (item := await queue.get()) is not None:
                deliver_at, data = item
                wait = deliver_at - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self._flowing[direction].wait()
                if writer.transport.is_closing():
                    return
                writer.write(data)
                await writer.drain()
            # The source closed: what it sent is delivered, now close the other side.
            writer.transport.close()
        except (OSError, ConnectionError):
            writer.transport.abort()


def _directions(direction: str | tuple[str, ...]) -> tuple[str, ...]:
    names = (direction,) if isinstance(direction, str) else tuple(direction)
    for name in names:
        if name not in BOTH:
            raise ValueError(f"direction must be {UP!r} or {DOWN!r}, got {name!r}")
    return names


# A Connection.Tune frame: type 1 on channel 0, then (after the payload
# size) class 10 method 30, channel_max and frame_max.
_TUNE_FRAME = bytes.fromhex("010000")
_TUNE_METHOD = bytes.fromhex("000a001e")


def _retuned(data: bytes, frame_max: int) -> bytes | None:
    """`data` with the Connection.Tune in it offering `frame_max`; None if
    it holds no Tune (it comes in a chunk of its own, after Start)."""
    at = data.find(_TUNE_METHOD)
    if at < 7 or data[at - 7 : at - 4] != _TUNE_FRAME:
        return None
    offset = at + 6  # past the method id and channel_max
    return data[:offset] + frame_max.to_bytes(4, "big") + data[offset + 4 :]
