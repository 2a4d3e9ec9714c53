"""One channel of a client connection, from the client's side: the frames
the client sends on it, checked and forwarded to the upstream channel that
carries it, and the frames the broker sends back, forwarded to the client.

Content is never decoded. A publish is held until its last body frame has
arrived, then written upstream in one piece, so a client that dies
mid-message never leaves half a message on a shared connection.
"""

from __future__ import annotations

import collections
import contextlib
import struct
import typing

from pamqp import commands

from amqplex.protocol import methods
from amqplex.protocol.constants import (
    BASIC_CLASS_ID,
    FRAME_BODY,
    FRAME_HEADER,
    FRAME_HEADER_SIZE,
    FRAME_HEARTBEAT,
    FRAME_METHOD,
    FRAME_OVERHEAD,
    MAX_MESSAGE_SIZE,
    ReplyCode,
)
from amqplex.protocol.content import check_header
from amqplex.protocol.errors import ChannelException, ConnectionException
from amqplex.protocol.framing import (
    DELIVERIES,
    body_header,
    channel_bytes,
    method_index,
    retarget,
    rewrite_channel,
    split_body,
    too_large,
)
from amqplex.worker import quiet, whole_publish
from amqplex.worker.rules import (
    DIRECT_REPLY_QUEUE,
    STATELESS_METHODS,
    check_client_method,
    check_header_routes,
    check_publish,
)

if typing.TYPE_CHECKING:
    from amqplex.worker.session import ClientSession
    from amqplex.worker.upstream import Upstream
    from amqplex.worker.upstream_channel import UpstreamChannel

# The proxy's Close for a channel whose client left (channel id rewritten).
_LEAVING_CLOSE = methods.encode(0, commands.Channel.Close(200, "client left", 0, 0))
_PUBLISH = commands.Basic.Publish.index
_PUBLISH_IDS = methods.ids(commands.Basic.Publish)
_CHANNEL_OPEN = commands.Channel.Open.index
_CHANNEL_CLOSE = commands.Channel.Close.index
_CHANNEL_CLOSE_OK = commands.Channel.CloseOk.index
_QUEUE_DECLARE = commands.Queue.Declare.index
_QUEUE_DECLARE_OK = commands.Queue.DeclareOk.index
_QUEUE_DELETE = commands.Queue.Delete.index
_QUEUE_DELETE_OK = commands.Queue.DeleteOk.index
_BASIC_CANCEL = commands.Basic.Cancel.index
_BASIC_CONSUME = commands.Basic.Consume.index
_BASIC_CONSUME_OK = commands.Basic.ConsumeOk.index
_TX_COMMIT = commands.Tx.Commit.index
_TX_COMMIT_OK = commands.Tx.CommitOk.index
# Methods that name a queue: another client's exclusive queue is off limits.
_NAMES_QUEUE = frozenset(
    m.index
    for m in (
        commands.Queue.Declare,
        commands.Queue.Bind,
        commands.Queue.Unbind,
        commands.Queue.Purge,
        commands.Queue.Delete,
        commands.Basic.Consume,
        commands.Basic.Get,
    )
)
# The broker's methods from_broker acts on: never routed past it.
WATCHED = frozenset(
    (_QUEUE_DECLARE_OK, _QUEUE_DELETE_OK, _BASIC_CONSUME_OK, _BASIC_CANCEL, _TX_COMMIT_OK)
)
_OPEN_OK = methods.encode(0, commands.Channel.OpenOk())
_CLOSE_OK = methods.encode(0, commands.Channel.CloseOk())

# What the channel expects next from the client.
_EXPECT_METHOD, _EXPECT_HEADER, _EXPECT_BODY = 0, 1, 2
# What a Queue.Declare awaiting its DeclareOk makes of the queue (declares):
# someone else's or shared; the client's own (exclusive or server-named, and
# not passive: RabbitMQ ignores `exclusive` on a passive declare); the
# client's own, declared nowait, so the DeclareOk is the proxy's to take.
_SHARED, _OWNED, _OWNED_QUIETLY = 0, 1, 2
# A content header's body size, after its class and weight.
_BODY_SIZE = struct.Struct(">Q")
# Bytes a channel waiting for an upstream channel holds before its client
# is no longer read (pool.acquire_timeout bounds the wait itself).
PENDING_LIMIT = 1 << 20


