"""What every scenario gets: sizes for this run, the daemon, the broker
admin, and where its figures go."""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Any

from bench import procinfo
from bench.broker import BROKER, Admin
from bench.daemon import Daemon
from bench.report import Row


@dataclasses.dataclass(frozen=True)
class Profile:
    churn_seconds: float = 10.0
    churn_procs: int = 8
    rtt_seconds: float = 10.0
    rtt_procs: int = 4
    publishers: int = 3
    small_messages: int = 100_000  # per publisher / consumer
    large_messages: int = 5_000
    turns: int = 3  # runs of each throughput place, taken in turns (median kept)
    memory_clients: int = 2000
    memory_procs: int = 4
    fleet_clients: int = 3000
    fleet_procs: int = 6
    timeout: float = 120.0  # bound on any one run of load generators


FULL = Profile()
QUICK = Profile(
    churn_seconds=2.0,
    rtt_seconds=2.0,
    small_messages=10_000,
    large_messages=200,
    turns=1,
    memory_clients=300,
    fleet_clients=300,
    timeout=60.0,
)

BROKER_PROCESS = "beam.smp"

# After the 64 KB runs, memory gets this long to come back before it is read.
SETTLE_SECONDS = 1.0


@dataclasses.dataclass
class Bench:
    profile: Profile
    admin: Admin
    proxy: Daemon
    workers: int
    rows: list[Row] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Highest RSS seen per worker just after a 64 KB run through the proxy.
    worker_rss_64k: dict[int, int] = dataclasses.field(default_factory=dict)

    def targets(self) -> list[tuple[str, tuple[str, int]]]:
        """(label, address) of the broker itself and of amqplexd."""
        return [("direct", BROKER), ("proxy", self.proxy.addr)]

    def add(self, row: Row) -> None:
        self.rows.append(row)

    def note(self, text: str) -> None:
        print(f"   {text}", flush=True)
        self.notes.append(text)

    def meter(self, daemon: Daemon | None = None, **more: list[int]) -> CpuMeter:
        """CPU meter for amqplexd (`daemon`, by default the main one), the
        broker, and `more` named groups of processes."""
        daemon = daemon or self.proxy
        return CpuMeter({"amqplexd": daemon.pids(), "broker": broker_pids(), **more})

    def record_worker_rss(self) -> None:
        time.sleep(SETTLE_SECONDS)
        for pid, rss in self.proxy.worker_rss().items():
            self.worker_rss_64k[pid] = max(rss, self.worker_rss_64k.get(pid, 0))


def broker_pids() -> list[int]:
    """The broker's Erlang VM: the oldest beam.smp (rabbitmqctl runs short-lived
    ones of its own)."""
    running = [(procinfo.start_time(pid), pid) for pid in procinfo.pids_named(BROKER_PROCESS)]
    running = [(started, pid) for started, pid in running if started is not None]
    return [min(running)[1]] if running else []


def direct_client_budget() -> int:
    """How many clients may connect to the broker at once: half of what its
    file descriptor limit leaves for sockets (RabbitMQ keeps 100 descriptors
    back and allows 90% of the rest), less what it has open. Going past the
    limit raises the broker's fd alarm, which refuses every new connection,
    everybody's, until it clears."""
    pids = broker_pids()
    if not pids:
        return 0
    sockets = int((procinfo.open_files_limit(pids[0]) - 100) * 0.9)
    return max(0, sockets // 2 - procinfo.open_files(pids[0]))


class CpuMeter:
    """Cores used by groups of processes between begin() and end(), and by
    each process of a group. The broker figure includes whatever else uses
    the broker meanwhile."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.cores: dict[str, float] = {}
        self._start: dict[int, float] = {}
        self._used: dict[int, float] = {}
        self._began = 0.0

    def begin(self) -> None:
        self._began = time.monotonic()
        self._start = {pid: procinfo.cpu_seconds([pid]) for pid in self._pids()}

    def end(self) -> None:
        wall = time.monotonic() - self._began
        self._used = {
            pid: (procinfo.cpu_seconds([pid]) - start) / wall for pid, start in self._start.items()
        }
        self.cores = {
            name: sum(self._used[pid] for pid in pids) for name, pids in self.groups.items()
        }

    def processes(self, name: str) -> list[float]:
        """Cores each process of group `name` used, busiest first."""
        return sorted((self._used[pid] for pid in self.groups[name]), reverse=True)

    def _pids(self) -> set[int]:
        return {pid for pids in self.groups.values() for pid in pids}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def median(values: list[float]) -> float:
    return statistics.median(values)


def gen_cpu(results: list[dict], seconds: float) -> float:
    """Cores the load generators used on average over `seconds`."""
    return sum(result["cpu"] for result in results) / seconds if seconds > 0 else 0.0


# The processes a proxied run needs besides amqplexd itself, and the name of
# the rows zero_cost_ceiling gives.
CEILING = "ceiling if amqplexd used no CPU (reference)"
OUTSIDE_THE_PROXY = ("generators", "broker")


def zero_cost_ceiling(rate: float, cores_used: dict[str, float]) -> float:
    """The rate a proxied run could reach if amqplexd used no CPU at all:
    the machine's cores over what the load generators and the broker spent
    a unit of work (a cycle, a message) in that run. A ratio target above
    ceiling / direct cannot be met on this machine by any proxy, since they
    all share its cores."""
    outside = sum(cores_used[name] for name in OUTSIDE_THE_PROXY)
    return rate * len(os.sched_getaffinity(0)) / outside if outside else 0.0
