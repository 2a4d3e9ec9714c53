"""One long-lived AMQP connection to the broker, shared by many clients'
channels. It dials and authenticates with one (user, password, vhost), hands
out channel ids, keeps its heartbeat with the broker, and routes each frame
it reads: what the broker sends on a channel a client holds goes straight to
that client's session, renumbered in the read buffer (routes, cut_routed),
except the methods the proxy acts on (_WATCHED), which go, like everything
else, to the UpstreamChannel that owns the frame's channel id."""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import time
import typing

from pamqp import commands

from amqplex import __version__, tls
from amqplex.config import UpstreamConfig
from amqplex.protocol import methods
from amqplex.protocol.auth import Credentials, plain_response
from amqplex.protocol.constants import (
    FRAME_METHOD,
    HEARTBEAT_FRAME,
    PROTOCOL_HEADER,
    ReplyCode,
)
from amqplex.protocol.errors import AMQPError
from amqplex.protocol.framing import ROUTED, FrameReader, Route, rewrite_channel
from amqplex.worker import client_channel, upstream_channel
from amqplex.worker.upstream_channel import UpstreamChannel
from amqplex.worker.writer import BatchedWriter

if typing.TYPE_CHECKING:
    from amqplex.worker.pool import Pool

log = logging.getLogger(__name__)

# What the proxy asks of the broker: every capability a client might rely on,
# so that each client can then be given exactly what it advertised itself.
CLIENT_PROPERTIES = {
    "product": "amqplex",
    "version": __version__,
    "platform": "Python",
    "capabilities": {
        "authentication_failure_close": True,
        "basic.nack": True,
        "connection.blocked": True,
        "consumer_cancel_notify": True,
        "exchange_exchange_bindings": True,
        "per_consumer_qos": True,
        "publisher_confirms": True,
    },
}
_HANDSHAKE_FRAME_MAX = 1 << 20
WRITE_BUFFER_HIGH = 4 * 1024 * 1024
# A read under this is small: read_gather may wait before the next one.
GATHER_BELOW = 32 * 1024
# How long a polite Connection.Close waits for the broker's CloseOk.
CLOSE_TIMEOUT = 5.0
_CHANNEL_OPEN = methods.encode(0, commands.Channel.Open())
_CHANNEL_CLOSE = methods.encode(
    0, commands.Channel.Close(reply_code=200, reply_text="Goodbye", class_id=0, method_id=0)
)
_CHANNEL_CLOSE_OK = methods.encode(0, commands.Channel.CloseOk())
# Methods from the broker that the two sides of a channel act on; all others
# on a client's channel go straight to its session.
_WATCHED = upstream_channel.WATCHED | client_channel.WATCHED


class UpstreamRefused(Exception):
    """The broker would not log in or open the vhost; the client gets this
    Close, as the broker wrote it."""

    def __init__(self, code: int, text: str, class_id: int = 0, method_id: int = 0) -> None:
        super().__init__(text)
        self.code = code
        self.text = text
        self.class_id = class_id
        self.method_id = method_id