class ClientChannel:
    __slots__ = (
        "session",
        "cid",
        "cid_bytes",
        "slot",
        "pending",
        "pending_size",
        "held_close",
        "answer_open",
        "expect",
        "body_left",
        "content",
        "declares",
        "deletes",
        "closing",
        "closed_by_proxy",
        "consumer_tags",
        "consumes",
        "held_for",
        "declared",
        "committing",
        "stateful",
        "unsettled",
        "largest_body",
    )

    def __init__(self, session: ClientSession, cid: int) -> None:
        self.session = session
        self.cid = cid
        self.cid_bytes = channel_bytes(cid)
        self.slot: UpstreamChannel | None = None
        # Client frames that arrived before an upstream channel was found,
        # and their bytes (past PENDING_LIMIT the client is not read).
        self.pending: list[bytes] = []
        self.pending_size = 0
        # A Channel.Close that came after them (from the client, or the
        # proxy's own for a client that left): it goes once they have.
        self.held_close: bytes | None = None
        # Whether the broker's OpenOk is still to be passed to the client.
        self.answer_open = False
        self.expect = _EXPECT_METHOD
        self.body_left = 0
        self.content: list[bytes] = []
        # One entry per Queue.Declare awaiting DeclareOk: _SHARED, _OWNED
        # or _OWNED_QUIETLY.
        self.declares: collections.deque[int] = collections.deque()
        # One entry per Queue.Delete awaiting DeleteOk: the name of a queue
        # the client owns, given up only then (a refused delete, 406, leaves
        # it the client's), and whether the client asked for no answer; no
        # name for another queue. None until the first: memory per idle
        # client is a target.
        self.deletes: collections.deque[tuple[str | None, bool]] | None = None
        # The client sent Channel.Close.
        self.closing = False
        # The proxy closed this channel (405) and waits for the client's CloseOk.
        self.closed_by_proxy = False
        # Live consumer tags: reusing one is a connection error at the broker.
        self.consumer_tags: set[str] = set()
        # One entry per Basic.Consume sent to the broker and awaiting
        # ConsumeOk: its tag, "" for one the broker names (ConsumeOk tells
        # it), None for direct reply-to's. None until the first.
        self.consumes: collections.deque[str | None] | None = None
        # The tag of a Basic.Cancel held in `pending`, with all the client
        # sent after it, until its consumer's ConsumeOk has come: a Cancel
        # that overtakes the ConsumeOk crashes RabbitMQ's (3.10) channel,
        # which closes the whole upstream with 541.
        self.held_for: str | None = None
        # The queue an empty queue name means on this channel, as the broker
        # keeps it (most_recently_declared_queue): the last this client
        # declared here ("" while the broker names it), None before its first
        # declare. Not the previous client's on the same upstream channel.
        self.declared: str | None = None
        # Tx.Commit sent, CommitOk not yet back: the broker takes nothing but
        # Channel.Close meanwhile, and anything else is a connection error.
        self.committing = False
        # The client did something that changes channel state (consume, qos,
        # confirm, tx, flow, gets, mandatory publishes): its upstream channel
        # is closed after it, never handed to another client.
        self.stateful = False
        # Something the client sent may still draw a reply or an error from
        # the broker (anything but a quiet publish, quiet.py): recycling its
        # channel waits for a probe. Else the largest of its publishes' bodies
        # decides (UpstreamChannel.recycle); -1 for none.
        self.unsettled = False
        self.largest_body = -1

    # -- binding to an upstream channel ---------------------------------------

    def bind(self, slot: UpstreamChannel, answer_open: bool) -> None:
        """Carry this channel on `slot`. With answer_open the broker's OpenOk
        is still on its way and will be passed on; otherwise the slot was
        already open and the client is answered now."""
        self.slot = slot
        slot.attach(self)
        self.answer_open = answer_open
        if not answer_open:
            self._open_ok()
        if self.pending and not self._flush(slot):
            return
        self.session.channel_bound(slot.upstream)
        self._send_held_close(slot)

    def _flush(self, slot: UpstreamChannel) -> bool:
        """Send what `pending` holds, in order, up to a Cancel that must wait
        for its consumer's ConsumeOk (held_for); False if the client failed
        for it. Bound from the pool as often as from the client's own read,
        and released from the broker's ConsumeOk: a frame too large for this
        upstream fails the client here."""
        pending = self.pending
        cut = len(pending)
        self.held_for = None
        for at, frame in enumerate(pending):
            if frame[0] != FRAME_METHOD:
                continue
            index = method_index(frame)
            if index == _BASIC_CONSUME:
                self._consume_sent(methods.decode(frame))
            elif index == _BASIC_CANCEL and self.consumes:
                tag = methods.decode(frame).consumer_tag
                if tag in self.consumes:
                    self.held_for, cut = tag, at
                    break
        try:
            frames = self._on_upstream(pending[:cut], slot)
        except ConnectionException as error:
            # Nothing after the frame the broker would have refused goes.
            self._drop_held()
            self.session.fail(error)
            return False
        slot.upstream.writer.write_many(frames)
        self.pending = pending[cut:]
        if self.pending_size > PENDING_LIMIT:
            self.session.resume_reading()
        self.pending_size = sum(map(len, self.pending))
        return True

    def _drop_held(self) -> list:
        """Empty `pending` (reading the client again if it filled it); what it held."""
        pending, self.pending = self.pending, []
        self.held_for = None
        if self.pending_size > PENDING_LIMIT:
            self.session.resume_reading()
        self.pending_size = 0
        return pending

    def _send_held_close(self, slot: UpstreamChannel) -> None:
        if self.held_close is not None and not self.pending:
            close, self.held_close = self.held_close, None
            slot.client_close(rewrite_channel(close, slot.uid_bytes))

    def _unhold(self, slot: UpstreamChannel) -> None:
        """The channel closes with frames held behind a Cancel: they go now
        but for the Cancels, which the close does anyway."""
        kept = [
            frame
            for frame in self._drop_held()
            if frame[0] != FRAME_METHOD or method_index(frame) != _BASIC_CANCEL
        ]
        # A frame too large for this upstream is dropped: the channel closes anyway.
        with contextlib.suppress(ConnectionException):
            slot.upstream.writer.write_many(self._on_upstream(kept, slot))

    def upstream_opened(self) -> None:
        if self.answer_open:
            self._open_ok()

    def _owed_open_ok(self) -> None:
        """Before the proxy itself answers a Close or refuses something on a
        channel it has not said OpenOk to yet (waiting for room, or for the
        broker's OpenOk): the broker would have opened it first."""
        if self.slot is None or self.answer_open:
            self._open_ok()

    def _open_ok(self) -> None:
        self.answer_open = False
        self.session.reply(rewrite_channel(_OPEN_OK, self.cid_bytes))

    # -- client to broker ---------------------------------------------------------

    def from_client(self, frame_type: int, frame: bytes) -> None:
        if self.closing or self.closed_by_proxy:
            # After a Close only CloseOk counts (spec 2.3.5.3 / 4.2.6)...
            if frame_type == FRAME_METHOD:
                index = method_index(frame)
                if index == _CHANNEL_CLOSE_OK:
                    self._close_ok_from_client()
                elif index == _CHANNEL_CLOSE and self.closed_by_proxy:
                    # ...but a Close that crossed the proxy's own is answered,
                    # as RabbitMQ answers one while its Close waits.
                    self.session.reply(rewrite_channel(_CLOSE_OK, self.cid_bytes))
            return
        if frame_type == FRAME_METHOD:
            if self.expect != _EXPECT_METHOD:
                raise _unexpected_frame(self.expect)
            index = method_index(frame)
            if index == _PUBLISH:
                if self.committing:
                    raise _committing(_PUBLISH_IDS)
                if check_publish(frame):
                    self.stateful = True  # its Basic.Return may still come
                if not quiet.quiet_method(frame):
                    self.unsettled = True
                self.content.append(frame)
                self.expect = _EXPECT_HEADER
                return
            self._method(index, frame)
        elif frame_type == FRAME_HEADER:
            if self.expect != _EXPECT_HEADER:
                raise _unexpected_frame(self.expect)
            self.body_left = check_header(frame)
            if self.body_left > self.session.config.max_message_size:
                # Refused before any of it is held: else one client could
                # fill the worker's memory with one message.
                raise _too_big(self.body_left, self.session.config.max_message_size)
            check_header_routes(self.content[0], frame)
            if not quiet.quiet_header(frame):
                self.unsettled = True
            self.content.append(frame)
            if self.body_left == 0:
                self._send_content()
            else:
                self.expect = _EXPECT_BODY
        elif frame_type == FRAME_BODY:
            if self.expect != _EXPECT_BODY:
                raise _unexpected_frame(self.expect)
            self.body_left -= len(frame) - FRAME_OVERHEAD
            if self.body_left < 0:
                raise ConnectionException(
                    ReplyCode.FRAME_ERROR, "content body larger than its header says"
                )
            self.content.append(frame)
            if self.body_left == 0:
                self._send_content()
        elif frame_type == FRAME_HEARTBEAT:
            # RabbitMQ: heartbeats belong on channel 0.
            raise ConnectionException(ReplyCode.UNEXPECTED_FRAME, "type 8, all octets = <<>>")

    def publish_whole(self, frames: list, start: int) -> int:
        """The publishes from frames[start] whose content header and single
        body frame follow each, checked in the order from_client checks them
        one by one and sent upstream one piece a message (and a large body's
        payload, a view of the read, after it), for about a fifth less CPU a
        message than frame by frame (whole_publish.py): how many frames
        went. 0, having changed nothing, for anything else: those frames then
        go through from_client. A streaming client's read holds hundreds,
        checked and renumbered in one compiled call; the first one that call
        refuses, if whole, is the reference's to take or refuse.
        It writes the messages itself: handing the frames to _send_content
        (and its retarget) gave most of the gain back (5.2-5.4 against
        4.5-4.7 us a message in alternating runs)."""
        slot = self.slot
        if (
            self.expect != _EXPECT_METHOD
            or self.closing
            or self.closed_by_proxy
            or self.committing
            or slot is None
            or self.held_for is not None
            or self.session.frame_max > slot.upstream.frame_max
        ):
            return 0
        pieces, end, mandatory, unsettled, largest = whole_publish.renumber_run(
            frames, start, self.cid, slot.uid_bytes
        )
        if largest > self.session.config.max_message_size:
            return 0  # from_client refuses it
        if not pieces:
            piece = self._whole_by_reference(frames, start, slot.uid_bytes)
            if piece is None:
                return 0
            end = start + 3
            method, header = frames[start][2], frames[start + 1][2]
            pieces, mandatory = [piece], whole_publish.mandatory(method)
            unsettled = not (quiet.quiet_method(method) and quiet.quiet_header(header))
            largest = len(frames[start + 2][2]) - FRAME_OVERHEAD
            if largest > self.session.config.max_message_size:
                return 0  # from_client refuses it
        if mandatory:
            self.stateful = True  # its Basic.Return may still come
        if unsettled:
            self.unsettled = True
        if largest > self.largest_body:
            self.largest_body = largest
        self.session.worker.stats.messages_published += (end - start) // 3
        upstream = slot.upstream
        upstream.writer.write_many(pieces)
        if upstream.paused:
            upstream.stall(self.session)
        return end - start

    def _whole_by_reference(self, frames: list, start: int, uid: bytes) -> bytes | None:
        """frames[start] and the two after it (the session calls with both
        there) as one piece, by whole_publish's reference (which raises what
        the broker would for a bad one); None if they are not one whole
        message on this channel."""
        frame = frames[start][2]
        header_type, header_channel, header = frames[start + 1]
        body_type, body_channel, body = frames[start + 2]
        if (
            header_type != FRAME_HEADER
            or body_type != FRAME_BODY
            or header_channel != self.cid
            or body_channel != self.cid
            or type(body) is not bytes  # a large body: from_client keeps it a view
        ):
            return None
        return whole_publish.reference_renumber(frame, header, body, uid)

    def _method(self, index: int, frame: bytes) -> None:
        if index == _CHANNEL_CLOSE:
            self._close_from_client(frame)
            return
        if index == _CHANNEL_CLOSE_OK:
            self._close_ok_from_client()
            return
        if index == _CHANNEL_OPEN:
            raise ConnectionException(ReplyCode.CHANNEL_ERROR, "second 'channel.open' seen", 20, 10)
        method = methods.decode(frame)
        check_client_method(method, self.session.worker.exchange_types)
        if self.committing:
            raise _committing(methods.ids(type(method)))
        if index not in STATELESS_METHODS:
            self.stateful = True
        if index in _NAMES_QUEUE:
            queue = self._queue_meant(index, method)
            self._check_queue_owner(queue, method)
            if index == _QUEUE_DECLARE:
                frame = self._declare(method, frame)
            elif index == _QUEUE_DELETE:
                frame = self._delete(queue, method, frame)
            elif index == _BASIC_CONSUME:
                self._track_consumer(queue, method)
                if self.slot is not None and self.held_for is None:
                    self._consume_sent(method)  # else _flush notes it as it goes
        elif index == _BASIC_CANCEL:
            tag = method.consumer_tag
            self.consumer_tags.discard(tag)
            if self.consumes and tag in self.consumes and self.held_for is None:
                self.held_for = tag
        elif index == _TX_COMMIT:
            self.committing = True
        self.unsettled = True  # its reply, or its error, is on the way
        self._send(frame)

    def _declare(self, method: commands.Queue.Declare, frame: bytes) -> bytes:
        """Note what the DeclareOk will say about ownership (rule 7), and
        the frame to send: a nowait declare of a queue the client would own
        goes as a plain one, so that the broker's answer, not the request,
        decides whether it is the client's (a declare refused 405 or 406
        must not make a shared queue one that is deleted when its client
        leaves)."""
        owned = not method.passive and (method.exclusive or not method.queue)
        if not method.nowait:
            self.declares.append(_OWNED if owned else _SHARED)
        elif owned and method.queue:  # server-named and nowait: nobody learns its name
            self.declares.append(_OWNED_QUIETLY)
            return methods.declare_answered(frame)
        return frame

    def _queue_meant(self, index: int, method: methods.Method) -> str:
        """The queue a method names. An empty name (but in a declare) is the
        queue last declared on the channel; on one this client declared
        none on, RabbitMQ's 404, as the broker gives on a new channel: the
        upstream channel may remember a previous client's queue."""
        queue = method.queue
        if index == _QUEUE_DECLARE:
            self.declared = queue
        elif not queue:
            if self.declared is None:
                raise ChannelException(
                    ReplyCode.NOT_FOUND, "no previously declared queue", *methods.ids(type(method))
                )
            queue = self.declared
        return queue

    def _delete(self, queue: str, method: commands.Queue.Delete, frame: bytes) -> bytes:
        """Note what the DeleteOk will settle, and the frame to send: a
        nowait delete of a queue the client owns goes as a plain one, so
        that the broker's answer says whether the queue went."""
        if self.deletes is None:
            self.deletes = collections.deque()
        if self.session.pool.owners.get(queue) is self.session:
            self.deletes.append((queue, method.nowait))
            return methods.delete_answered(frame) if method.nowait else frame
        if not method.nowait:
            self.deletes.append((None, False))
        return frame

    def _consume_sent(self, method: commands.Basic.Consume) -> None:
        """A Basic.Consume goes to the broker: its ConsumeOk is awaited
        (`consumes`), but for a nowait one."""
        if method.nowait:
            return
        if self.consumes is None:
            self.consumes = collections.deque()
        self.consumes.append(None if method.queue == DIRECT_REPLY_QUEUE else method.consumer_tag)

    def _track_consumer(self, queue: str, method: commands.Basic.Consume) -> None:
        tag: str | None = method.consumer_tag
        if queue == DIRECT_REPLY_QUEUE:
            tag = None  # RabbitMQ keeps the reply consumer apart from the others
        elif tag in self.consumer_tags:
            raise ConnectionException(
                ReplyCode.NOT_ALLOWED,
                f"attempt to reuse consumer tag '{tag}'",
                *methods.ids(commands.Basic.Consume),
            )
        elif tag:
            self.consumer_tags.add(tag)

    def _check_queue_owner(self, queue: str, method: methods.Method) -> None:
        owner = self.session.pool.owners.get(queue)
        if owner is not None and owner is not self.session:
            class_id, method_id = methods.ids(type(method))
            raise ChannelException(
                ReplyCode.RESOURCE_LOCKED,
                f"cannot obtain exclusive access to locked queue '{queue}' "
                f"in vhost '{self.session.vhost}'. It could be originally declared "
                "on another connection or the exclusive property value does not "
                "match that of the original declaration.",
                class_id,
                method_id,
            )

    def _send(self, frame: bytes) -> None:
        slot = self.slot
        if slot is None or self.held_for is not None:
            self._hold((frame,))
            return
        upstream = slot.upstream
        if len(frame) > upstream.frame_max + FRAME_OVERHEAD:
            raise _too_large_for(upstream, frame)
        upstream.writer.write(rewrite_channel(frame, slot.uid_bytes))
        if upstream.paused:
            upstream.stall(self.session)

    def _hold(self, frames: typing.Sequence) -> None:
        """Keep `frames` until an upstream channel is found (bind), or the
        ConsumeOk a held Cancel waits for comes (held_for); past
        PENDING_LIMIT the client is not read meanwhile, as it would not be
        read by a broker that stopped taking its frames."""
        self.pending.extend(frames)
        self.pending_size += sum(map(len, frames))
        if self.pending_size > PENDING_LIMIT:
            self.session.pause_reading()

    def _send_content(self) -> None:
        self.session.worker.stats.messages_published += 1
        content, self.content = self.content, []
        self.expect = _EXPECT_METHOD
        # Only a whole message counts toward what a probe proves (recycle):
        # one announced and left unsent proves nothing.
        size = _BODY_SIZE.unpack_from(content[1], FRAME_HEADER_SIZE + 4)[0]
        if size > self.largest_body:
            self.largest_body = size
        slot = self.slot
        if slot is None or self.held_for is not None:
            self._hold(content)
            return
        upstream = slot.upstream
        upstream.writer.write_many(self._on_upstream(content, slot))
        if upstream.paused:
            upstream.stall(self.session)

    def _on_upstream(self, frames: list, slot: UpstreamChannel) -> list:
        """`frames` moved onto `slot`'s channel, their bodies re-cut if the
        client was offered a bigger frame_max than this upstream's broker
        takes (one with a smaller one than the broker that answered the
        client's handshake). A method or content header too large for it
        cannot be cut: the client is refused as that broker would refuse it,
        rather than the frame costing the shared upstream its connection."""
        upstream = slot.upstream
        frame_max = upstream.frame_max
        uid = slot.uid_bytes
        if self.session.frame_max <= frame_max or all(len(f) <= frame_max for f in frames):
            return retarget(frames, uid)
        pieces = []
        for frame in frames:
            if len(frame) > frame_max and frame[0] == FRAME_BODY:
                pieces.extend(split_body(frame, uid, frame_max))
            elif len(frame) > frame_max + FRAME_OVERHEAD:
                raise _too_large_for(upstream, frame)
            else:
                pieces.extend(retarget((frame,), uid))
        return pieces

    def _close_from_client(self, frame: bytes) -> None:
        # Checked as the broker checks it (501 if malformed), whether it is
        # answered here or forwarded: forwarded malformed, it would close the
        # shared upstream. Cached: short-lived clients send the same bytes.
        self.session.worker.connection_methods.decode(frame)
        self.closing = True
        self.content = []
        self.expect = _EXPECT_METHOD
        slot = self.slot
        if self.pending and (slot is None or self.held_for is not None):
            # What it sent while it waited reaches the broker first, as it
            # would have directly; the broker's CloseOk answers the client.
            self.held_close = frame
            return
        if slot is None:
            # Never reached the broker: nothing to close there.
            self.session.pool.stop_waiting(self)
            self._owed_open_ok()
            self.session.reply(rewrite_channel(_CLOSE_OK, self.cid_bytes))
            self.session.channel_finished(self)
            return
        if self._reusable(slot):
            # Nothing to undo at the broker: answer at once, keep the channel.
            self.slot = None
            slot.recycle(self.unsettled, self.largest_body)
            self.session.reply(rewrite_channel(_CLOSE_OK, self.cid_bytes))
            self.session.channel_finished(self)
            return
        slot.client_close(rewrite_channel(frame, slot.uid_bytes))

    def _reusable(self, slot: UpstreamChannel) -> bool:
        # With a DeclareOk or DeleteOk still to come, the channel stays the
        # client's until it has: it settles which queues it owns (rule 7).
        return (
            not self.stateful
            and not self.answer_open
            and not self.declares
            and not self.deletes
            and slot.healthy
        )

    def _close_ok_from_client(self) -> None:
        if self.closed_by_proxy:
            self.closed_by_proxy = False
            self.session.channel_finished(self)
        elif self.slot is not None and self.slot.owes_close_ok:
            self.slot.client_close_ok()

    def close_by_proxy(self, error: ChannelException) -> None:
        """Close this channel for a soft error the proxy found itself (405):
        the client is told, the upstream channel closed behind it."""
        self._owed_open_ok()
        self.session.write(
            methods.channel_close(self.cid, error.code, error.text, error.class_id, error.method_id)
        )
        self.closed_by_proxy = True
        self.content = []
        self.expect = _EXPECT_METHOD
        slot, self.slot = self.slot, None
        if slot is None:
            self.session.pool.stop_waiting(self)  # it gets none now
        else:
            if self.held_for is not None:
                self._unhold(slot)
            slot.close()

    # -- broker to client -------------------------------------------------------

    def from_broker(self, frame_type: int, frame: bytes, index: int) -> None:
        """A frame the broker sent on this channel (`index`: the method's, for
        a method frame, as upstream_channel already read it). Only the
        methods in WATCHED reach this while the channel is routed (see
        UpstreamChannel.attach): a method acted on here must be in it."""
        session = self.session
        if frame_type == FRAME_BODY:
            if len(frame) > session.frame_max:
                session.write_many(split_body(frame, self.cid_bytes, session.frame_max))
                return
            if type(frame) is memoryview:
                session.write_many(
                    (body_header(frame, self.cid_bytes), frame[FRAME_HEADER_SIZE:]), frames=1
                )
                return
        elif frame_type == FRAME_METHOD:
            if index == _QUEUE_DECLARE_OK and self.declares:
                declared = self.declares.popleft()
                if declared != _SHARED:
                    queue = methods.decode(frame).queue
                    if self.declared == "" and not self.declares:
                        self.declared = queue  # the broker named it
                    session.pool.own(queue, session, self.slot.upstream)
                    if declared == _OWNED_QUIETLY:
                        return  # the client asked for no answer
            elif index == _QUEUE_DELETE_OK and self.deletes:
                queue, quiet = self.deletes.popleft()
                if queue is not None:
                    session.pool.disown(queue, session)
                if quiet:
                    return  # the client asked for no answer
            elif index in DELIVERIES:
                session.worker.stats.messages_delivered += 1
            elif index == _BASIC_CONSUME_OK:
                # Only a tag the broker made up is new here: a tag the client
                # chose is in consumer_tags already, or was cancelled since.
                if self.consumes and self.consumes.popleft() == "":
                    self.consumer_tags.add(methods.decode(frame).consumer_tag)
                if self.held_for is not None and self.held_for not in self.consumes:
                    session.write(rewrite_channel(frame, self.cid_bytes))
                    if self._flush(self.slot):
                        self._send_held_close(self.slot)
                    return
            elif index == _CHANNEL_CLOSE:
                if self.held_for is not None:
                    # The broker takes nothing but Close and CloseOk now: a
                    # Close of the client's crosses its own, and is answered.
                    self._drop_held()
                    self._send_held_close(self.slot)
                if session.channels.get(self.cid) is not self:
                    # Its client left while it waited for room (held_close):
                    # answered on the client's behalf (rule 5).
                    self.slot.client_close_ok()
                    return
            elif index == _BASIC_CANCEL:
                self.consumer_tags.discard(methods.decode(frame).consumer_tag)
                if not session.cancel_notify:
                    # The broker drops such consumers silently for clients
                    # that did not advertise consumer_cancel_notify.
                    return
            elif index == _TX_COMMIT_OK:
                self.committing = False
        session.write(rewrite_channel(frame, self.cid_bytes))

    def slot_released(self) -> None:
        """The upstream channel is closed both ways: the client's id is free."""
        self.slot = None
        self.session.channel_finished(self)

    # -- the client went away ---------------------------------------------------

    def release(self) -> None:
        """The client left: its channel is recycled if it can be, else closed
        (which gives its unacked messages back to their queues)."""
        slot, self.slot = self.slot, None
        if slot is None and self.pending:
            # It still waits, to deliver what the client sent before it left.
            if self.held_close is None:
                self.held_close = _LEAVING_CLOSE
            return
        if slot is None:
            self.session.pool.stop_waiting(self)
            return
        if self.held_for is not None:
            self._unhold(slot)
        if self._reusable(slot):
            slot.recycle(self.unsettled, self.largest_body)
        else:
            # A DeclareOk still on its way names a queue of the client's
            # (rule 7), for the upstream channel to delete now that it left.
            slot.close(owned_declares=[declared != _SHARED for declared in self.declares])


