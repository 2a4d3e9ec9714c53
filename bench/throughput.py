"""(c) publish and (d) no-ack consume throughput with 256 B and 64 KB
messages: a few raw-socket clients, one queue each."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from bench import frames, procs
from bench.broker import BROKER, BROKER_URL
from bench.context import CEILING, Bench, CpuMeter, gen_cpu, zero_cost_ceiling
from bench.daemon import Daemon
from bench.procs import ChildServer
from bench.relay import Relay
from bench.report import Row, Target
from bench.splice_relay import SpliceRelay
from bench.wire import open_wire

SOCKET_TIMEOUT = 60.0
WRITE_SIZE = 1 << 16  # bytes handed to the kernel per send
# pool.min_upstream_connections of the reference run that spreads publishers,
# and how many clients at most it takes to reach every worker's pool.
SPREAD_UPSTREAMS = 2
SPREAD_WARMUP_CLIENTS = 64


@dataclasses.dataclass(frozen=True)
class Size:
    label: str
    size: int
    target: float  # least proxy/direct ratio

    def count(self, bench: Bench) -> int:
        small = self.size <= 4096
        return bench.profile.small_messages if small else bench.profile.large_messages


SIZES = (Size("256 B", 256, 0.95), Size("64 KB", 65536, 0.85))


# The reference runs' labels, and the way they are named in the table.
REFERENCES = {
    # one uvloop process that parses nothing: what any one-hop proxy costs
    "relay": "via a bare relay",
    # splice(2) through a pipe, no byte in user space (splice_relay.py)
    "splice": "via a zero-copy relay",
}
Relays = tuple[ChildServer, ...]


@dataclasses.dataclass
class Rate:
    messages: int
    seconds: float
    size: int
    cpu: dict[str, float]  # cores used: generators, amqplexd, broker
    # Cores each amqplexd process used, busiest first: a worker's clients
    # share its upstreams, and the kernel decides which worker accepts whom.
    amqplexd: list[float] = dataclasses.field(default_factory=list)

    @property
    def per_second(self) -> float:
        return self.messages / self.seconds

    @property
    def mb_per_second(self) -> float:
        return self.per_second * self.size / 1e6

    def as_dict(self) -> dict:
        return {
            **dataclasses.asdict(self),
            "msg_per_s": self.per_second,
            "MB_per_s": self.mb_per_second,
        }


def publish_worker(sync: procs.Sync, addr: tuple, queue: str, size: int, count: int) -> dict:
    """Stream `count` messages; the clock stops when a passive declare on
    the same channel first counts all of them in the queue. One declare is
    not enough: RabbitMQ's queue process answers it ahead of deliveries
    still in its mailbox (it prioritises `stat`), so it can count short."""
    wire = open_wire(addr, SOCKET_TIMEOUT)
    message = frames.publish(queue, size)
    per_write = max(1, WRITE_SIZE // len(message))
    batch = message * per_write
    writes, rest = divmod(count, per_write)
    sync.go()
    cpu = time.process_time()
    start = time.monotonic()
    for _ in range(writes):
        wire.send(batch)
    declare = frames.declare_passive(queue)
    wire.send(message * rest + declare)
    polls = 1
    while (held := frames.message_count(wire.expect(frames.DECLARE_OK))) < count:
        if time.monotonic() - start > SOCKET_TIMEOUT:
            raise TimeoutError(f"{queue} holds {held} of {count} messages")
        wire.send(declare)
        polls += 1
    end = time.monotonic()
    cpu = time.process_time() - cpu
    wire.close()
    return {"start": start, "end": end, "cpu": cpu, "polls": polls}


def consume_worker(sync: procs.Sync, addr: tuple, queue: str, count: int) -> dict:
    """Consume with no_ack until `count` whole messages have arrived."""
    wire = open_wire(addr, SOCKET_TIMEOUT)
    sync.go()
    cpu = time.process_time()
    start = time.monotonic()
    wire.send(frames.consume(queue))
    wire.count_messages(count)
    end = time.monotonic()
    cpu = time.process_time() - cpu
    wire.close()
    return {"start": start, "end": end, "cpu": cpu}


def _meter(bench: Bench, relays: Relays, daemon: Daemon | None) -> CpuMeter:
    # A relay's own CPU is what a one-hop proxy that parses nothing costs:
    # the reference amqplexd's is read against.
    return bench.meter(daemon, **{relay.name: [relay.pid] for relay in relays})


def _rate(results: list[dict], count: int, size: int, meter: CpuMeter) -> Rate:
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    cpu = {"generators": gen_cpu(results, wall), **meter.cores}
    return Rate(count * len(results), wall, size, cpu, meter.processes("amqplexd"))


def publish(
    bench: Bench,
    label: str,
    addr: tuple,
    size: Size,
    keep: bool = False,
    publishers: int | None = None,
    relays: Relays = (),
    daemon: Daemon | None = None,
) -> tuple[Rate, list[str]]:
    """Publish into fresh queues (one per publisher; as many publishers as
    the profile says unless `publishers`) and verify every message landed;
    the queues are deleted unless `keep`. The CPU figures include the
    `relays`' own, and are those of `daemon` if it is not the main
    amqplexd."""
    count = size.count(bench)
    queues = [bench.admin.queue(label) for _ in range(publishers or bench.profile.publishers)]
    try:
        args = [(addr, queue, size.size, count) for queue in queues]
        meter = _meter(bench, relays, daemon)
        results = procs.run(label, publish_worker, args, bench.profile.timeout, meter)
        bench.admin.verify({queue: count for queue in queues})
        if late := [r["polls"] for r in results if r["polls"] > 1]:
            bench.note(f"{label}: the queues filled after {late} passive declares")
    except BaseException:
        keep = False
        raise
    finally:
        if not keep:
            for queue in queues:
                bench.admin.delete(queue)
    return _rate(results, count, size.size, meter), queues


def consume(bench: Bench, label: str, addr: tuple, size: Size, relays: Relays = ()) -> Rate:
    """Fill queues directly, then drain them through `addr`; verify each
    consumer got all of its queue and the queues are empty. The CPU figures
    include the `relays`' own."""
    count = size.count(bench)
    _, queues = publish(bench, f"{label}.fill", BROKER, size, keep=True)
    try:
        args = [(addr, queue, count) for queue in queues]
        meter = _meter(bench, relays, None)
        results = procs.run(label, consume_worker, args, bench.profile.timeout, meter)
        bench.admin.verify({queue: 0 for queue in queues})
    finally:
        for queue in queues:
            bench.admin.delete(queue)
    return _rate(results, count, size.size, meter)


