"""One channel id on an upstream connection, from the broker's side.

Its life: opened (at the broker's OpenOk its client is answered, or it goes
idle), then idle in the pool or carrying one client channel, then closed by
either side. The id goes back to the upstream only when both directions of
the close are done, so a late frame for the old channel can never reach a new
one (DESIGN rule 4).

A channel whose client changed nothing about it (only published, declared,
bound, or got without ack) is recycled instead of closed: a background
round trip (Basic.Recover) proves no asynchronous error of that client's is
still on its way, and only then does the channel go back to the idle set.
A client that sent nothing but quiet publishes (quiet.py) no larger than
ones already proven on the channel leaves it idle at once.
"""

from __future__ import annotations

import typing

from pamqp import commands

from amqplex.protocol import methods
from amqplex.protocol.constants import FRAME_METHOD
from amqplex.protocol.framing import channel_bytes, method_index, rewrite_channel

if typing.TYPE_CHECKING:
    from amqplex.worker.client_channel import ClientChannel
    from amqplex.worker.upstream import Upstream

_OPEN_OK = commands.Channel.OpenOk.index
_CLOSE = commands.Channel.Close.index
_CLOSE_OK = commands.Channel.CloseOk.index
_DECLARE_OK = commands.Queue.DeclareOk.index
_RECOVER_OK = commands.Basic.RecoverOk.index
_LIFECYCLE = frozenset((_OPEN_OK, _CLOSE, _CLOSE_OK))
# The broker's methods from_broker acts on: never routed past it. A method
# it comes to act on must be added here, or a routed channel never shows it.
WATCHED = frozenset((*_LIFECYCLE, _RECOVER_OK))
_PROBE = methods.encode(0, commands.Basic.Recover(requeue=True))