def _too_big(size: int, limit: int) -> ChannelException:
    # RabbitMQ's words; it says "configured max size" for any but its default.
    kind = "max size" if limit == MAX_MESSAGE_SIZE else "configured max size"
    return ChannelException(
        ReplyCode.PRECONDITION_FAILED,
        f"message size {size} is larger than {kind} {limit}",
        *_PUBLISH_IDS,
    )


def _committing(ids: tuple[int, int]) -> ConnectionException:
    # RabbitMQ takes nothing but Channel.Close on a channel between
    # Tx.Commit and its CommitOk, and closes the connection otherwise.
    return ConnectionException(
        ReplyCode.CHANNEL_ERROR, "unexpected command while processing 'tx.commit'", *ids
    )


def _unexpected_frame(expect: int) -> ConnectionException:
    """A frame out of content order, in RabbitMQ's words; mid-content the
    error names the publish being assembled."""
    if expect == _EXPECT_METHOD:
        return ConnectionException(
            ReplyCode.UNEXPECTED_FRAME, "expected method frame, got non method frame instead"
        )
    if expect == _EXPECT_HEADER:
        detail = f"expected content header for class {BASIC_CLASS_ID}, got non content header"
    else:
        detail = "expected content body, got non content body"
    return ConnectionException(ReplyCode.UNEXPECTED_FRAME, f"{detail} frame instead", *_PUBLISH_IDS)


def _too_large_for(upstream: Upstream, frame: bytes | memoryview) -> ConnectionException:
    """What the broker behind `upstream` would say to a client sending it
    `frame` (its frame_max is smaller than the one the client was offered)."""
    return too_large(frame[0], len(frame) - FRAME_OVERHEAD, upstream.frame_max)