def _report(bench: Bench, scenario: str, size: Size, runs: dict[str, Rate]) -> None:
    direct, proxy = runs["direct"], runs["proxy"]
    bench.details.setdefault(scenario, {})[size.label] = {k: v.as_dict() for k, v in runs.items()}
    target = Target(ratio_at_least=size.target)
    bench.add(
        Row(scenario, f"{size.label} msg/s", "1/s", direct.per_second, proxy.per_second, target)
    )
    bench.add(
        Row(scenario, f"{size.label} MB/s", "MB/s", direct.mb_per_second, proxy.mb_per_second)
    )
    ceiling = zero_cost_ceiling(proxy.per_second, proxy.cpu)
    bench.add(Row(scenario, f"{size.label} msg/s, {CEILING}", "1/s", direct.per_second, ceiling))
    for label, way in REFERENCES.items():
        if label in runs:
            row = f"{size.label} msg/s {way} (reference)"
            bench.add(Row(scenario, row, "1/s", direct.per_second, runs[label].per_second))
    for label, run in runs.items():
        cores = ", ".join(
            f"{name} {used:.2f} ({used / run.per_second * 1e6:.1f} us/msg)"
            for name, used in run.cpu.items()
        )
        bench.note(
            f"{scenario} {size.label} {label}: {run.messages} messages verified in "
            f"{run.seconds:.2f} s; cores used: {cores}"
        )
    busy = [f"{cores:.2f}" for cores in proxy.amqplexd if cores >= 0.01]
    bench.note(
        f"{scenario} {size.label} proxy: amqplexd's busy processes used {', '.join(busy) or 'no'} "
        "cores (clients on one worker share its upstreams)"
    )


def _places(
    bench: Bench, size: Size, relay: Relay, splice: SpliceRelay
) -> list[tuple[str, tuple[str, int]]]:
    """Where the clients of each run of `size` go, by label: the broker,
    amqplexd, the bare relay, and for large messages, whose cost is mostly
    the socket copies, the relay that makes none."""
    places = [*bench.targets(), ("relay", relay.addr)]
    if size.size > 4096:
        places.append(("splice", splice.addr))
    return places


def _in_turns(
    bench: Bench,
    scenario: str,
    size: Size,
    places: list[tuple[str, tuple[str, int]]],
    run: Callable[[str, tuple[str, int]], Rate],
) -> dict[str, Rate]:
    """Run every place `bench.profile.turns` times, taking turns (direct,
    proxy, the references, then all again), and keep each place's median
    run by rate. A run lasts seconds, and on a shared host the machine's
    speed moves over seconds (direct 64 KB publish runs at 12,300 to
    24,700 msg/s minutes apart, one day): in turns, every place meets
    the slow spells about alike, and one slow run cannot become a
    place's figure. Each turn starts one place later than the one before
    (direct, proxy, relay; then proxy, relay, direct; ...), so that no place
    always follows the same one (a run leaves the broker freeing the
    memory of its deleted queues). Each turn's proxy/direct ratio is
    noted."""
    turns: dict[str, list[Rate]] = {label: [] for label, _ in places}
    for turn in range(bench.profile.turns):
        first = turn % len(places)
        for label, addr in places[first:] + places[:first]:
            turns[label].append(run(label, addr))
            if label == "proxy" and size.size > 4096:
                bench.record_worker_rss()
    pairs = zip(turns["direct"], turns["proxy"], strict=True)
    ratios = [proxy.per_second / direct.per_second for direct, proxy in pairs]
    bench.note(
        f"{scenario} {size.label}: proxy/direct, turn by turn: "
        + ", ".join(f"{ratio:.2f}x" for ratio in ratios)
        + " (the table has each place's median run)"
    )
    return {label: _median_run(rates) for label, rates in turns.items()}


