"""A client connection: the handshake the proxy answers itself, channel 0,
the client's channel table, heartbeats, and the orderly end of it all.

Where a client frame goes: data_received -> FrameSplitter -> channel 0 here,
or the ClientChannel for its channel id (client_channel.py) -> the upstream
channel carrying it (upstream_channel.py) -> the upstream's batched writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import socket
import struct
import typing

from pamqp import commands

from amqplex import logs
from amqplex.config.settings import STALL_SHARE
from amqplex.protocol import methods
from amqplex.protocol.auth import Credentials, parse_response
from amqplex.protocol.constants import (
    FRAME_HEADER,
    FRAME_HEARTBEAT,
    FRAME_METHOD,
    FRAME_MIN_SIZE,
    FRAME_OVERHEAD,
    HEARTBEAT_FRAME,
    PROTOCOL_HEADER,
    ReplyCode,
)
from amqplex.protocol.errors import AMQPError, ChannelException, ConnectionException
from amqplex.protocol.framing import FrameSplitter, method_index
from amqplex.worker.client_channel import ClientChannel
from amqplex.worker.pool import UpstreamUnavailable
from amqplex.worker.upstream import UpstreamRefused
from amqplex.worker.writer import BatchedWriter

if typing.TYPE_CHECKING:
    from amqplex.worker.pool import Pool
    from amqplex.worker.server import Worker
    from amqplex.worker.upstream import Upstream

log = logging.getLogger(__name__)
# Its lines (one per client session) are written in batches: see logs.
SESSION_LOGGER = __name__

_CHANNEL_OPEN = commands.Channel.Open.index
_OPEN_OK = methods.encode(0, commands.Connection.OpenOk())
_CLOSE_OK = methods.encode(0, commands.Connection.CloseOk())
# A read that filled uvloop's buffer (UV_STREAM_RECV_BUF_SIZE, 256,000
# bytes): the client has more waiting, and libuv would read it again, up to
# 32 times in one go, before any other client. It waits for the next loop
# turn instead, so that streaming clients' messages reach a shared upstream
# in the same turns and go out interleaved (writer.py). (asyncio's own loop
# reads a socket once a turn anyway. Over TLS a read is what uvloop's SSL
# protocol decrypted since it last called: a streaming TLS client's reach
# this size too, and its turns depend on the yield as a plain client's do.)
STREAMING_READ = 256_000
# SO_LINGER on, zero seconds: close() sends RST and discards unsent data.
_LINGER_RESET = struct.pack("ii", 1, 0)


class State(enum.Enum):
    HEADER = "awaiting protocol header"
    START_OK = "awaiting Connection.StartOk"
    LOGIN = "logging in with the broker"
    TUNE_OK = "awaiting Connection.TuneOk"
    OPEN = "awaiting Connection.Open"
    VERIFYING = "verifying credentials with the broker"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


class ClientSession(asyncio.Protocol):
    # A worker holds thousands (memory per idle client is a target), and a
    # short-lived client's whole life is a few dozen attribute writes.
    __slots__ = (
        "worker",
        "config",
        "loop",
        "state",
        "transport",
        "writer",
        "splitter",
        "channels",
        "pool",
        "credentials",
        "vhost",
        "frame_max",
        "channel_max",
        "heartbeat",
        "cancel_notify",
        "blocked_notify",
        "told_blocked",
        "home",
        "_logged_in",
        "_holding",
        "_stall_timer",
        "_stall_left",
        "_stall_mark",
        "_stall_charged",
        "_header",
        "peer",
        "started",
        "bytes_in",
        "bytes_out",
        "close_code",
        "close_text",
        "_last_read",
        "_timer",
        "_reading",
        "_yielding",
        "_held",
    )

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.config = worker.config.client
        self.loop = worker.loop
        self.state = State.HEADER
        self.transport: asyncio.Transport | None = None
        self.writer: BatchedWriter | None = None
        # Until TuneOk, RabbitMQ takes frames of its minimum size only: a
        # larger one is 501, and none can pin more than that before login.
        self.splitter = FrameSplitter(FRAME_MIN_SIZE, slack=FRAME_OVERHEAD)
        self.channels: dict[int, ClientChannel] = {}
        self.pool: Pool | None = None
        self.credentials: Credentials | None = None
        self.vhost = "/"
        self.frame_max = worker.frame_max
        self.channel_max = worker.channel_max
        self.heartbeat = 0
        self.cancel_notify = False
        self.blocked_notify = False
        # Connection.Blocked sent, Unblocked not yet: the broker says each once.
        self.told_blocked = False
        # The upstream this client's channels go to when it has room, so an
        # exclusive queue stays usable on all of the client's channels.
        self.home: Upstream | None = None
        # A connection logged in for this client at StartOk, to open its vhost on.
        self._logged_in: Upstream | None = None
        # Upstreams not reading while this client catches up, and the bound on it.
        self._holding: set[Upstream] = set()
        self._stall_timer: asyncio.TimerHandle | None = None
        # How much longer it may hold them (s), and when that was reckoned:
        # the budget is client.stall_timeout, spent while holding and earned
        # back at STALL_SHARE of the time since.
        self._stall_left = self.config.stall_timeout
        self._stall_mark = 0.0
        # Whether the hold under way holds another client back, and so
        # spends the budget (alone on its upstreams, it only waits for
        # itself, as directly: stall_timeout still bounds each time).
        self._stall_charged = False
        # The protocol header's bytes, while it arrives in pieces.
        self._header = b""
        self.peer = ""
        # Set when its conversation can begin (connection_made: for a TLS
        # client, after the TLS handshake, which has its own bound).
        self.started = 0.0
        self.bytes_in = 0
        self.bytes_out = 0
        self.close_code = 0
        self.close_text = ""
        self._last_read = self.loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._reading = True
        # Not reading until the next loop turn (STREAMING_READ).
        self._yielding = False
        # The rest of a read whose StartOk or Open the broker is asked about.
        self._held: list | None = None

    # -- transport callbacks ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "")
        transport.set_write_buffer_limits(high=self.config.max_output_buffer)
        self.writer = BatchedWriter(transport, self.loop)
        self.worker.stats.client_connections += 1
        self.worker.session_began(self)
        # Now, not at accept: the deadlines expire in the order clients are added.
        self.started = self.loop.time()
        self.worker.handshakes.add(self, self.started)

    def data_received(self, data: bytes) -> None:
        self._last_read = self.loop.time()
        self.bytes_in += len(data)
        if len(data) >= STREAMING_READ:
            self._yield_turn()
        if self.state is State.HEADER:
            data = self._protocol_header(data)
            if not data:
                return
        try:
            frames = self.splitter.split(data)
            self.worker.stats.frames_from_clients += len(frames)
            if self.state is State.RUNNING:
                self._running(frames)
            else:
                self._handshake(frames)
        except ConnectionException as error:
            self.fail(error)

    def connection_lost(self, exc: Exception | None) -> None:
        self._end()

    def pause_writing(self) -> None:
        """The client fell behind (client.max_output_buffer queued): the
        upstreams carrying its channels stop reading, as TCP would slow the
        broker for it directly, but for client.stall_timeout at most, and
        over the long run for STALL_SHARE of the time at most; a client
        still behind then is cut loose, so the others on those upstreams go
        on (DESIGN rule 9). Without the share, a client that reads just
        fast enough to catch up within stall_timeout each time would hold
        them back most of the time, for ever."""
        if self.state in (State.CLOSING, State.CLOSED):
            self._abort()
            return
        mine: dict[Upstream, int] = {}
        for channel in self.channels.values():
            if channel.slot is not None:
                upstream = channel.slot.upstream
                mine[upstream] = mine.get(upstream, 0) + 1
        for upstream in mine:
            if upstream not in self._holding:
                self._holding.add(upstream)
                upstream.hold_reading(self)
        now = self.loop.time()
        earned = (now - self._stall_mark) * STALL_SHARE
        self._stall_left = min(self.config.stall_timeout, self._stall_left + earned)
        self._stall_mark = now
        self._stall_charged = any(upstream.carried > count for upstream, count in mine.items())
        limit = self._stall_left if self._stall_charged else self.config.stall_timeout
        self._stall_timer = self.loop.call_later(limit, self._stalled)

    def resume_writing(self) -> None:
        if self._stall_timer is not None:
            now = self.loop.time()
            if self._stall_charged:
                self._stall_left = max(0.0, self._stall_left - (now - self._stall_mark))
            self._stall_mark = now
        self._release_upstreams()

    def _release_upstreams(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        holding, self._holding = self._holding, set()
        for upstream in holding:
            upstream.release_reading(self)

    def _stalled(self) -> None:
        self._stall_timer = None
        log.info(
            "client not reading: %d bytes queued, its upstreams held back past "
            "client.stall_timeout (%.1f s); closing it",
            self.writer.buffered(),
            self.config.stall_timeout,
        )
        self.worker.stats.slow_client_disconnects += 1
        self._send_close(
            ReplyCode.CONNECTION_FORCED,
            "CONNECTION_FORCED - client is not reading its deliveries "
            f"(over client.max_output_buffer for client.stall_timeout = "
            f"{self.config.stall_timeout:g} s)",
        )

    # -- the handshake, answered locally (DESIGN rule 1) ----------------------------

    def _protocol_header(self, data: bytes) -> bytes:
        """What the client sent after its protocol header, once the header is
        all here and is ours; b"" until then, or if it is refused."""
        size = len(PROTOCOL_HEADER)
        self._header += data
        if len(self._header) < size:
            if not PROTOCOL_HEADER.startswith(self._header):
                self._refuse_protocol()
            return b""
        if self._header[:size] != PROTOCOL_HEADER:
            self._refuse_protocol()
            return b""
        rest, self._header = self._header[size:], b""
        self.state = State.START_OK
        self.reply(self.worker.start_frame)
        return rest

    def _refuse_protocol(self) -> None:
        # The spec: answer a header we cannot speak with our own, then close.
        self.state = State.CLOSED
        self.transport.write(PROTOCOL_HEADER)
        self.transport.close()

    def _handshake(self, frames: list) -> None:
        """A read's frames before the client is in, one at a time, as each
        can change the state: once it is in, the rest of the read (a
        Channel.Open sent right after Connection.Open, as the broker
        allows) runs; while the broker is asked about its login or vhost,
        the rest waits for the answer (_replay)."""
        for at, (frame_type, channel, frame) in enumerate(frames):
            self._other_state(frame_type, channel, frame)
            state = self.state
            if state is State.RUNNING or state is State.LOGIN or state is State.VERIFYING:
                rest = frames[at + 1 :]
                if rest and state is State.RUNNING:
                    self._running(rest)
                elif rest:
                    self._held = rest
                return

    def _replay(self) -> None:
        """The frames _handshake held while the broker answered."""
        held, self._held = self._held, None
        if not held:
            return
        try:
            if self.state is State.RUNNING:
                self._running(held)
            else:
                self._handshake(held)
        except ConnectionException as error:
            self.fail(error)

    def _other_state(self, frame_type: int, channel: int, frame: bytes) -> None:
        if self.state is State.CLOSING:
            self._closing_frame(frame_type, channel, frame)
            return
        if self.state in (State.VERIFYING, State.CLOSED):
            return
        if frame_type == FRAME_HEARTBEAT:
            return
        if frame_type != FRAME_METHOD or channel != 0:
            raise ConnectionException(
                ReplyCode.COMMAND_INVALID, f"unexpected frame during handshake ({self.state.value})"
            )
        method = self.worker.connection_methods.decode(frame)
        if isinstance(method, commands.Connection.Close):
            self._client_close(method)
        elif self.state is State.START_OK and isinstance(method, commands.Connection.StartOk):
            self._start_ok(method)
        elif self.state is State.TUNE_OK and isinstance(method, commands.Connection.TuneOk):
            self._tune_ok(method)
        elif self.state is State.OPEN and isinstance(method, commands.Connection.Open):
            self._open(method)
        else:
            raise ConnectionException(
                ReplyCode.COMMAND_INVALID,
                f"{method.name} unexpected while {self.state.value}",
                *methods.ids(type(method)),
            )

    def _start_ok(self, method: commands.Connection.StartOk) -> None:
        self.credentials = parse_response(method.mechanism, method.response)
        capabilities = method.client_properties.get("capabilities")
        if not isinstance(capabilities, dict):  # ignored, as RabbitMQ ignores it
            capabilities = {}
        self.cancel_notify = bool(capabilities.get("consumer_cancel_notify"))
        self.blocked_notify = bool(capabilities.get("connection.blocked"))
        if self.worker.pools.logged_in(self.credentials):
            # The broker accepted exactly these credentials for an open
            # upstream: the usual case, answered without a task or a wait.
            self._tune()
            return
        self.state = State.LOGIN
        self.pause_reading()
        self.worker.spawn(self._login())

    async def _login(self) -> None:
        """The broker checks the password before the client is tuned, as it
        does itself, so a wrong one is refused where clients expect it."""
        answered, login = await self._ask_broker(self.worker.pools.login(self.credentials))
        if not answered:
            return
        if self.state is not State.LOGIN:
            if login is not None:
                login.discard_login()
            return
        self._logged_in = login
        self.resume_reading()
        self._tune()
        self._replay()

    def _tune(self) -> None:
        self.state = State.TUNE_OK
        self.reply(self.worker.tune_frame)

    def _tune_ok(self, method: commands.Connection.TuneOk) -> None:
        ids = methods.ids(commands.Connection.TuneOk)
        # RabbitMQ's negotiation: a value under the minimum is refused, and
        # so is 0 ("no limit") against a server that has one, as this has.
        frame_max = method.frame_max
        if 0 < frame_max < FRAME_MIN_SIZE:
            raise ConnectionException(
                ReplyCode.NOT_ALLOWED, f"frame_max={frame_max} < {FRAME_MIN_SIZE} min size", *ids
            )
        if frame_max == 0 or frame_max > self.worker.frame_max:
            raise ConnectionException(
                ReplyCode.NOT_ALLOWED,
                f"frame_max={frame_max} > {self.worker.frame_max} max size",
                *ids,
            )
        channel_max = method.channel_max
        if channel_max == 0 or channel_max > self.worker.channel_max:
            raise ConnectionException(
                ReplyCode.NOT_ALLOWED,
                f"channel_max={channel_max} > {self.worker.channel_max} max size",
                *ids,
            )
        self.frame_max = frame_max
        self.splitter.frame_max = frame_max
        self.channel_max = channel_max
        self.heartbeat = method.heartbeat
        self.state = State.OPEN

    def _open(self, method: commands.Connection.Open) -> None:
        # As given: an empty one is the broker's to refuse (530, not found).
        self.vhost = method.virtual_host
        limit = self.worker.config.pool.max_client_connections
        if limit and self.worker.running_sessions() >= limit:
            raise ConnectionException(
                ReplyCode.NOT_ALLOWED,
                f"access to vhost '{self.vhost}' refused: connection limit ({limit}) is reached "
                "(pool.max_client_connections)",
                *methods.ids(commands.Connection.Open),
            )
        pool = self.worker.pools.ready(self.credentials, self.vhost)
        if pool is not None and self._logged_in is None:
            self._opened(pool)
            return
        self.state = State.VERIFYING
        self.pause_reading()
        self.worker.spawn(self._verify())

    async def _verify(self) -> None:
        """Credentials are checked by the broker before OpenOk (DESIGN rule 2)."""
        login, self._logged_in = self._logged_in, None
        answered, pool = await self._ask_broker(
            self.worker.pools.get(self.credentials, self.vhost, login)
        )
        if not answered or self.state is not State.VERIFYING:
            return
        self._opened(pool)
        self.resume_reading()
        self._replay()

    def _opened(self, pool: Pool) -> None:
        self.pool = pool
        self.worker.running += 1
        self.state = State.RUNNING
        self.worker.handshakes.discard(self)
        self.reply(_OPEN_OK)
        self.worker.stats.handshake_done(self.loop.time() - self.started)
        pool.session_joined(self)
        if self.heartbeat:
            self._timer = self.loop.call_later(self.heartbeat / 2, self._heartbeat_tick)

    async def _ask_broker(self, request: typing.Awaitable) -> tuple[bool, typing.Any]:
        """(True, the answer) to a login or vhost request, or (False, None)
        once the client has been told why not: the broker's own refusal
        (403 at login, 530 at Open) word for word, else 320."""
        try:
            return True, await request
        except UpstreamRefused as refusal:
            self.worker.stats.authentication_failures += 1
            self._send_close(refusal.code, refusal.text, refusal.class_id, refusal.method_id)
        except Exception as error:  # unreachable, timed out, or a bug: never a hang
            if not isinstance(error, OSError | TimeoutError | UpstreamUnavailable):
                log.exception("asking the broker for a client failed")
            reason = str(error) or type(error).__name__
            log.warning("upstream unavailable for a client: %s", reason)
            self._send_close(
                ReplyCode.CONNECTION_FORCED, f"CONNECTION_FORCED - upstream unavailable: {reason}"
            )
        return False, None

    def handshake_timed_out(self) -> None:
        """client.handshake_timeout passed before OpenOk (worker.handshakes)."""
        if self.state is not State.CLOSED:  # else it is closing its socket already
            log.info("client handshake timed out while %s", self.state.value)
            self.state = State.CLOSED
        self._abort()

    # -- running -------------------------------------------------------------------

    def _running(self, frames: list) -> None:
        channels = self.channels
        running = State.RUNNING
        count = len(frames)
        i = 0
        while i < count:
            frame_type, channel_id, frame = frames[i]
            i += 1
            if self.state is not running:
                self._other_state(frame_type, channel_id, frame)
                continue
            if channel_id == 0:
                self._channel_zero(frame_type, frame)
                continue
            channel = channels.get(channel_id)
            if channel is None:
                self._new_channel(frame_type, channel_id, frame)
                continue
            try:
                if (
                    frame_type == FRAME_METHOD
                    and i + 1 < count
                    and frames[i][0] == FRAME_HEADER  # else no call: acks, declares...
                ):
                    taken = channel.publish_whole(frames, i - 1)
                    if taken:
                        i += taken - 1  # their content headers and bodies went too
                        continue
                channel.from_client(frame_type, frame)
            except ChannelException as error:
                channel.close_by_proxy(error)

    def _new_channel(self, frame_type: int, channel_id: int, frame: bytes) -> None:
        if frame_type != FRAME_METHOD:
            raise ConnectionException(
                ReplyCode.UNEXPECTED_FRAME, "expected method frame, got non method frame instead"
            )
        index = method_index(frame)
        if index != _CHANNEL_OPEN:
            raise ConnectionException(
                ReplyCode.CHANNEL_ERROR, "expected 'channel.open'", index >> 16, index & 0xFFFF
            )
        # Like RabbitMQ, limit how many channels are open, not their ids:
        # ids are remapped upstream, so any id up to 65535 is fine.
        if len(self.channels) >= self.channel_max:
            raise ConnectionException(
                ReplyCode.NOT_ALLOWED,
                f"number of channels opened ({len(self.channels)}) has reached "
                f"the negotiated channel_max ({self.channel_max})",
            )
        channel = ClientChannel(self, channel_id)
        self.channels[channel_id] = channel
        self.pool.attach(channel)

    def _channel_zero(self, frame_type: int, frame: bytes) -> None:
        if frame_type == FRAME_HEARTBEAT:
            return
        if frame_type != FRAME_METHOD:
            raise ConnectionException(ReplyCode.UNEXPECTED_FRAME, "content frame on channel 0")
        method = self.worker.connection_methods.decode(frame)
        if isinstance(method, commands.Connection.Close):
            self._client_close(method)
            return
        # RabbitMQ's answer to any other channel-0 method once open.
        raise ConnectionException(
            ReplyCode.CHANNEL_ERROR,
            "unexpected method in connection state running",
            *methods.ids(type(method)),
        )

    def _heartbeat_tick(self) -> None:
        """Send a heartbeat when idle; drop a client silent for two intervals."""
        if self.state is not State.RUNNING:
            return
        now = self.loop.time()
        if not self._reading:
            # The proxy stopped reading it (an upstream of its channels is
            # not taking more): its heartbeats wait in the kernel, unread.
            self._last_read = now
        elif now - self._last_read > 2 * self.heartbeat:
            log.info("client missed two heartbeats; closing it")
            self._abort()
            return
        if now - self.writer.last_write >= self.heartbeat / 2:
            self.write(HEARTBEAT_FRAME)
        self._timer = self.loop.call_later(self.heartbeat / 2, self._heartbeat_tick)

    # -- writing -------------------------------------------------------------------

    def write(self, frame: bytes) -> None:
        self.worker.stats.frames_to_clients += 1
        self.bytes_out += len(frame)
        self.writer.write(frame)

    def reply(self, frame: bytes) -> None:
        """An answer the proxy gives itself (the handshake's, a channel's
        open and close, Connection.CloseOk): a short-lived client's turn
        writes nothing else, so it goes at once unless frames are waiting
        (BatchedWriter.write_now)."""
        self.worker.stats.frames_to_clients += 1
        self.bytes_out += len(frame)
        self.writer.write_now(frame)

    def write_many(self, pieces: typing.Sequence, frames: int = 0) -> None:
        """Write `pieces` (whole frames, or a body's header and payload: then
        `frames` says how many frames they make)."""
        self.worker.stats.frames_to_clients += frames or len(pieces)
        self.bytes_out += sum(map(len, pieces))
        self.writer.write_many(pieces)

    def forward(self, frames: bytes | memoryview) -> None:
        """Frames from the broker already on this client's channel ids (a
        run cut_routed made; the upstream counted them)."""
        self.bytes_out += len(frames)
        self.writer.write(frames)

    def pause_reading(self) -> None:
        if self._reading and not self.transport.is_closing():
            self._reading = False
            if not self._yielding:
                self.transport.pause_reading()

    def resume_reading(self) -> None:
        if not self._reading and not self.transport.is_closing():
            self._reading = True
            if not self._yielding:
                self.transport.resume_reading()

    def _yield_turn(self) -> None:
        if self._reading and not self._yielding and not self.transport.is_closing():
            self._yielding = True
            self.transport.pause_reading()
            self.loop.call_soon(self._take_turn)

    def _take_turn(self) -> None:
        self._yielding = False
        if self._reading and not self.transport.is_closing():
            self.transport.resume_reading()

    # -- channel bookkeeping ---------------------------------------------------------

    def channel_bound(self, upstream: Upstream) -> None:
        if self.home is None or self.home.closed:
            self.home = upstream
        if self.blocked_notify and (upstream.blocked or self.told_blocked):
            self.retell_blocked()

    def channel_finished(self, channel: ClientChannel) -> None:
        if self.channels.get(channel.cid) is channel:
            del self.channels[channel.cid]
            # Which upstreams it is on changed, and may be blocked or not.
            if self.told_blocked or (self.blocked_notify and self.pool.blocked):
                self.retell_blocked()

    def blocking_upstream(self) -> Upstream | None:
        """The upstream by which the broker blocks this client's connection,
        as far as it can tell (DESIGN rule 7): one its channels are on; with
        no channel on one yet, any of the pool's, since that is where its
        first channel may go. None if it is not blocked."""
        bound = [ch.slot.upstream for ch in self.channels.values() if ch.slot is not None]
        if not bound and self.pool is not None:
            bound = self.pool.upstreams
        return next((upstream for upstream in bound if upstream.blocked), None)

    def retell_blocked(self) -> None:
        """Send Connection.Blocked (with the broker's reason) or Unblocked if
        blocking_upstream() changed from None or to it since the client was
        last told: once per change, as the broker says it, however many
        upstreams or channels it came from."""
        if not self.blocked_notify or self.state is not State.RUNNING:
            return
        blocking = self.blocking_upstream()
        if blocking is not None and not self.told_blocked:
            self.told_blocked = True
            reason = blocking.blocked_reason
            self.write(methods.encode(0, commands.Connection.Blocked(reason=reason)))
        elif self.told_blocked and blocking is None:
            self.told_blocked = False
            self.write(methods.encode(0, commands.Connection.Unblocked()))

    # -- ending ------------------------------------------------------------------------

    def _client_close(self, method: commands.Connection.Close) -> None:
        """Connection.Close from the client is never forwarded: its channels are
        closed upstream and the proxy answers CloseOk (DESIGN rule 5)."""
        self.close_code, self.close_text = method.reply_code, method.reply_text
        self._release_channels()
        self.reply(_CLOSE_OK)
        self.writer.flush()
        self.state = State.CLOSED
        self.transport.close()
        if self.transport.get_write_buffer_size():
            # The CloseOk waits behind output the client is not reading:
            # bounded as a Close of ours is, else its socket stays for ever.
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_later(self.config.close_timeout, self._abort)

    def fail(self, error: AMQPError) -> None:
        """A hard error: tell this client alone, as the broker would."""
        log.info("closing client: %s", error.text)
        self._send_close(error.code, error.text, error.class_id, error.method_id)

    def force_close(self, code: int, text: str) -> None:
        """Close from the proxy's side (upstream lost, draining)."""
        self._send_close(code, text)

    def _send_close(self, code: int, text: str, class_id: int = 0, method_id: int = 0) -> None:
        if self.state in (State.CLOSING, State.CLOSED):
            return
        self.worker.stats.client_error(code)
        self.close_code, self.close_text = code, text
        self.state = State.CLOSING
        self._release_channels()
        self.write(methods.connection_close(code, text, class_id, method_id))
        self.resume_reading()
        self.worker.handshakes.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(self.config.close_timeout, self._abort)

    def _closing_frame(self, frame_type: int, channel: int, frame: bytes) -> None:
        """After our Close only Close and CloseOk count; both end it."""
        if frame_type != FRAME_METHOD or channel != 0:
            return
        index = method_index(frame)
        if index == commands.Connection.CloseOk.index:
            self.state = State.CLOSED
            self.writer.flush()
            self.transport.close()
        elif index == commands.Connection.Close.index:
            self.reply(_CLOSE_OK)
            self.state = State.CLOSED
            self.writer.flush()
            self.transport.close()

    def _abort(self) -> None:
        """Drop the connection now, with a reset: what is still queued for a
        client that stopped reading would otherwise linger in the kernel."""
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        self.transport.abort()

    def _log_end(self) -> None:
        """One line per session; passwords never appear (Credentials hides it)."""
        if self.state is State.CLOSED and not self.close_code and not self.pool:
            return
        fields = {
            "client": self.peer,
            "user": self.credentials.username if self.credentials else "",
            "vhost": self.vhost,
            "duration": round(self.loop.time() - self.started, 3),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "close_code": self.close_code,
            "close_text": self.close_text or ("connection lost" if self.pool else ""),
        }
        level = logging.INFO if self.pool is not None or self.close_code else logging.DEBUG
        logs.defer(log, level, "client session ended", fields)

    def _release_channels(self) -> None:
        self._release_upstreams()
        channels, self.channels = self.channels, {}
        for channel in channels.values():
            channel.release()

    def _end(self) -> None:
        try:
            # Its bytes move from the live sessions' to the totals first: the
            # exporter's sum of the two must never go down.
            self.worker.stats.session_ended(self.bytes_in, self.bytes_out)
            self._log_end()
            self.state = State.CLOSED
            if self._logged_in is not None:
                self._logged_in.discard_login()
                self._logged_in = None
            self.worker.handshakes.discard(self)
            if self._timer is not None:
                self._timer.cancel()
            self._release_channels()
            if self.pool is not None:
                self.worker.running -= 1
                self.pool.session_left(self)
        finally:
            # Whatever failed above, the worker must not keep counting this
            # client (its drain waits for none, its gate compares counts).
            self.worker.session_ended(self)
