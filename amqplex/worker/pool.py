"""The upstream connections of one (user, password, vhost), and the registry
of pools in a worker.

A pool exists only once the broker has accepted its credentials, and a
pooled upstream is reused only for the identical triple (DESIGN rule 2). It
fills open upstreams before dialling another (rule 4) and keeps a few
pre-opened idle channels so a client's Channel.Open costs no round trip.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import typing

from amqplex.config import Config
from amqplex.protocol.auth import Credentials
from amqplex.protocol.constants import ReplyCode
from amqplex.worker.upstream import Upstream

if typing.TYPE_CHECKING:
    from amqplex.worker.client_channel import ClientChannel
    from amqplex.worker.server import Worker
    from amqplex.worker.session import ClientSession
    from amqplex.worker.upstream_channel import UpstreamChannel

log = logging.getLogger(__name__)

PoolKey = tuple[Credentials, str]


class Pool:
    def __init__(self, worker: Worker, credentials: Credentials, vhost: str) -> None:
        self.worker = worker
        self.config: Config = worker.config
        self.credentials = credentials
        self.vhost = vhost
        self.upstreams: list[Upstream] = []
        self.idle: collections.deque[UpstreamChannel] = collections.deque()
        self.idle_opening = 0
        # Client channels waiting for an upstream with room.
        self.waiting: collections.deque[ClientChannel] = collections.deque()
        self.sessions: set[ClientSession] = set()
        # Exclusive and server-named queues, by name: the client that declared
        # each and the upstream that owns it at the broker (DESIGN rule 7).
        self.owners: dict[str, ClientSession] = {}
        self._owned_on: dict[str, Upstream] = {}
        self._dial: asyncio.Task | None = None

    def __repr__(self) -> str:
        return f"<Pool user={self.credentials.username!r} vhost={self.vhost!r}>"

    # -- upstreams ---------------------------------------------------------------

    async def dial(self) -> Upstream:
        upstream = await Upstream.open(
            self,
            self.config.upstream,
            self.credentials,
            self.vhost,
            self.config.pool.max_channels,
        )
        self.upstreams.append(upstream)
        self.worker.learn(upstream)
        log.info(
            "upstream %d for %r open (channel_max %d)",
            len(self.upstreams),
            self,
            upstream.channel_max,
        )
        self._serve_waiting()
        self.replenish_idle()
        return upstream

    def _may_dial(self) -> bool:
        limit = self.config.pool.max_upstream_connections
        return self._dial is None and (limit == 0 or len(self.upstreams) < limit)

    def _start_dial(self) -> None:
        if self._may_dial():
            self._dial = self.worker.spawn(self._dial_for_waiting())

    async def _dial_for_waiting(self) -> None:
        try:
            await self.dial()
        except Exception as error:  # refused, unreachable, timed out
            log.warning("dial for %r failed: %s", self, error)
            waiting, self.waiting = self.waiting, collections.deque()
            for channel in waiting:
                channel.session.force_close(
                    ReplyCode.CONNECTION_FORCED,
                    f"CONNECTION_FORCED - upstream unavailable: {error}",
                )
        finally:
            self._dial = None
        if self.waiting:
            self._start_dial()

    def _room(self, preferred: Upstream | None) -> Upstream | None:
        if preferred is not None and preferred.has_room:
            return preferred
        for upstream in self.upstreams:
            if upstream.has_room:
                return upstream
        return None

    def upstream_lost(self, upstream: Upstream, reason: str) -> None:
        """Every client of a lost upstream gets 320 CONNECTION_FORCED (rule 8)."""
        if upstream in self.upstreams:
            self.upstreams.remove(upstream)
        if reason == "closed by amqplex":
            log.info("upstream for %r closed", self)
        else:
            log.warning("upstream for %r lost: %s", self, reason)
        self.idle = collections.deque(s for s in self.idle if s.upstream is not upstream)
        sessions = {slot.client.session for slot in upstream.slots.values() if slot.client}
        for session in sessions:
            session.force_close(ReplyCode.CONNECTION_FORCED, f"CONNECTION_FORCED - {reason}")
        for name, owner_upstream in list(self._owned_on.items()):
            if owner_upstream is upstream:
                self.disown(name, self.owners.get(name))
        self.idle_opening = sum(
            1 for u in self.upstreams for s in u.slots.values() if s.opening and not s.client
        )

    def channel_freed(self, upstream: Upstream) -> None:
        if self.waiting:
            self._serve_waiting()

    # -- client channels -----------------------------------------------------------

    def attach(self, channel: ClientChannel) -> None:
        """Carry a client's new channel: an idle pre-opened one if there is one
        (answered at once), else a new channel on an upstream with room, else
        wait for a dial."""
        home = channel.session.home
        slot = self._take_idle(home)
        if slot is not None:
            channel.bind(slot, answer_open=False)
            self.replenish_idle()
            return
        upstream = self._room(home)
        if upstream is not None:
            channel.bind(upstream.open_channel(), answer_open=True)
            return
        self.waiting.append(channel)
        self._start_dial()

    def _serve_waiting(self) -> None:
        while self.waiting:
            channel = self.waiting[0]
            if channel.session.channels.get(channel.cid) is not channel:
                self.waiting.popleft()  # its client left or closed it meanwhile
                continue
            upstream = self._room(channel.session.home)
            if upstream is None:
                return
            self.waiting.popleft()
            channel.bind(upstream.open_channel(), answer_open=True)

    def _take_idle(self, home: Upstream | None) -> UpstreamChannel | None:
        if not self.idle:
            return None
        if home is not None and not home.closed:
            for slot in self.idle:
                if slot.upstream is home:
                    self.idle.remove(slot)
                    return slot
            return None
        return self.idle.popleft()

    def replenish_idle(self) -> None:
        want = self.config.pool.idle_channels - len(self.idle) - self.idle_opening
        for _ in range(want):
            upstream = self._room(None)
            if upstream is None or self.waiting:
                return
            upstream.open_channel()
            self.idle_opening += 1

    def add_idle(self, slot: UpstreamChannel) -> None:
        self.idle_opening = max(0, self.idle_opening - 1)
        self.idle.append(slot)

    def forget_idle(self, slot: UpstreamChannel) -> None:
        if slot in self.idle:
            self.idle.remove(slot)

    # -- sessions, queue ownership, flow ------------------------------------------

    def session_joined(self, session: ClientSession) -> None:
        self.sessions.add(session)
        if any(upstream.blocked for upstream in self.upstreams):
            session.notify_blocked("")

    def session_left(self, session: ClientSession) -> None:
        self.sessions.discard(session)
        mine = [name for name, owner in self.owners.items() if owner is session]
        by_upstream: dict[Upstream, list[str]] = {}
        for name in mine:
            upstream = self._owned_on.get(name)
            self.disown(name, session)
            if upstream is not None and not upstream.closed:
                by_upstream.setdefault(upstream, []).append(name)
        for upstream, names in by_upstream.items():
            upstream.delete_queues(names)

    def own(self, queue: str, session: ClientSession, upstream: Upstream) -> None:
        self.owners[queue] = session
        self._owned_on[queue] = upstream

    def disown(self, queue: str, session: ClientSession | None) -> None:
        if self.owners.get(queue) is session:
            self.owners.pop(queue, None)
            self._owned_on.pop(queue, None)

    def upstream_blocked(self, upstream: Upstream, reason: str) -> None:
        for session in self.sessions:
            session.notify_blocked(reason)

    def upstream_unblocked(self, upstream: Upstream) -> None:
        if any(u.blocked for u in self.upstreams):
            return
        for session in self.sessions:
            session.notify_unblocked()


class Pools:
    """The worker's pools by (credentials, vhost)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._pools: dict[PoolKey, Pool] = {}
        self._verifying: dict[PoolKey, asyncio.Future] = {}

    def __iter__(self):
        return iter(self._pools.values())

    async def get(self, credentials: Credentials, vhost: str) -> Pool:
        """The pool for exactly these credentials, dialling (and so having the
        broker verify them) if no upstream of theirs is open. A refusal leaves
        nothing behind."""
        key = (credentials, vhost)
        pool = self._pools.get(key)
        if pool is not None and pool.upstreams:
            return pool
        pending = self._verifying.get(key)
        if pending is None:
            pending = self.worker.loop.create_future()
            self._verifying[key] = pending
            self.worker.spawn(self._verify(key, pool or Pool(self.worker, *key), pending))
        return await asyncio.shield(pending)

    async def _verify(self, key: PoolKey, pool: Pool, result: asyncio.Future) -> None:
        try:
            await pool.dial()
        except BaseException as error:
            result.set_exception(error)
        else:
            self._pools[key] = pool
            result.set_result(pool)
        finally:
            del self._verifying[key]
            # Retrieve it here so a refusal nobody awaited is not logged as lost.
            if result.done() and not result.cancelled():
                result.exception()
