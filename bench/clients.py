"""(e) resident memory per idle client and (f) a few thousand clients
connecting at once. Each client opens channel 1 and publishes one small
message, so the queue count proves every one of them got through."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from bench import broker, context, frames, procs
from bench.broker import BROKER, BROKER_URL
from bench.churn import cycle, steps
from bench.context import Bench, gen_cpu, median
from bench.daemon import Daemon
from bench.fleet import Fleet
from bench.report import Row, Target

MESSAGE_SIZE = 16
WARMUP_CYCLES = 8
MIN_DIRECT_CLIENTS = 50
STEADY_INTERVAL = 0.5
STEADY_LIMIT = 10.0
STEADY_PER_CLIENT = 64  # bytes: 2% of the ~3.3 KB measured per client


def fleet_worker(sync: procs.Sync, addr: tuple, queue: str, count: int, timeout: float) -> dict:
    """Connect `count` clients at once, hold them open until released."""
    fleet = Fleet(addr, count)
    publish = frames.publish(queue, MESSAGE_SIZE)
    try:
        sync.go()
        cpu = time.process_time()
        start = time.monotonic()
        times = fleet.open(publish, start + timeout)
        finished = time.monotonic()
        cpu = time.process_time() - cpu
        sync.ready()
        sync.wait_release()
        fleet.close(time.monotonic() + timeout)
    except BaseException:
        fleet.abort()
        raise
    return {"times": times, "start": start, "finished": finished, "cpu": cpu}


def hold(
    bench: Bench, label: str, addr: tuple, total: int, nprocs: int, during: Callable[[], Any]
) -> tuple[list[dict], Any]:
    """`total` clients connected at once from `nprocs` processes; `during()`
    runs while all of them are up. Verifies one message per client arrived."""
    queue = bench.admin.queue(label)
    share = [total // nprocs + (1 if i < total % nprocs else 0) for i in range(nprocs)]
    timeout = bench.profile.timeout
    try:
        args = [(addr, queue, n, timeout) for n in share]
        with procs.Group(label, fleet_worker, args, timeout * 2) as group:
            group.start()
            group.ready()
            value = during()
            group.release()
            results = group.results()
        bench.admin.verify({queue: total})
    finally:
        bench.admin.delete(queue)
    return results, value


def _steady(bench: Bench, label: str, read: Callable[[], int], clients: int) -> Callable[[], int]:
    """`read` once memory has stopped moving: two readings STEADY_INTERVAL
    apart within STEADY_PER_CLIENT bytes per client of the run, so that what
    is still moving is a small part of the per-client figure (or after
    STEADY_LIMIT, noted). The broker's VM in particular keeps returning
    memory for a while after queues go."""

    def measure() -> int:
        deadline = time.monotonic() + STEADY_LIMIT
        last = read()
        while True:
            time.sleep(STEADY_INTERVAL)
            now = read()
            if abs(now - last) <= STEADY_PER_CLIENT * clients:
                return now
            if time.monotonic() > deadline:
                bench.note(f"{label}: memory still moving after {STEADY_LIMIT:.0f} s")
                return now
            last = now

    return measure


def _warm_up(bench: Bench, label: str, addr: tuple) -> None:
    """A few churn cycles, so that pools exist (in both workers, most likely)
    before the baseline is read."""
    queue = bench.admin.queue(label)
    try:
        conversation = steps(frames.publish(queue, MESSAGE_SIZE))
        for _ in range(WARMUP_CYCLES):
            cycle(addr, conversation)
        bench.admin.verify({queue: WARMUP_CYCLES})
    finally:
        bench.admin.delete(queue)


def _kb_per_client(
    bench: Bench, label: str, addr: tuple, read: Callable[[], int], total: int
) -> float:
    _warm_up(bench, f"memory.{label}.warmup", addr)
    name = f"memory.{label}"
    baseline = _steady(bench, f"{name} baseline", read, total)()
    steady = _steady(bench, name, read, total)
    _, after = hold(bench, name, addr, total, bench.profile.memory_procs, steady)
    bench.note(
        f"memory {label}: {total} idle clients verified; "
        f"{baseline / 2**20:.1f} MB -> {after / 2**20:.1f} MB"
    )
    return (after - baseline) / total / 1024


def _direct_clients(bench: Bench, scenario: str, wanted: int) -> int:
    """How many clients the direct run may use (0: skip it), noted if fewer."""
    allowed = min(wanted, context.direct_client_budget())
    if allowed < MIN_DIRECT_CLIENTS:
        bench.note(f"{scenario} direct: skipped, the broker's fd limit leaves room for {allowed}")
        return 0
    if allowed < wanted:
        bench.note(f"{scenario} direct: {allowed} clients, not {wanted}: the broker's fd limit")
    return allowed


def run_memory(bench: Bench) -> None:
    total = bench.profile.memory_clients
    per_client: dict[str, float | None] = {"direct": None, "proxy": None}
    direct_total = _direct_clients(bench, "memory", total)
    if direct_total and broker.connection_memory() is None:
        bench.note("memory direct: skipped, rabbitmq-diagnostics memory_breakdown unavailable")
        direct_total = 0
    if direct_total:
        per_client["direct"] = _kb_per_client(
            bench, "direct", BROKER, broker.connection_memory, direct_total
        )
    # A fresh amqplexd: memory freed by earlier scenarios would absorb the clients.
    with Daemon(BROKER_URL, bench.workers) as fresh:
        per_client["proxy"] = _kb_per_client(bench, "proxy", fresh.addr, fresh.rss, total)
    bench.details["memory"] = {
        "clients": {"direct": direct_total, "proxy": total},
        "kb_per_client": per_client,
    }
    metric = f"memory per idle client ({direct_total or '-'} / {total} clients)"
    target = Target(at_most=8)
    bench.add(Row("memory", metric, "KB", per_client["direct"], per_client["proxy"], target))


def report_worker_rss(bench: Bench) -> None:
    """(e), second half: the highest RSS of a worker just after the 64 KB
    publish and consume runs through amqplexd (if they ran)."""
    if not bench.worker_rss_64k:
        return
    worst = max(bench.worker_rss_64k.values()) / 2**20
    bench.details["worker_rss_after_64k_MB"] = {
        str(pid): rss / 2**20 for pid, rss in bench.worker_rss_64k.items()
    }
    metric = "RSS per worker after 64 KB runs (max)"
    bench.add(Row("memory", metric, "MB", None, worst, Target(below=64)))


def _connect_all(bench: Bench, label: str, addr: tuple, total: int) -> dict:
    results, _ = hold(bench, label, addr, total, bench.profile.fleet_procs, lambda: None)
    start = min(r["start"] for r in results)
    all_in = max(r["finished"] for r in results) - start
    times = [t for r in results for t in r["times"]]
    bench.note(f"{label}: {len(times)} of {total} connected at once, published, verified")
    return {
        "clients": len(times),
        "seconds_to_connect_all": all_in,
        "median_connect_ms": median(times) * 1000,
        "gen_cpu": gen_cpu(results, all_in),
    }


def run_clients(bench: Bench) -> None:
    """All of them through amqplexd; as many as the broker's fd limit safely
    allows both directly and through amqplexd, to compare."""
    total = bench.profile.fleet_clients
    proxy = bench.proxy.addr
    few = _direct_clients(bench, "clients", total)
    figures = {"proxy": _connect_all(bench, "clients.proxy", proxy, total)}
    if few:
        figures["direct"] = _connect_all(bench, "clients.direct", BROKER, few)
        if few < total:
            figures["proxy-same"] = _connect_all(bench, "clients.proxy-same", proxy, few)
    bench.details["clients"] = figures
    if few:
        same = figures.get("proxy-same", figures["proxy"])
        _rows(bench, few, figures["direct"], same)
    if few < total:
        _rows(bench, total, None, figures["proxy"])


def _rows(bench: Bench, clients: int, direct: dict | None, proxy: dict) -> None:
    for metric, key, unit in (
        (f"time to connect {clients} at once", "seconds_to_connect_all", "s"),
        (f"median client connect, {clients}", "median_connect_ms", "ms"),
    ):
        bench.add(Row("clients", metric, unit, direct and direct[key], proxy[key]))
