"""The master: one owner for every signal, gunicorn style.

It binds the listener before forking so all workers accept from one queue,
keeps `workers` worker processes alive (replacing a dead one, with backoff
when they keep dying), and turns signals into actions:

  HUP        re-read the configuration; start new workers, drain the old
  TERM, INT  drain: workers stop accepting, clients get drain_timeout to
             finish, then Connection.Close 320; exit 0
  QUIT       exit now
  TTIN/TTOU  one worker more / less
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import select
import signal
import socket
import ssl
import sys
import time
import typing

from prometheus_client import multiprocess
from setproctitle import setproctitle

from amqplex import logs, metrics, tls
from amqplex.board import Board, Seat
from amqplex.config import Config, ConfigError
from amqplex.config.settings import mask_password
from amqplex.master import listener
from amqplex.master.limits import raise_nofile_limit
from amqplex.master.status import StatusServer
from amqplex.master.systemd import notify

log = logging.getLogger(__name__)

# A worker that dies sooner than this after it started counts toward backoff.
QUICK_DEATH = 5.0
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
# After drain_timeout and the close handshake, how long before SIGKILL.
KILL_GRACE = 5.0
# How often the master looks whether a reload's new workers accept yet.
REPLACED_CHECK = 0.02


@dataclasses.dataclass(slots=True)
class WorkerProcess:
    pid: int
    slot: int
    started: float
    seat: Seat | None
    draining: bool = False
    # When a draining worker is killed if it has not exited (monotonic).
    kill_at: float | None = None


class Arbiter:
    SIGNALS = ("HUP", "QUIT", "INT", "TERM", "TTIN", "TTOU", "CHLD")

    def __init__(
        self,
        config: Config,
        reload: typing.Callable[[], Config],
        run_worker: typing.Callable[[Config, socket.socket, int, Seat | None], int],
    ) -> None:
        self.config = config
        self._reload = reload
        self._run_worker = run_worker
        self.num_workers = config.workers
        self.workers: dict[int, WorkerProcess] = {}
        self.listener: socket.socket | None = None
        # Clients per worker, for the workers' least-connections gate.
        self.board = Board()
        self._signals: list[int] = []
        self._wake_r = self._wake_w = -1
        self._failures = 0
        self._next_spawn = 0.0
        self.status: StatusServer | None = None
        # The SSL contexts of the running configuration: /ready's probe
        # dials an amqps:// broker as the workers do.
        self._contexts = tls.Contexts()
        self.draining = False
        # Workers a reload replaces, with their drain's grace: told to drain
        # once their replacements accept, or at `_replaced_by` if sooner.
        self._replaced: list[tuple[WorkerProcess, float]] = []
        self._replaced_by = 0.0

    # -- the main loop ---------------------------------------------------------

    def run(self) -> int:
        self.start()
        while True:
            if self._signals:
                name = signal.Signals(self._signals.pop(0)).name[3:]
                exit_code = getattr(self, f"handle_{name.lower()}")()
                if exit_code is not None:
                    return exit_code
                continue
            self.maintain_workers()
            self._drain_replaced()
            self._kill_overdue()
            wait = min(1.0, self._next_spawn - time.monotonic())
            self._sleep(max(0.05, REPLACED_CHECK if self._replaced else wait))

    def start(self) -> None:
        raise_nofile_limit()
        self._contexts = tls.build(self.config)
        listen = self.config.listen
        try:
            self.listener = listener.bind(listen.address, listen.port)
        except OSError as error:
            where = (listen.address, listen.port)
            raise _cannot_bind("listen", "listen on", where, error) from None
        try:
            self.status = self._bind_status(self.config)
        except OSError as error:
            self.listener.close()
            where = status_address(self.config)
            raise _cannot_bind("metrics", "serve status on", where, error) from None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        for name in self.SIGNALS:
            signal.signal(getattr(signal, f"SIG{name}"), self._on_signal)
        self._set_title()
        log.info(
            "master %d listening on %s:%d for %s with %d workers",
            os.getpid(),
            listen.address,
            listen.port,
            mask_password(self.config.upstream.url),
            self.num_workers,
        )
        tls.log_at_start(self.config)
        self.maintain_workers()
        notify(f"READY=1\nMAINPID={os.getpid()}")

    def _set_title(self) -> None:
        listen = self.config.listen
        setproctitle(
            f"amqplexd: master [{listen.address}:{listen.port} -> "
            f"{mask_password(self.config.upstream.url)}, {self.num_workers} workers]"
        )

    def _bind_status(self, config: Config) -> StatusServer:
        address, port = status_address(config)
        return StatusServer(address, port, self)

    # -- what the status server asks ---------------------------------------------

    def accepting(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        if not self.active():
            return False, "no live worker"
        return True, "OK"

    def broker_address(self) -> tuple[str, int]:
        return self.config.upstream.host, self.config.upstream.port

    def broker_tls(self) -> ssl.SSLContext | None:
        return self._contexts.upstream

    def _on_signal(self, signum: int, frame) -> None:
        self._signals.append(signum)
        try:
            os.write(self._wake_w, b".")
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EINTR):
                raise

    def _sleep(self, timeout: float) -> None:
        """Wait for a signal or the timeout, answering status requests meanwhile."""
        fds = [self._wake_r, *(self.status.fds() if self.status else ())]
        try:
            ready, _, _ = select.select(fds, [], [], timeout)
        except InterruptedError:
            return
        for fd in ready:
            if fd == self._wake_r:
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
            else:
                self.status.on_readable(fd)
        if self.status:
            self.status.expire()

    # -- workers ---------------------------------------------------------------

    def active(self) -> list[WorkerProcess]:
        return [w for w in self.workers.values() if not w.draining]

    def maintain_workers(self) -> None:
        active = self.active()
        for extra in sorted(active, key=lambda w: w.slot)[self.num_workers :]:
            self._drain(extra)
        missing = sorted(set(range(1, self.num_workers + 1)) - {w.slot for w in self.active()})
        if missing and time.monotonic() >= self._next_spawn:
            for slot in missing:
                if not self.spawn_worker(slot):
                    return

    def spawn_worker(self, slot: int) -> bool:
        """Fork the worker for `slot`; False if the system would not (out of
        processes or memory): the master carries on and tries again later."""
        seat = self.board.claim()
        # Signals wait until the child has its own: one arriving between the
        # fork and those would run the master's handler in the child and be
        # lost there (a TERM, and the worker would never drain).
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, self._signal_numbers())
        try:
            pid = os.fork()
        except OSError as error:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            if seat is not None:
                self.board.release(seat)
            delay = self._defer_spawns()
            log.error("cannot start worker %d: %s; trying again in %.1f s", slot, error, delay)
            return False
        if pid:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            self.workers[pid] = WorkerProcess(pid, slot, time.monotonic(), seat)
            return True
        # The child: the master's signals and pipe are not its business.
        code = 1
        try:
            for name in self.SIGNALS:
                signal.signal(getattr(signal, f"SIG{name}"), signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.close(self._wake_r)
            os.close(self._wake_w)
            # Nor the status port: a worker holding it would keep an old one
            # open after a reload moves it.
            if self.status is not None:
                self.status.close()
            code = self._run_worker(self.config, self.listener, slot, seat)
        except BaseException:
            log.exception("worker %d failed", slot)
        finally:
            try:
                logging.shutdown()
                sys.stdout.flush()
            finally:
                # A second Ctrl-C during the flush must not leave a forked
                # child running the master's code.
                os._exit(code)

    def _defer_spawns(self) -> float:
        """One more failure to start a worker in a row: the next spawn waits,
        twice as long as after the last one. The delay."""
        self._failures += 1
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self._failures - 1))
        self._next_spawn = time.monotonic() + delay
        return delay

    def _signal_numbers(self) -> set[int]:
        return {getattr(signal, f"SIG{name}") for name in self.SIGNALS}

    def _drain(self, worker: WorkerProcess, grace: float | None = None) -> None:
        """TERM it, and SIGKILL it if it outlives `grace` (by default its
        drain's under the running configuration)."""
        worker.draining = True
        worker.kill_at = time.monotonic() + (self._drain_grace() if grace is None else grace)
        self._kill(worker.pid, signal.SIGTERM)

    def _drain_grace(self) -> float:
        """A worker's drain (Worker.drain): clients up to drain_timeout, their
        Close up to close_timeout, the upstreams' Close as long again; then
        KILL_GRACE before SIGKILL."""
        return self.config.drain_timeout + 2 * self.config.client.close_timeout + KILL_GRACE

    def _drain_replaced(self) -> None:
        """A reload's old workers drain once every new one accepts clients
        (its board seat posted; one without a seat accepts at once): a new
        worker first asks the broker for its properties, up to twice
        upstream.connect_timeout, and meanwhile the old ones serve."""
        if not self._replaced:
            return
        new = self.active()
        ready = all(w.seat is None or w.seat.accepting for w in new)
        if ready or time.monotonic() >= self._replaced_by:
            replaced, self._replaced = self._replaced, []
            for worker, grace in replaced:
                if worker.pid in self.workers:
                    self._drain(worker, grace)

    def _kill_overdue(self) -> None:
        """Workers replaced (HUP) or removed (TTOU) that outlived their drain
        get what gunicorn's graceful_timeout gives them."""
        now = time.monotonic()
        for worker in self.workers.values():
            if worker.kill_at is not None and now >= worker.kill_at:
                worker.kill_at = None
                log.warning(
                    "worker %d (pid %d) did not stop in time; killing it", worker.slot, worker.pid
                )
                self._kill(worker.pid, signal.SIGKILL)

    def _kill(self, pid: int, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    def reap_workers(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            if worker.seat is not None:
                self.board.release(worker.seat)
            # Its live gauges (clients, upstreams, channels) vanish with it.
            multiprocess.mark_process_dead(pid)
            lived = time.monotonic() - worker.started
            how = _exit_description(status)
            if worker.draining:
                log.info("worker %d (pid %d) finished draining: %s", worker.slot, pid, how)
                continue
            metrics.WORKER_RESTARTS.inc()
            if lived < QUICK_DEATH:
                delay = self._defer_spawns()
                log.error(
                    "worker %d (pid %d) died after %.1f s: %s; restarting in %.1f s",
                    worker.slot,
                    pid,
                    lived,
                    how,
                    delay,
                )
            else:
                self._failures = 0
                log.error("worker %d (pid %d) died: %s; restarting it", worker.slot, pid, how)

    # -- signal handlers -----------------------------------------------------------

    def handle_chld(self) -> None:
        self.reap_workers()

    def handle_hup(self) -> None:
        """Reload: new workers with the new configuration are forked, and
        the old ones are told to drain once the new ones accept clients
        (_drain_replaced): the listener is one queue, so nobody is refused,
        and nobody waits while the new workers start."""
        log.info("HUP: reloading configuration")
        # systemd >= 253 ties RELOADING=1 to a reload by its CLOCK_MONOTONIC
        # time; without it `systemctl reload` may not see the reload end.
        notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            new = self._reload()
            contexts = tls.build(new)
        except (ConfigError, tls.SettingError) as error:
            log.error("reload refused, keeping the running configuration: %s", error)
            notify("READY=1")
            return
        # Both new sockets are bound before either replaces its old one, so
        # that a refused reload changes nothing.
        sock = status = None
        if (new.listen.address, new.listen.port) != (
            self.config.listen.address,
            self.config.listen.port,
        ):
            try:
                sock = listener.bind(new.listen.address, new.listen.port)
            except OSError as error:
                log.error(
                    "reload refused: cannot listen on %s:%d: %s",
                    new.listen.address,
                    new.listen.port,
                    error,
                )
                notify("READY=1")
                return
        if status_address(new) != status_address(self.config):
            try:
                status = self._bind_status(new)
            except OSError as error:
                if sock is not None:
                    sock.close()
                log.error(
                    "reload refused: cannot serve status on %s:%d: %s", *status_address(new), error
                )
                notify("READY=1")
                return
        if sock is not None:
            # Closed before the new workers fork, so none of them holds the
            # old address open; the old workers have copies of their own
            # until they finish.
            self.listener.close()
            self.listener = sock
        if status is not None:
            self.status.close()
            self.status = status
        old_workers = self.active()
        # They drain as they were configured to, not as the new ones will.
        old_grace = self._drain_grace()
        self.config = new
        # Before the fork: the new workers log as the new configuration says.
        logs.configure(new.log.level, new.log.format)
        self._contexts = contexts
        tls.log_at_start(new)
        self.num_workers = new.workers
        for worker in old_workers:
            worker.draining = True  # so maintain_workers fills every slot anew
        self._failures, self._next_spawn = 0, 0.0
        self.maintain_workers()
        self._replaced += [(worker, old_grace) for worker in old_workers]
        self._replaced_by = time.monotonic() + 2 * new.upstream.connect_timeout + KILL_GRACE
        self._set_title()
        notify("READY=1")

    def handle_term(self) -> int:
        return self._stop(graceful=True)

    def handle_int(self) -> int:
        return self._stop(graceful=True)

    def handle_quit(self) -> int:
        return self._stop(graceful=False)

    def handle_ttin(self) -> None:
        self.num_workers += 1
        log.info("TTIN: %d workers", self.num_workers)
        self._set_title()

    def handle_ttou(self) -> None:
        if self.num_workers > 1:
            self.num_workers -= 1
        log.info("TTOU: %d workers", self.num_workers)
        self._set_title()

    def _stop(self, graceful: bool) -> int:
        self.draining = True
        self._replaced = []  # they are all told below
        notify("STOPPING=1")
        log.info(
            "%s: stopping %d workers", "draining" if graceful else "exiting now", len(self.workers)
        )
        for worker in list(self.workers.values()):
            worker.draining = True
            self._kill(worker.pid, signal.SIGTERM if graceful else signal.SIGQUIT)
        # The workers close their copies as they stop accepting: with the
        # master's closed too, new clients are refused at once (and go to
        # another proxy) instead of waiting in a queue nobody serves.
        self.listener.close()
        grace = self._drain_grace() if graceful else KILL_GRACE
        deadline = time.monotonic() + grace
        while self.workers and time.monotonic() < deadline:
            self._sleep(min(0.2, max(0.01, deadline - time.monotonic())))
            quit_now = signal.SIGQUIT in self._signals
            self._signals.clear()
            if quit_now and graceful:
                # Which waits for the workers as well: none is left behind.
                return self._stop(graceful=False)
            if quit_now:
                break  # asked twice to exit now: the workers are killed below
            self.reap_workers()
        for worker in list(self.workers.values()):
            log.warning(
                "worker %d (pid %d) did not stop in time; killing it", worker.slot, worker.pid
            )
            self._kill(worker.pid, signal.SIGKILL)
        self.status.close()
        log.info("master %d exiting", os.getpid())
        return 0


def _cannot_bind(section: str, what: str, where: tuple[str, int], error: OSError) -> ConfigError:
    """The start's refusal for a socket it cannot bind, naming the settings."""
    return ConfigError(
        f"{section}.address, {section}.port: cannot {what} {where[0]}:{where[1]}: "
        f"{error.strerror or error}"
    )


def status_address(config: Config) -> tuple[str, int]:
    """Where GET /, /ready and /metrics are served: listen.port + 1 by default."""
    return (
        config.metrics.address or config.listen.address,
        config.metrics.port or config.listen.port + 1,
    )


def _exit_description(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.WEXITSTATUS(status)}"