class UpstreamChannel:
    __slots__ = (
        "upstream",
        "uid",
        "uid_bytes",
        "client",
        "awaiting_close_ok",
        "owes_close_ok",
        "closing",
        "probing",
        "proving",
        "proven_body",
        "for_idle",
        "orphan_declares",
    )

    def __init__(self, upstream: Upstream, uid: int) -> None:
        self.upstream = upstream
        self.uid = uid
        self.uid_bytes = channel_bytes(uid)
        self.client: ClientChannel | None = None
        # We (or our client) sent Channel.Close and wait for the broker's CloseOk.
        self.awaiting_close_ok = False
        # The broker sent Channel.Close and waits for our CloseOk.
        self.owes_close_ok = False
        # A close has begun in either direction: never idle again.
        self.closing = False
        # Recycled: waiting for the probe's RecoverOk before going idle.
        self.probing = False
        # The largest quiet publish (quiet.py) this channel carried with a
        # clean probe after it (the broker's size limit is the channel's for
        # its life), -1 for none; and what the probe under way proves if it
        # comes back clean.
        self.proven_body = -1
        self.proving = -1
        # Opened by the pool to be idle (counted in upstream.idle_opening).
        self.for_idle = False
        # For each Queue.Declare its departed client left unanswered, in
        # order: whether the queue was to be the client's (then deleted).
        # None, not an empty list, for the thousands that never have one.
        self.orphan_declares: list[bool] | None = None

    def attach(self, client: ClientChannel) -> None:
        """Carry `client`'s channel. What the broker sends on it then goes
        straight to the client's session unless the proxy must act on it
        (Upstream.routes, framing.cut_routed), or unless the client took a
        frame_max smaller than the broker's and bodies must be re-cut."""
        if self.client is None:
            self.upstream.carried += 1
        self.client = client
        if client.session.frame_max >= self.upstream.frame_max:
            self.upstream.routes[self.uid] = (*client.cid_bytes, client.session)

    def detach(self) -> None:
        if self.client is not None:
            self.upstream.carried -= 1
        self.client = None
        self.upstream.routes.pop(self.uid, None)

    def write(self, frame: bytes) -> None:
        self.upstream.writer.write(frame)

    def from_broker(self, frame_type: int, frame: bytes) -> None:
        index = 0
        if frame_type == FRAME_METHOD:
            index = method_index(frame)
            if index in _LIFECYCLE:
                if index == _OPEN_OK:
                    self._opened()
                elif index == _CLOSE:
                    self._closed_by_broker(frame)
                elif index == _CLOSE_OK:
                    self._close_ok(frame)
                return
            if index == _RECOVER_OK and self.probing:
                self.probing = False
                self.proven_body = max(self.proven_body, self.proving)
                self.upstream.pool.return_idle(self)
                return
        client = self.client
        if client is not None:
            client.from_broker(frame_type, frame, index)
        elif index == _DECLARE_OK and self.orphan_declares:
            # Popped whatever it says: the next DeclareOk is the next declare's.
            owned = self.orphan_declares.pop(0)
            if owned:
                self.upstream.delete_queues([methods.decode(frame).queue])

    def _opened(self) -> None:
        if self.client is not None:
            # Its client's OpenOk, even with the client's Close on its way:
            # the broker's CloseOk follows it, as it would directly.
            self.client.upstream_opened()
        elif not (self.closing or self.probing):
            self.upstream.pool.add_idle(self)

    def _closed_by_broker(self, frame: bytes) -> None:
        self.closing = True
        self.probing = False
        self.owes_close_ok = True
        if self.client is not None:
            # The client answers with CloseOk (client_close_ok), as it would
            # answer the broker directly.
            self.client.from_broker(FRAME_METHOD, frame, _CLOSE)
        else:
            self.upstream.pool.forget_idle(self)
            self.client_close_ok()

    def _close_ok(self, frame: bytes) -> None:
        self.awaiting_close_ok = False
        if self.client is not None:
            self.client.from_broker(FRAME_METHOD, frame, _CLOSE_OK)
        self._release_if_done()

    # -- what the client side asks -----------------------------------------

    def client_close(self, frame: bytes) -> None:
        """Forward the client's own Channel.Close (already on our channel id)."""
        self.closing = True
        self.awaiting_close_ok = True
        self.write(frame)

    def client_close_ok(self) -> None:
        """Answer the broker's Channel.Close (for the client, or on its behalf)."""
        if self.owes_close_ok:
            self.owes_close_ok = False
            self.upstream.write_close_ok(self)
        self._release_if_done()

    @property
    def healthy(self) -> bool:
        """Open (or opening) with no close under way in either direction."""
        return not (self.closing or self.owes_close_ok or self.awaiting_close_ok)

    def recycle(self, unsettled: bool, largest_body: int) -> None:
        """Its client is done and changed no channel state. Idle at once if
        everything the client sent was a quiet publish of at most
        proven_body octets; else probe it, and make it idle once the probe
        comes back clean."""
        self.detach()
        pool = self.upstream.pool
        if not unsettled and largest_body <= self.proven_body:
            pool.worker.stats.channels_unprobed += 1
            pool.return_idle(self)
            return
        pool.worker.stats.channels_probed += 1
        self.proving = -1 if unsettled else largest_body
        self.probing = True
        self.write(rewrite_channel(_PROBE, self.uid_bytes))

    def close(self, owned_declares: typing.Sequence[bool] = ()) -> None:
        """Close it, detached from its client: the client left, the proxy
        closed the client's channel (405), or the pool has idle channels to
        spare. Answers a pending broker Close instead if there is one.
        `owned_declares`: the client's unanswered declares (orphan_declares)."""
        if owned_declares:
            self.orphan_declares = list(owned_declares)
        self.detach()
        if self.owes_close_ok:
            self.client_close_ok()
            return
        if not self.awaiting_close_ok:
            self.closing = True
            self.awaiting_close_ok = True
            self.upstream.write_close(self)

    def _release_if_done(self) -> None:
        if not self.owes_close_ok and not self.awaiting_close_ok:
            client = self.client
            self.detach()
            self.upstream.release(self)
            if client is not None:
                client.slot_released()
