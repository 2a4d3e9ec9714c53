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
# An upstream open this long (s) before the pool lost its last one starts
# the next outage's redials at the first backoff delay again.
STEADY_AFTER = 30.0


class UpstreamUnavailable(Exception):
    """The broker cannot be reached now; the pool is waiting to redial."""


class Pool:
    def __init__(self, worker: Worker, credentials: Credentials, vhost: str) -> None:
        self.worker = worker
        self.config: Config = worker.config
        self.credentials = credentials
        self.vhost = vhost
        self.upstreams: list[Upstream] = []
        # One of them is blocked by the broker (Connection.Blocked).
        self.blocked = False
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
        # Dials toward min_upstream_connections wait this long after any dial
        # fails, so a broker refusing more connections is not asked at every client.
        self._spread_backoff = Backoff()
        self._spread_after = 0.0
        # Redials after the last upstream was lost. Kept from one outage to
        # the next unless an upstream stayed open for STEADY_AFTER: a broker
        # that takes the connection and drops it again at once (a node
        # shutting down) is otherwise redialled every half second for ever.
        self._redial_backoff = Backoff()
        self._opened_at = 0.0
        # The last dial failure _dial_failed logged (see _dial_done).
        self._reported: BaseException | None = None
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
            self._dial.add_done_callback(self._dial_done)

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
        self._spread_after = 0.0
        metrics.UPSTREAM_DIAL_SECONDS.observe(time.monotonic() - started)
        metrics.UPSTREAM_LAST_DIAL_SUCCESS.set(time.time())
        self._opened_at = time.monotonic()
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
        self._ready_one(upstream)
        self.replenish_idle()
        return upstream

    def _dial_done(self, dial: asyncio.Task) -> None:
        """A dial toward the minimum has nobody awaiting it: a failure
        _dial_failed logged is not logged again as never retrieved, and any
        other is logged as the bug it is."""
        if dial.cancelled():
            return
        error = dial.exception()
        if error is not None and error is not self._reported:
            log.error("dial for %r failed", self, exc_info=error)

    def _dial_failed(self, error: BaseException) -> None:
        self._reported = error
        self._spread_after = time.monotonic() + self._spread_backoff.next_delay()
        self.unavailable = _describe(error)
        log.warning("dial for %r failed: %s", self, self.unavailable)
        for channel in list(self.waiting):
            self.stop_waiting(channel)
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
        if time.monotonic() - self._opened_at >= STEADY_AFTER:
            self._redial_backoff = Backoff()
        backoff = self._redial_backoff
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
        pool redials with backoff (DESIGN rule 8): those with a channel on
        it, and those owning a queue there (exclusive to that connection at
        the broker, it went with it)."""
        sessions = {slot.client.session for slot in upstream.slots.values() if slot.client}
        for name, owned_on in self._owned_on.items():
            if owned_on is upstream:
                sessions.add(self.owners[name])
        self._forget(upstream)
        if expected:
            log.info("upstream for %r closed", self)
            return
        log.warning("upstream for %r lost: %s", self, reason)
        for session in sessions:
            session.force_close(ReplyCode.CONNECTION_FORCED, f"CONNECTION_FORCED - {reason}")
        if not self.upstreams and self._reconnect is None:
            self.unavailable = reason
            self._reconnect = self.worker.spawn(self._redial())
        else:
            self._spread()

    def _forget(self, upstream: Upstream) -> None:
        if upstream in self.upstreams:
            self.upstreams.remove(upstream)
            if upstream.blocked:
                # Its own clients still see it blocked until their 320; the
                # ones with no channel yet may not be blocked any more.
                self.upstream_blocked_changed()
        upstream.idle.clear()
        for name, owner_upstream in list(self._owned_on.items()):
            if owner_upstream is upstream:
                self.disown(name, self.owners.get(name))

    def _best(self, upstreams: list[Upstream], with_idle: bool = False) -> Upstream | None:
        """Of `upstreams`, the one a new channel goes to: among the pool's
        first min_upstream_connections, the one carrying fewest client
        channels (`with_idle`: fewest carried or idle, counting those being
        opened); past them the earliest dialled, so later ones fill only
        when those are full (rule 4)."""
        if len(upstreams) == 1:
            return upstreams[0]
        spread = self.config.pool.min_upstream_connections
        best, best_key = None, (2, 0)
        for index, upstream in enumerate(self.upstreams):
            if upstream not in upstreams:
                continue
            if index >= spread:
                key = (1, index)
            elif with_idle:
                key = (0, upstream.carried + len(upstream.idle) + upstream.idle_opening)
            else:
                key = (0, upstream.carried)
            if key < best_key:
                best, best_key = upstream, key
        return best

    def _room(self, preferred: Upstream | None) -> Upstream | None:
        """`preferred` if it has room, else the best upstream with room."""
        if preferred is not None and preferred.has_room:
            return preferred
        return self._best([upstream for upstream in self.upstreams if upstream.has_room])

    def channel_freed(self, upstream: Upstream) -> None:
        if self.waiting:
            self._serve_waiting()

    # -- client channels -----------------------------------------------------------

    def attach(self, channel: ClientChannel) -> None:
        """Carry a client's new channel on the client's home upstream if it
        has one with an idle channel or room, else on the best upstream
        (_best): an idle pre-opened channel there is answered at once, else a
        new one is opened; with no room anywhere, wait a bounded time for a
        dial or a freed channel."""
        self._spread()
        home = channel.session.home
        if home is not None and not home.closed and (home.idle or home.has_room):
            upstream = home
        else:
            usable = [u for u in self.upstreams if u.idle or u.has_room]
            upstream = self._best(usable) if usable else None
            if upstream is not None and not upstream.idle and not self._spreading:
                # Filled one by one (rule 4): an idle channel elsewhere answers
                # at once, where a new one here would cost a round trip.
                upstream = next((u for u in usable if u.idle), upstream)
        if upstream is not None:
            if upstream.idle:
                channel.bind(upstream.idle.popleft(), answer_open=False)
                self.replenish_idle()
            else:
                channel.bind(upstream.open_channel(), answer_open=True)
            self._ready_one(upstream)
            return
        if self._reconnect is not None and self._dial is None:
            # The broker went away and the pool waits to redial it (rule 8):
            # what a client arriving now gets at StartOk, without a dial of
            # its own, which would skip the backoff. (During the redial's
            # dial it waits for that, as a client at StartOk does.)
            channel.session.force_close(
                ReplyCode.CONNECTION_FORCED,
                f"CONNECTION_FORCED - upstream unavailable: {self.unavailable}",
            )
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

    def stop_waiting(self, channel: ClientChannel) -> None:
        """`channel` no longer waits (bound, closed, or its client left)."""
        timer = self.waiting.pop(channel, None)
        if timer is not None:
            timer.cancel()

    def _waiters(self) -> typing.Iterator[ClientChannel]:
        """The channels waiting for an upstream channel, oldest first; one
        whose client left or closed it meanwhile stops waiting instead,
        unless it still holds what the client sent before (held_close)."""
        for channel in list(self.waiting):
            if (
                channel.held_close is not None
                or channel.session.channels.get(channel.cid) is channel
            ):
                yield channel
            else:
                self.stop_waiting(channel)

    def _serve_waiting(self) -> None:
        for channel in self._waiters():
            upstream = self._room(channel.session.home)
            if upstream is None:
                return
            self.stop_waiting(channel)
            channel.bind(upstream.open_channel(), answer_open=True)

    def _idle_count(self) -> int:
        return sum(len(upstream.idle) for upstream in self.upstreams)

    def replenish_idle(self) -> None:
        """Open idle channels up to idle_channels, each where the next client
        would go (_best, counting what is idle there), so it finds one ready."""
        ready = sum(len(upstream.idle) + upstream.idle_opening for upstream in self.upstreams)
        want = self.config.pool.idle_channels - ready
        if want <= 0 or self.waiting:
            return
        for _ in range(want):
            upstream = self._best([u for u in self.upstreams if u.has_room], with_idle=True)
            if upstream is None:
                return
            upstream.open_idle_channel()

    @property
    def _spreading(self) -> bool:
        return self.config.pool.min_upstream_connections > 1

    def _ready_one(self, upstream: Upstream) -> None:
        """When clients are spread, one idle channel on an upstream that has
        none ready or coming: clients are sent where fewest are carried,
        which need not be where the idle channels are, and each would wait a
        round trip."""
        if (
            self._spreading
            and self.config.pool.idle_channels
            and not upstream.idle
            and not upstream.idle_opening
            and upstream.has_room
        ):
            upstream.open_idle_channel()

    def add_idle(self, slot: UpstreamChannel) -> None:
        """A channel the pool opened to be idle is open."""
        slot.upstream.idle_opened(slot)
        self.return_idle(slot)

    def return_idle(self, slot: UpstreamChannel) -> None:
        """An open channel nobody uses: keep it ready, unless enough are."""
        if slot.upstream.closed:
            return
        for channel in self._waiters():
            # A client waits for a channel (every id in use): this one is ready.
            self.stop_waiting(channel)
            channel.bind(slot, answer_open=False)
            return
        if slot.upstream.spare(slot):
            return
        slot.upstream.idle.append(slot)
        if self._idle_count() > self.config.pool.max_idle_channels:
            # Enough are ready: close the oldest where most are idle, so the
            # idle channels stay where clients are sent.
            fullest = max(self.upstreams, key=lambda upstream: len(upstream.idle))
            fullest.idle.popleft().close()

    def forget_idle(self, slot: UpstreamChannel) -> None:
        if slot in slot.upstream.idle:
            slot.upstream.idle.remove(slot)

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
        if self.blocked:
            session.retell_blocked()

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

    def upstream_blocked_changed(self) -> None:
        """An upstream was blocked or unblocked, or a blocked one went: each
        client whose own connection that changes is told (rule 7)."""
        self.blocked = any(upstream.blocked for upstream in self.upstreams)
        for session in self.sessions:
            session.retell_blocked()


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

    def logged_in(self, credentials: Credentials) -> bool:
        """Whether an open upstream was logged in with exactly these credentials."""
        pools = self._by_credentials.get(credentials)
        if pools is not None:
            for pool in pools.values():  # a loop: no generator for every client
                if pool.upstreams:
                    return True
        return False

    def ready(self, credentials: Credentials, vhost: str) -> Pool | None:
        """The pool for these credentials and vhost, if it has an open upstream."""
        pool = self._pools.get((credentials, vhost))
        return pool if pool is not None and pool.upstreams else None

    async def login(self, credentials: Credentials) -> Upstream | None:
        """Have the broker check a password, as it does after StartOk: None
        when a pool already holds a connection logged in with exactly these
        credentials (or another client's login for them just succeeded),
        else a new logged-in connection, not yet open on a vhost, for the
        caller to hand to get(). UpstreamRefused if the broker says no;
        UpstreamUnavailable, without a dial, while a pool of these
        credentials waits to redial a broker that went away: a login per
        arriving client would dial it at their rate, backoff or not."""
        if self.logged_in(credentials):
            return None
        for pool in self._by_credentials.get(credentials, {}).values():
            if pool.reconnecting:
                raise UpstreamUnavailable(pool.unavailable)
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