def _median_run(rates: list[Rate]) -> Rate:
    """The run whose rate is the median (the lower middle one of an even
    count), kept whole for its CPU figures."""
    return sorted(rates, key=lambda rate: rate.per_second)[(len(rates) - 1) // 2]


def run_publish(bench: Bench) -> None:
    with Relay(BROKER, 0.0) as relay, SpliceRelay(BROKER) as splice:
        relays = (relay, splice)
        for size in SIZES:

            def run(label: str, addr: tuple, size: Size = size) -> Rate:
                return publish(bench, f"publish.{label}", addr, size, relays=relays)[0]

            runs = _in_turns(bench, "publish", size, _places(bench, size, relay, splice), run)
            _report(bench, "publish", size, runs)
    _publish_one_connection(bench, SIZES[0])
    _publish_spread(bench, SIZES[0])


def _publish_one_connection(bench: Bench, size: Size) -> None:
    """One publisher, so one broker connection carries it either way.

    RabbitMQ reads each connection with one process, which caps what one
    connection can carry. The publishers above have a connection each
    directly, but amqplexd carries a user's channels on as few upstreams as
    will hold them (DESIGN rule 4): with -w 2, at most two. This row
    compares like with like, and so shows what the proxy itself costs."""
    runs = {
        label: publish(bench, f"publish1.{label}", addr, size, publishers=1)[0]
        for label, addr in bench.targets()
    }
    direct, proxy = runs["direct"], runs["proxy"]
    bench.details.setdefault("publish", {})[f"{size.label}, one publisher"] = {
        k: v.as_dict() for k, v in runs.items()
    }
    bench.add(
        Row(
            "publish",
            f"{size.label} msg/s, one publisher (reference)",
            "1/s",
            direct.per_second,
            proxy.per_second,
        )
    )


def _publish_spread(bench: Bench, size: Size) -> None:
    """The same publishers through an amqplexd asked to keep two upstreams
    per worker (pool.min_upstream_connections: 2), as an operator with heavy
    publishers would: by default a worker's publishers share one upstream,
    and one process at the broker reads it."""
    env = {"AMQP_POOL_MIN_UPSTREAM_CONNECTIONS": str(SPREAD_UPSTREAMS)}
    with Daemon(BROKER_URL, bench.workers, env) as spread:
        _reach_every_pool(spread)
        rate, _ = publish(bench, "publish.spread", spread.addr, size, daemon=spread)
    bench.details.setdefault("publish", {})[f"{size.label}, spread"] = rate.as_dict()
    direct = bench.details["publish"][size.label]["direct"]["msg_per_s"]
    label = f"{size.label} msg/s, pool.min_upstream_connections {SPREAD_UPSTREAMS} (reference)"
    bench.add(Row("publish", label, "1/s", direct, rate.per_second))
    busy = [f"{cores:.2f}" for cores in rate.amqplexd if cores >= 0.01]
    bench.note(
        f"publish {size.label} spread: amqplexd {rate.cpu['amqplexd'] / rate.per_second * 1e6:.1f}"
        f" us/msg; its busy processes used {', '.join(busy) or 'no'} cores"
    )


def _reach_every_pool(daemon: Daemon) -> None:
    """Connect clients until every worker's pool has dialled its upstreams
    (the kernel picks the worker for each): a client's channel is placed
    when it opens, so the publishers must find them all open."""
    opened = f"upstream {SPREAD_UPSTREAMS} for <Pool"
    wires = []
    try:
        while daemon.log_text().count(opened) < daemon.workers:
            if len(wires) == SPREAD_WARMUP_CLIENTS:
                raise procs.BenchError(
                    f"{len(wires)} clients did not reach every worker's pool: {daemon.log_tail()}"
                )
            wires.append(open_wire(daemon.addr, SOCKET_TIMEOUT))
    finally:
        for wire in wires:
            wire.close()


def run_consume(bench: Bench) -> None:
    with Relay(BROKER, 0.0) as relay, SpliceRelay(BROKER) as splice:
        relays = (relay, splice)
        for size in SIZES:

            def run(label: str, addr: tuple, size: Size = size) -> Rate:
                return consume(bench, f"consume.{label}", addr, size, relays)

            runs = _in_turns(bench, "consume", size, _places(bench, size, relay, splice), run)
            _report(bench, "consume", size, runs)
