"""The upstream connections of one (user, password, vhost), and the registry
of pools in a worker.

A pool exists only once the broker has accepted its credentials, and a
pooled upstream is reused only for the identical triple (DESIGN rule 2).
It fills open upstreams before dialling another (rule 4), unless the
operator asks for more (pool.min_upstream_connections): then it keeps that
many while it has clients and puts each new client on the one of them
carrying fewest channels, since RabbitMQ reads each connection with one
process. A few pre-opened idle channels answer a client's Channel.Open
without a round trip. When its last upstream is lost it redials with
backoff (rule 8); upstreams nobody uses are closed by the sweep, and a pool
nobody uses disappears.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import typing

from amqplex import metrics
from amqplex.config import Config
from amqplex.protocol.auth import Credentials
from amqplex.protocol.constants import ReplyCode
from amqplex.worker.backoff import Backoff
from amqplex.worker.upstream import Upstream, UpstreamRefused

if typing.TYPE_CHECKING:
    from amqplex.worker.client_channel import ClientChannel
    from amqplex.worker.server import Worker
    from amqplex.worker.session import ClientSession
    from amqplex.worker.upstream_channel import UpstreamChannel

log = logging.getLogger(__name__)

PoolKey = tuple[Credentials, str]
Placement = typing.Callable[["Upstream"], tuple[int, int]]


class UpstreamUnavailable(Exception):
    """The broker cannot be reached now; the pool is waiting to redial."""


class Pool:
    def __init__(self, worker: Worker, credentials: Credentials, vhost: str) -> None:
        self.worker = worker
        self.config: Config = worker.config
        self.credentials = credentials
        self.vhost = vhost
        self.upstreams: list[Upstream] = []
        self.idle: collections.deque[UpstreamChannel] = collections.deque()
        self.idle_opening = 0
        # Client channels waiting for an upstream with room, each with the
        # timer that refuses it if none comes in time.
        self.waiting: dict[ClientChannel, asyncio.TimerHandle] = {}
        self.sessions: set[ClientSession] = set()
        # Exclusive and server-named queues, by name: the client that declared
        # each and the upstream that owns it at the broker (DESIGN rule 7).
        self.owners: dict[str, ClientSession] = {}
        self._owned_on: dict[str, Upstream] = {}
        # The same by session (names as an ordered set), so a session that
        # leaves finds its queues without a walk over everybody's.
        self._owned_by: dict[ClientSession, dict[str, None]] = {}
        self._dial: asyncio.Task | None = None
        self._reconnect: asyncio.Task | None = None
        # Dials toward min_upstream_connections wait this long after one fails,
        # so a broker that refuses more connections is not asked at every client.
        self._spread_backoff = Backoff()
        self._spread_after = 0.0
        self.unavailable = ""
        self.unused_since: float | None = None

    def __repr__(self) -> str:
        return f"<Pool user={self.credentials.username!r} vhost={self.vhost!r}>"

    @property
    def reconnecting(self) -> bool:
        return self._reconnect is not None

    # -- dialling ------------------------------------------------------------------

    async def connect(self, login: Upstream | None = None) -> None:
        """Make sure an upstream is open: join the dial under way or start one
        (opening the vhost on `login`, a connection a client's StartOk
        already logged in, when there is one). While the pool waits to redial
        a broker that went away, fail fast instead of hammering it."""
        busy = self.upstreams or self._dial is not None or self._reconnect is not None
        if busy and login is not None:
            login.discard_login()
        if self.upstreams:
            return
        if self._dial is None:
            if self._reconnect is not None:
                raise UpstreamUnavailable(self.unavailable)
            self._start_dial(login)
        await asyncio.shield(self._dial)

    def _start_dial(self, login: Upstream | None = None) -> None:
        if self._dial is None:
            self._dial = self.worker.spawn(self._dial_once(login))

    async def _dial_once(self, login: Upstream | None) -> Upstream:
        started = time.monotonic()
        config = self.config.upstream
        try:
            if login is None:
                upstream = await Upstream.open(
                    self, config, self.credentials, self.vhost, self.config.pool.max_channels
                )
            else:
                await login.open_vhost(self, self.vhost, config.connect_timeout)
                upstream = login
        except BaseException as error:
            if not isinstance(error, UpstreamRefused):
                metrics.UPSTREAM_LAST_DIAL_FAILURE.set(time.time())
            self._dial_failed(error)
            raise
        finally:
            self._dial = None
        self._spread_backoff = Backoff()
        metrics.UPSTREAM_DIAL_SECONDS.observe(time.monotonic() - started)
        metrics.UPSTREAM_LAST_DIAL_SUCCESS.set(time.time())
        self.upstreams.append(upstream)
        self.worker.learn(upstream)
        log.info(
            "upstream %d for %r open (channel_max %d)",
            len(self.upstreams),
            self,
            upstream.channel_max,
        )
        self._serve_waiting()
        if self.waiting and self._may_dial():
            # More clients waited than this upstream had room for: the rest
            # would otherwise wait until acquire_timeout refuses them.
            self._start_dial()
        self.replenish_idle()
        spreading = len(self.upstreams) <= self.config.pool.min_upstream_connections
        if spreading and self.config.pool.idle_channels and not upstream.slots:
            # The pool's idle channels are all elsewhere, yet the next client
            # goes here (it carries nobody): one ready here answers it at once.
            upstream.open_channel().for_idle = True
            self.idle_opening += 1
        return upstream

    def _dial_failed(self, error: BaseException) -> None:
        self._spread_after = time.monotonic() + self._spread_backoff.next_delay()
        self.unavailable = _describe(error)
        log.warning("dial for %r failed: %s", self, self.unavailable)
        for channel in list(self.waiting):
            self._stop_waiting(channel)
            channel.session.force_close(
                ReplyCode.CONNECTION_FORCED,
                f"CONNECTION_FORCED - upstream unavailable: {self.unavailable}",
            )

    def _may_dial(self) -> bool:
        limit = self.config.pool.max_upstream_connections
        return limit == 0 or len(self.upstreams) < limit

    def _spread(self) -> None:
        """Dial another upstream in the background while the pool has fewer
        than min_upstream_connections: one broker connection is read by one
        process, so heavy clients on a single upstream are capped by it."""
        if (
            len(self.upstreams) < self.config.pool.min_upstream_connections
            and self._dial is None
            and self._reconnect is None
            and self._may_dial()
            and time.monotonic() >= self._spread_after
        ):
            self._start_dial()

    async def _redial(self) -> None:
        """Redial after the last upstream was lost, with backoff, until the
        broker answers (or refuses these credentials: then the pool goes)."""
        backoff = Backoff()
        try:
            while not self.upstreams:
                await asyncio.sleep(backoff.next_delay())
                if self.upstreams:
                    break
                self.worker.stats.upstream_reconnect_attempts += 1
                log.info("redialling for %r (attempt %d)", self, backoff.attempts)
                self._start_dial()
                try:
                    await asyncio.shield(self._dial)
                except UpstreamRefused:
                    self.worker.pools.discard(self)
                    return
                except Exception:  # unreachable, timed out: try again later
                    continue
        finally:
            self._reconnect = None

    def upstream_lost(self, upstream: Upstream, reason: str, expected: bool) -> None:
        """Every client of a lost upstream gets 320 CONNECTION_FORCED, then the
        pool redials with backoff (DESIGN rule 8)."""
        self._forget(upstream)
        if expected:
            log.info("upstream for %r closed", self)
            return
        log.warning("upstream for %r lost: %s", self, reason)
        sessions = {slot.client.session for slot in upstream.slots.values() if slot.client}
        for session in sessions:
            session.force_close(ReplyCode.CONNECTION_FORCED, f"CONNECTION_FORCED - {reason}")
        if not self.upstreams and self._reconnect is None:
            self.unavailable = reason
            self._reconnect = self.worker.spawn(self._redial())

    def _forget(self, upstream: Upstream) -> None:
        if upstream in self.upstreams:
            self.upstreams.remove(upstream)
        self.idle = collections.deque(s for s in self.idle if s.upstream is not upstream)
        self.idle_opening = sum(1 for u in self.upstreams for s in u.slots.values() if s.for_idle)
        for name, owner_upstream in list(self._owned_on.items()):
            if owner_upstream is upstream:
                self.disown(name, self.owners.get(name))

    def _placement(self, ready: collections.Counter | None = None) -> Placement:
        """The order in which upstreams take a new channel: of the first
        min_upstream_connections, the one carrying fewest client channels
        (with `ready`, fewest carried or ready) first; after them the others
        in the order they were dialled, so those fill up first (rule 4)."""
        position = {upstream: index for index, upstream in enumerate(self.upstreams)}
        spread = self.config.pool.min_upstream_connections

        def key(upstream: Upstream) -> tuple[int, int]:
            index = position.get(upstream, len(position))
            if index >= spread:
                return (1, index)
            return (0, upstream.carried + (ready[upstream] if ready else 0))

        return key

    def _room(self, preferred: Upstream | None) -> Upstream | None:
        """`preferred` if it has room, else the first upstream with room in
        placement order."""
        if preferred is not None and preferred.has_room:
            return preferred
        rooms = [upstream for upstream in self.upstreams if upstream.has_room]
        return min(rooms, key=self._placement(), default=None)

    def channel_freed(self, upstream: Upstream) -> None:
        if self.waiting:
            self._serve_waiting()

    # -- client channels -----------------------------------------------------------

    def attach(self, channel: ClientChannel) -> None:
        """Carry a client's new channel: an idle pre-opened one if there is one
        (answered at once), else a new channel on an upstream with room, else
        wait a bounded time for a dial or a freed channel. A client's first
        channel goes where fewest are carried; the rest follow it (home)."""
        self._spread()
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
        timeout = self.config.pool.acquire_timeout
        self.waiting[channel] = self.worker.loop.call_later(timeout, self._waited_too_long, channel)
        if self._may_dial():
            self._start_dial()

    def _waited_too_long(self, channel: ClientChannel) -> None:
        self.waiting.pop(channel, None)
        limit = self.config.pool.max_upstream_connections
        channel.session.force_close(
            ReplyCode.NOT_ALLOWED,
            f"NOT_ALLOWED - no upstream channel free within "
            f"{self.config.pool.acquire_timeout:g} s (pool.max_upstream_connections={limit}, "
            f"pool.max_channels={self.config.pool.max_channels})",
        )

    def _stop_waiting(self, channel: ClientChannel) -> None:
        timer = self.waiting.pop(channel, None)
        if timer is not None:
            timer.cancel()

    def _serve_waiting(self) -> None:
        for channel in list(self.waiting):
            if channel.session.channels.get(channel.cid) is not channel:
                self._stop_waiting(channel)  # its client left or closed it meanwhile
                continue
            upstream = self._room(channel.session.home)
            if upstream is None:
                return
            self._stop_waiting(channel)
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
        key = self._placement()
        slot = min(self.idle, key=lambda slot: key(slot.upstream))  # the oldest among equals
        self.idle.remove(slot)
        return slot

    def replenish_idle(self) -> None:
        """Open idle channels up to idle_channels, each on the upstream with
        room where fewest channels are carried or ready, so the upstream the
        next client is sent to has one ready for it."""
        want = self.config.pool.idle_channels - len(self.idle) - self.idle_opening
        if want <= 0 or self.waiting:
            return
        ready = collections.Counter(slot.upstream for slot in self.idle)
        key = self._placement(ready)
        for _ in range(want):
            rooms = [upstream for upstream in self.upstreams if upstream.has_room]
            if not rooms:
                return
            upstream = min(rooms, key=key)
            upstream.open_channel().for_idle = True
            ready[upstream] += 1
            self.idle_opening += 1

    def add_idle(self, slot: UpstreamChannel) -> None:
        """A channel the pool opened to be idle is open."""
        if slot.for_idle:
            slot.for_idle = False
            self.idle_opening = max(0, self.idle_opening - 1)
        self.return_idle(slot)

    def return_idle(self, slot: UpstreamChannel) -> None:
        """An open channel nobody uses: keep it ready, unless enough are."""
        if slot.upstream.closed:
            return
        if len(self.idle) >= self.config.pool.max_idle_channels:
            slot.close()
            return
        self.idle.append(slot)

    def forget_idle(self, slot: UpstreamChannel) -> None:
        if slot in self.idle:
            self.idle.remove(slot)

    # -- idle cleanup ------------------------------------------------------------------

    def sweep(self, now: float) -> bool:
        """Close upstreams that carried no client channel for idle_timeout,
        keeping min_upstream_connections while the pool has clients; True
        when the whole pool is unused and can be dropped."""
        idle_timeout = self.config.pool.idle_timeout
        keep = self.config.pool.min_upstream_connections if self.sessions else 0
        for upstream in list(self.upstreams):
            if upstream.carried:
                upstream.idle_since = None
            elif upstream.idle_since is None:
                upstream.idle_since = now
            elif now - upstream.idle_since >= idle_timeout and len(self.upstreams) > keep:
                log.info(
                    "closing upstream for %r: idle for %.0f s", self, now - upstream.idle_since
                )
                self._forget(upstream)
                upstream.close()
        if self.sessions or self.waiting or self._dial is not None:
            self.unused_since = None
            return False
        if self.unused_since is None:
            self.unused_since = now
        return not self.upstreams and (
            self._reconnect is None or now - self.unused_since >= idle_timeout
        )

    def drop(self) -> None:
        if self._reconnect is not None:
            self._reconnect.cancel()
        for upstream in list(self.upstreams):
            self._forget(upstream)
            upstream.close()

    # -- sessions, queue ownership, flow ------------------------------------------

    def session_joined(self, session: ClientSession) -> None:
        self.sessions.add(session)
        if any(upstream.blocked for upstream in self.upstreams):
            session.notify_blocked("")

    def session_left(self, session: ClientSession) -> None:
        self.sessions.discard(session)
        mine = list(self._owned_by.get(session, ()))
        by_upstream: dict[Upstream, list[str]] = {}
        for name in mine:
            upstream = self._owned_on.get(name)
            self.disown(name, session)
            if upstream is not None and not upstream.closed:
                by_upstream.setdefault(upstream, []).append(name)
        for upstream, names in by_upstream.items():
            upstream.delete_queues(names)

    def own(self, queue: str, session: ClientSession, upstream: Upstream) -> None:
        self.disown(queue, self.owners.get(queue))
        self.owners[queue] = session
        self._owned_on[queue] = upstream
        self._owned_by.setdefault(session, {})[queue] = None

    def disown(self, queue: str, session: ClientSession | None) -> None:
        if self.owners.get(queue) is session:
            self.owners.pop(queue, None)
            self._owned_on.pop(queue, None)
            names = self._owned_by.get(session)
            if names is not None:
                names.pop(queue, None)
                if not names:
                    del self._owned_by[session]

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
        # The same by credentials alone: every client's StartOk asks about
        # them (logged_in), before its vhost is known.
        self._by_credentials: dict[Credentials, dict[str, Pool]] = {}
        # Pools whose first dial is under way: not trusted until it succeeds.
        self._candidates: dict[PoolKey, Pool] = {}
        # Logins under way, so a burst of new clients with the same new
        # credentials costs the broker one connection, not one each.
        self._logins: dict[Credentials, asyncio.Task] = {}

    def __iter__(self) -> typing.Iterator[Pool]:
        return iter(list(self._pools.values()))

    def __len__(self) -> int:
        return len(self._pools)

    def logged_in(self, credentials: Credentials) -> bool:
        """Whether an open upstream was logged in with exactly these credentials."""
        pools = self._by_credentials.get(credentials, {})
        return any(pool.upstreams for pool in pools.values())

    def ready(self, credentials: Credentials, vhost: str) -> Pool | None:
        """The pool for these credentials and vhost, if it has an open upstream."""
        pool = self._pools.get((credentials, vhost))
        return pool if pool is not None and pool.upstreams else None

    async def login(self, credentials: Credentials) -> Upstream | None:
        """Have the broker check a password, as it does after StartOk: None
        when a pool already holds a connection logged in with exactly these
        credentials (or another client's login for them just succeeded),
        else a new logged-in connection, not yet open on a vhost, for the
        caller to hand to get(). UpstreamRefused if the broker says no."""
        if self.logged_in(credentials):
            return None
        pending = self._logins.get(credentials)
        if pending is not None:
            await asyncio.shield(pending)
            return None
        config = self.worker.config
        pending = self.worker.spawn(
            Upstream.login(config.upstream, credentials, config.pool.max_channels)
        )
        self._logins[credentials] = pending
        try:
            return await asyncio.shield(pending)
        finally:
            del self._logins[credentials]

    async def get(
        self, credentials: Credentials, vhost: str, login: Upstream | None = None
    ) -> Pool:
        """The pool for exactly these credentials and vhost, opening one (and
        so having the broker check the vhost) if none of theirs is open. A
        refusal leaves nothing behind."""
        key = (credentials, vhost)
        pool = self._pools.get(key) or self._candidates.get(key)
        if pool is None:
            pool = self._candidates[key] = Pool(self.worker, credentials, vhost)
        try:
            await pool.connect(login)
        except UpstreamRefused:
            self._remove(key, pool)
            raise
        except BaseException:
            if self._candidates.get(key) is pool:
                del self._candidates[key]
            raise
        if self._candidates.get(key) is pool:
            del self._candidates[key]
            self._pools[key] = pool
            self._by_credentials.setdefault(credentials, {})[vhost] = pool
        return pool

    def discard(self, pool: Pool) -> None:
        self._remove((pool.credentials, pool.vhost), pool)

    def _remove(self, key: PoolKey, pool: Pool) -> None:
        for registry in (self._pools, self._candidates):
            if registry.get(key) is pool:
                del registry[key]
        credentials, vhost = key
        by_vhost = self._by_credentials.get(credentials, {})
        if by_vhost.get(vhost) is pool:
            del by_vhost[vhost]
            if not by_vhost:
                del self._by_credentials[credentials]
        pool.drop()

    def sweep(self, now: float) -> None:
        for pool in list(self._pools.values()):
            if pool.sweep(now):
                log.info("dropping unused %r", pool)
                self.discard(pool)


def _describe(error: BaseException) -> str:
    if isinstance(error, UpstreamRefused):
        return error.text
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