class Upstream(asyncio.BufferedProtocol):
    def __init__(self, pool: Pool | None, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.writer: BatchedWriter | None = None
        self.reader = FrameReader(_HANDSHAKE_FRAME_MAX)
        # The event loop asks for a buffer before every read: the reader's.
        self.get_buffer = self.reader.get_buffer
        self.slots: dict[int, UpstreamChannel] = {}
        # Channels whose frames from the broker go straight to their client's
        # session, renumbered where they were read (see UpstreamChannel.attach).
        self.routes: dict[int, Route] = {}
        self.free_ids: collections.deque[int] = collections.deque()
        # Client channels it carries now (UpstreamChannel.attach/detach), its
        # open channels nobody uses, kept ready by the pool, and the channels
        # being opened to join them.
        self.carried = 0
        self.idle: collections.deque[UpstreamChannel] = collections.deque()
        self.idle_opening = 0
        self.server_properties: dict = {}
        self.channel_max = 0
        self.frame_max = 0
        self.heartbeat = 0
        self.blocked = False
        # Connection.Blocked's reason ("low on memory"), told to clients as is.
        self.blocked_reason = ""
        self.closed = False
        self.close_reason = "upstream connection lost"
        # Closed on purpose (idle sweep, shutdown): not a loss to report.
        self.closed_on_purpose = False
        # Since when no client channel used it (the pool's idle sweep).
        self.idle_since: float | None = None
        self.paused = False
        self._last_read = loop.time()
        # upstream.read_gather, once serving (0: never during the handshake);
        # when the last small read came, and whether reading waits now.
        self.read_gather = 0.0
        self._small_read = -math.inf
        self._gathering = False
        self._handshake_frames: asyncio.Queue | None = asyncio.Queue()
        self._heartbeat_timer: asyncio.TimerHandle | None = None
        # Client sessions paused because this connection's send buffer is full.
        self._stalled_sessions: set = set()
        # Client sessions this connection stopped reading for (see hold_reading).
        self._holders: set = set()
        # Departed clients' queues waiting for a free channel id (delete_queues).
        self._undeleted: list[str] = []

    # -- dialling -------------------------------------------------------
    #
    # Two steps, as a client's own handshake has them: log in (the broker
    # checks the password after StartOk), then open a vhost (it checks the
    # user's permission at Open). The proxy answers a client's StartOk only
    # after the first step, and its Open only after the second.

    @classmethod
    async def open(
        cls,
        pool: Pool,
        config: UpstreamConfig,
        credentials: Credentials,
        vhost: str,
        max_channels: int,
    ) -> Upstream:
        """Dial, log in and open `vhost`; UpstreamRefused if the broker says
        no, OSError or TimeoutError if it cannot be reached."""
        upstream = await cls.login(config, credentials, max_channels)
        await upstream.open_vhost(pool, vhost, config.connect_timeout)
        return upstream

    @classmethod
    async def login(
        cls, config: UpstreamConfig, credentials: Credentials, max_channels: int
    ) -> Upstream:
        """Dial and authenticate, up to TuneOk: no vhost is open yet."""
        loop = asyncio.get_running_loop()
        _, upstream = await asyncio.wait_for(
            tls.create_connection(loop, lambda: cls(None, loop), config),
            config.connect_timeout,
        )
        try:
            await asyncio.wait_for(
                upstream._login(config, credentials, max_channels), config.connect_timeout
            )
        except BaseException:
            upstream.abort()
            raise
        return upstream

    async def _login(
        self, config: UpstreamConfig, credentials: Credentials, max_channels: int
    ) -> None:
        self._write_handshake(PROTOCOL_HEADER)
        start = await self._expect(commands.Connection.Start)
        self.server_properties = start.server_properties
        self._send(
            commands.Connection.StartOk(
                client_properties=dict(
                    CLIENT_PROPERTIES, connection_name=f"amqplex pid {os.getpid()}"
                ),
                mechanism="PLAIN",
                response=plain_response(credentials),
                locale="en_US",
            )
        )
        tune = await self._expect(commands.Connection.Tune)
        broker_channel_max = tune.channel_max or 65535
        self.channel_max = min(broker_channel_max, max_channels)
        self.frame_max = tune.frame_max or _HANDSHAKE_FRAME_MAX
        self.heartbeat = negotiate_heartbeat(tune.heartbeat, config.heartbeat)
        self._send(
            commands.Connection.TuneOk(
                channel_max=self.channel_max,
                frame_max=self.frame_max,
                heartbeat=self.heartbeat,
            )
        )

    async def open_vhost(self, pool: Pool, vhost: str, timeout: float) -> None:
        """Open `vhost` on a logged-in connection and start serving `pool`."""
        try:
            self._send(commands.Connection.Open(virtual_host=vhost))
            await asyncio.wait_for(self._expect(commands.Connection.OpenOk), timeout)
        except BaseException:
            self.abort()
            raise
        self.pool = pool
        self.reader.frame_max = self.frame_max
        self.free_ids.extend(range(1, self.channel_max + 1))
        self.writer = BatchedWriter(self.transport, self.loop, interleave=True)
        self._handshake_frames = None
        self.read_gather = pool.config.upstream.read_gather
        if self.heartbeat:
            self._heartbeat_timer = self.loop.call_later(self.heartbeat / 2, self._heartbeat_tick)

    def discard_login(self) -> None:
        """Give up a logged-in connection no vhost was opened on."""
        if self.transport is not None and not self.transport.is_closing():
            self._send(
                commands.Connection.Close(
                    reply_code=200, reply_text="Goodbye", class_id=0, method_id=0
                )
            )
            self.transport.close()

    async def _expect(self, method_class: type[methods.Method]) -> methods.Method:
        while True:
            frame_type, _, frame = await self._handshake_frames.get()
            if frame_type is None:
                raise ConnectionResetError(self.close_reason)
            if frame_type != FRAME_METHOD:
                continue
            method = methods.decode(frame)
            if isinstance(method, method_class):
                return method
            if isinstance(method, commands.Connection.Close):
                self.transport.write(methods.encode(0, commands.Connection.CloseOk()))
                raise UpstreamRefused(
                    method.reply_code, method.reply_text, method.class_id, method.method_id
                )
            raise UpstreamRefused(
                ReplyCode.INTERNAL_ERROR,
                f"INTERNAL_ERROR - broker sent {method.name} during handshake",
            )

    def _send(self, method: methods.Method) -> None:
        self._write_handshake(methods.encode(0, method))

    def _write_handshake(self, data: bytes) -> None:
        # The broker (or whatever is in between) may hang up before we speak.
        # Then connection_lost is on its way: _expect raises with its reason
        # (a TLS alert, say), which is not known yet here.
        if self.transport.is_closing():
            return
        self.transport.write(data)

    # -- channels -------------------------------------------------------

    @property
    def has_room(self) -> bool:
        return not self.closed and bool(self.free_ids)

    def open_channel(self) -> UpstreamChannel:
        """Take a free channel id and open it; the broker's OpenOk goes to
        the UpstreamChannel."""
        uid = self.free_ids.popleft()
        slot = UpstreamChannel(self, uid)
        self.slots[uid] = slot
        self.writer.write(rewrite_channel(_CHANNEL_OPEN, slot.uid_bytes))
        return slot

    def open_idle_channel(self) -> None:
        """Open a channel for the pool to keep ready (Pool.add_idle once open)."""
        self.open_channel().for_idle = True
        self.idle_opening += 1

    def idle_opened(self, slot: UpstreamChannel) -> None:
        if slot.for_idle:
            slot.for_idle = False
            self.idle_opening -= 1

    def delete_queues(self, names: list[str]) -> None:
        """Delete queues this connection owns (a departed client's exclusive
        queues) on a channel of their own, closed behind them: a new one, or
        one kept idle when every id is in use, or else the first channel
        freed or given back (release, spare)."""
        if self.has_room:
            self._delete_on(self.open_channel(), names)
        elif self.idle:
            self._delete_on(self.idle.popleft(), names)
        else:
            self._undeleted.extend(names)

    def spare(self, slot: UpstreamChannel) -> bool:
        """Whether `slot`, open and given back, was taken for queues waiting
        to be deleted (delete_queues)."""
        if not self._undeleted:
            return False
        names, self._undeleted = self._undeleted, []
        self._delete_on(slot, names)
        return True

    def _delete_on(self, slot: UpstreamChannel, names: list[str]) -> None:
        self.writer.write_many([methods.queue_delete(slot.uid, name) for name in names])
        slot.close()

    def write_close(self, slot: UpstreamChannel) -> None:
        self.writer.write(rewrite_channel(_CHANNEL_CLOSE, slot.uid_bytes))

    def write_close_ok(self, slot: UpstreamChannel) -> None:
        self.writer.write(rewrite_channel(_CHANNEL_CLOSE_OK, slot.uid_bytes))

    def release(self, slot: UpstreamChannel) -> None:
        """The broker is done with this channel id: it may be used again."""
        self.idle_opened(slot)  # if it closed before it opened
        del self.slots[slot.uid]
        if not self.closed:
            self.free_ids.append(slot.uid)
            if self._undeleted:
                self.spare(self.open_channel())
            self.pool.channel_freed(self)

    # -- flow control ----------------------------------------------------

    def stall(self, session) -> None:
        """Pause a client's reading until this connection's buffer drains."""
        self._stalled_sessions.add(session)
        session.pause_reading()

    def hold_reading(self, session) -> None:
        """Stop reading from the broker while `session` catches up with what
        was already sent to it (bounded by client.stall_timeout)."""
        self._holders.add(session)
        if len(self._holders) == 1 and not self.closed:
            self.transport.pause_reading()

    def release_reading(self, session) -> None:
        if session in self._holders:
            self._holders.discard(session)
            if not self._holders and not self.transport.is_closing():
                self._last_read = self.loop.time()
                if not self._gathering:
                    self.transport.resume_reading()

    def _gather(self, nbytes: int) -> None:
        """Small reads in quick succession: the broker is streaming in small
        writes, and each read costs a wakeup, a read, an epoll wait and a
        write to the client (on plain TCP; a TLS transport reads ahead
        anyway). So the next read waits read_gather: 256 B deliveries came
        9 to a read without it. The read that finds the stream is never
        the one held. The clock is monotonic's, not the loop's: uvloop's
        counts whole milliseconds."""
        if nbytes >= GATHER_BELOW:
            return
        now = time.monotonic()
        if now - self._small_read <= self.read_gather and not self._gathering:
            self._gathering = True
            self.transport.pause_reading()
            # libuv's timers count whole milliseconds.
            self.loop.call_later(max(self.read_gather, 0.001), self._gathered)
        self._small_read = now

    def _gathered(self) -> None:
        self._gathering = False
        if not self._holders and not self.transport.is_closing():
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        stalled, self._stalled_sessions = self._stalled_sessions, set()
        for session in stalled:
            session.resume_reading()

    # -- reading ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        # Clients' reading pauses when this much waits to go to the broker.
        # The transport's 64 KiB default would pause them at every large
        # message, turning a stream of publishes into stop-and-go.
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)

    def buffer_updated(self, nbytes: int) -> None:
        self._last_read = self.loop.time()
        if self.read_gather:
            self._gather(nbytes)
        try:
            if self._handshake_frames is not None:
                for frame in self.reader.frames(nbytes):
                    self._handshake_frames.put_nowait(frame)
                return
            items, routed, deliveries = self.reader.routed(nbytes, self.routes, _WATCHED)
        except AMQPError as error:
            self.lose(f"broker sent a bad frame: {error.text}")
            return
        if routed:
            stats = self.pool.worker.stats
            stats.frames_to_clients += routed
            stats.messages_delivered += deliveries
        slots = self.slots
        for frame_type, channel, frame in items:
            if frame_type == ROUTED:
                channel.forward(frame)  # a run of frames; `channel` is their session
            elif channel:
                slot = slots.get(channel)
                if slot is not None:
                    slot.from_broker(frame_type, frame)
            elif frame_type == FRAME_METHOD:
                self._connection_method(methods.decode(frame))

    def _connection_method(self, method: methods.Method) -> None:
        if isinstance(method, commands.Connection.Close):
            self.writer.write(methods.encode(0, commands.Connection.CloseOk()))
            self.writer.flush()
            self.lose(f"upstream closed by the broker: {method.reply_text}")
        elif isinstance(method, commands.Connection.Blocked):
            self.blocked = True
            self.blocked_reason = method.reason
            self.pool.upstream_blocked_changed()
        elif isinstance(method, commands.Connection.Unblocked):
            self.blocked = False
            self.pool.upstream_blocked_changed()
        elif isinstance(method, commands.Connection.CloseOk):
            self.transport.close()

    def _heartbeat_tick(self) -> None:
        now = self.loop.time()
        if self._holders:
            # Not reading on purpose: the broker's frames wait in the socket.
            self._last_read = now
        if now - self._last_read > 2 * self.heartbeat:
            self.lose("upstream missed two heartbeats")
            return
        if now - self.writer.last_write >= self.heartbeat / 2:
            self.writer.write(HEARTBEAT_FRAME)
        self._heartbeat_timer = self.loop.call_later(self.heartbeat / 2, self._heartbeat_tick)

    # -- ending -------------------------------------------------------------

    def close(self) -> None:
        """Close politely (idle cleanup, shutdown): the broker answers CloseOk,
        or the socket is cut after CLOSE_TIMEOUT."""
        if self.closed:
            return
        self.closed = True
        self.closed_on_purpose = True
        self.close_reason = "closed by amqplex"
        self.writer.write(
            methods.encode(
                0,
                commands.Connection.Close(
                    reply_code=200, reply_text="Goodbye", class_id=0, method_id=0
                ),
            )
        )
        self.loop.call_later(CLOSE_TIMEOUT, self.abort)

    def lose(self, reason: str) -> None:
        self.close_reason = reason
        self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._heartbeat_timer is not None:
            self._heartbeat_timer.cancel()
        if exc is not None and self.close_reason == "upstream connection lost":
            self.close_reason = f"upstream connection lost: {tls.describe_error(exc)}"
        if self._handshake_frames is not None:
            self._handshake_frames.put_nowait((None, 0, b""))
            return
        for session in self._stalled_sessions:
            session.resume_reading()
        self._stalled_sessions.clear()
        self.pool.upstream_lost(self, self.close_reason, expected=self.closed_on_purpose)


def negotiate_heartbeat(broker: int, ours: int) -> int:
    """What TuneOk says: none if upstream.heartbeat is 0 (the client's
    TuneOk value is the one RabbitMQ uses), else the smaller of the two
    that are non-zero."""
    if ours == 0 or broker == 0:
        return ours
    return min(broker, ours)


async def fetch_server_properties(config: UpstreamConfig) -> dict:
    """The broker's Connection.Start server properties, read without logging in,
    so the proxy can offer clients the broker's own (issue: pika checks
    capabilities such as publisher_confirms before it will enable them)."""
    reader, writer = await asyncio.wait_for(tls.open_connection(config), config.connect_timeout)
    try:
        writer.write(PROTOCOL_HEADER)
        frame_reader = FrameReader(_HANDSHAKE_FRAME_MAX)
        while True:
            data = await asyncio.wait_for(reader.read(65536), config.connect_timeout)
            if not data:
                raise ConnectionResetError("broker closed before Connection.Start")
            for frame_type, _, frame in frame_reader.feed(data):
                if frame_type == FRAME_METHOD:
                    method = methods.decode(frame)
                    if isinstance(method, commands.Connection.Start):
                        return method.server_properties
    finally:
        writer.close()
