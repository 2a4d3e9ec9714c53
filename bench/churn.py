"""(a) churn and (b) churn with the broker 10 ms of round trip away:
connect, handshake, open a channel, publish one small message, close the
channel and the connection, over and over from several processes."""

from __future__ import annotations

import dataclasses
import time

from bench import frames, procs
from bench.broker import BROKER
from bench.context import CEILING, Bench, CpuMeter, gen_cpu, median, percentile, zero_cost_ceiling
from bench.daemon import Daemon
from bench.relay import Relay
from bench.report import Row, Target
from bench.stub import Stub
from bench.wire import ProtocolError, Wire, open_wire

try:
    from bench import _cycle
except ImportError:  # built where there was no C compiler: the same cycle in Python
    _cycle = None

MESSAGE_SIZE = 64
WARMUP_CYCLES = 3
CYCLE_TIMEOUT = 10.0
RTT_DELAY = 0.005  # each direction
RTT_PROBES = 20


def steps(publish: bytes) -> tuple[tuple[bytes, bytes], ...]:
    """One short-lived client's whole life, as a PHP request would live it:
    what it sends at each step and the method it waits for before the next
    (TuneOk and Open go together, as pika sends them)."""
    return (
        (frames.PROTOCOL_HEADER, frames.START),
        (frames.START_OK, frames.TUNE),
        (frames.TUNE_OK + frames.CONNECTION_OPEN, frames.OPEN_OK),
        (frames.CHANNEL_OPEN, frames.CHANNEL_OPEN_OK),
        (publish + frames.CHANNEL_CLOSE, frames.CHANNEL_CLOSE_OK),
        (frames.CONNECTION_CLOSE, frames.CONNECTION_CLOSE_OK),
    )


def cycle(addr: tuple[str, int], conversation: tuple[tuple[bytes, bytes], ...]) -> None:
    """Connect, go through `conversation` (steps()), close. In C where it was
    built (_cycle.c): the generators share the cores with what they measure,
    and the interpreter's part of a cycle was a large part of their CPU.
    Neither checks Tune's frame_max, as open_wire does for the throughput
    runs: a churn message is 64 bytes. The compiled cycle also refuses a
    frame over 64 KB, which no reply in a cycle comes near."""
    if _cycle is not None:
        wrong = _cycle.cycle(addr[0], addr[1], CYCLE_TIMEOUT, conversation)
        if wrong is not None:
            step, what, payload = wrong
            raise ProtocolError(_unexpected(conversation[step][1], what, payload))
        return
    wire = Wire.connect(addr, CYCLE_TIMEOUT)
    try:
        for send, expect in conversation:
            wire.send(send)
            wire.expect(expect)
    finally:
        wire.close_socket()


# What _cycle.cycle reports in place of a frame type, in wire.py's words.
_WRONG = {-1: "connection closed by peer", -2: "bad frame end", -3: "frame over 65536 bytes"}


def _unexpected(wanted: bytes, what: int, payload: bytes) -> str:
    if what in _WRONG:
        return _WRONG[what]
    if what != 1:
        return f"unexpected frame type {what}"
    return f"expected {wanted.hex()}, got {frames.describe(payload)}"


def churn_worker(sync: procs.Sync, addr: tuple[str, int], queue: str, seconds: float) -> dict:
    conversation = steps(frames.publish(queue, MESSAGE_SIZE))
    for _ in range(WARMUP_CYCLES):  # dial pools, fill caches: not timed
        cycle(addr, conversation)
    sync.go()
    cpu = time.process_time()
    times: list[float] = []
    start = time.monotonic()
    end = start + seconds
    while (began := time.monotonic()) < end:
        cycle(addr, conversation)
        times.append(time.monotonic() - began)
    return {
        "times": times,
        "published": WARMUP_CYCLES + len(times),
        "start": start,
        "end": time.monotonic(),
        "cpu": time.process_time() - cpu,
    }


@dataclasses.dataclass
class Churn:
    cycles: int
    # cycles/s, until the queue held every cycle's message: under load the
    # broker falls behind the proxy's CloseOks (thousands of messages, which
    # it catches up once the clients stop), and that is its part of the work.
    rate: float
    median_ms: float
    p99_ms: float
    # Cores used, generators, amqplexd, broker, over the same time as `rate`.
    cpu: dict[str, float]
    # From the last cycle's end until the queue held every message (found
    # within ~10 ms; 0 for the stub), counted in `rate`.
    drain_ms: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def measure(
    bench: Bench,
    label: str,
    addr: tuple,
    concurrency: int,
    seconds: float,
    meter: CpuMeter | None = None,
    delivers: bool = True,
) -> Churn:
    """`concurrency` processes churning against `addr` for `seconds`; unless
    the peer is one that `delivers` nothing (the stub), every cycle's
    message must be in the queue after."""
    queue = bench.admin.queue(label)
    meter = meter or bench.meter()
    try:
        args = [(addr, queue, seconds)] * concurrency
        results = procs.run(label, churn_worker, args, seconds + bench.profile.timeout, meter)
        landed = None
        if delivers:
            landed = bench.admin.verify({queue: sum(r["published"] for r in results)})
            meter.end()  # again: the cores over the drain too, as the rate counts it
    finally:
        bench.admin.delete(queue)
    times = [t for r in results for t in r["times"]]
    if not times:
        raise procs.BenchError(f"{label}: no cycle completed")
    last = max(r["end"] for r in results)
    wall = last - min(r["start"] for r in results)
    drained = 0.0 if landed is None else max(0.0, landed - last)
    return Churn(
        cycles=len(times),
        rate=len(times) / (wall + drained),
        median_ms=median(times) * 1000,
        p99_ms=percentile(times, 0.99) * 1000,
        cpu={"generators": gen_cpu(results, wall + drained), **meter.cores},
        drain_ms=drained * 1000,
    )


def _report(bench: Bench, scenario: str, runs: dict[str, Churn], rate: Target, med: Target) -> None:
    direct, proxy = runs["direct"], runs["proxy"]
    bench.details[scenario] = {label: run.as_dict() for label, run in runs.items()}
    bench.add(Row(scenario, "cycles/s", "1/s", direct.rate, proxy.rate, rate))
    bench.add(Row(scenario, "median cycle", "ms", direct.median_ms, proxy.median_ms, med))
    bench.add(Row(scenario, "p99 cycle", "ms", direct.p99_ms, proxy.p99_ms))
    if rate.ratio_at_least is not None:
        ceiling = zero_cost_ceiling(proxy.rate, proxy.cpu)
        bench.add(Row(scenario, f"cycles/s, {CEILING}", "1/s", direct.rate, ceiling))
    if "stub" in runs:
        # What the same clients get from canned replies: the machine's ceiling.
        stub = runs["stub"]
        reference = "canned-reply stub (reference)"
        bench.add(Row(scenario, f"cycles/s, {reference}", "1/s", direct.rate, stub.rate))
        bench.add(
            Row(scenario, f"median cycle, {reference}", "ms", direct.median_ms, stub.median_ms)
        )
    for label, run in runs.items():
        cores = ", ".join(
            f"{name} {used:.2f} ({used / run.rate * 1000:.2f} ms/cycle)"
            for name, used in run.cpu.items()
        )
        if label == "stub":
            checked = "answered (the stub keeps nothing)"
        else:
            checked = f"verified, all in the queue {run.drain_ms:.0f} ms after the last cycle"
        bench.note(f"{scenario} {label}: {run.cycles} cycles {checked}; cores used: {cores}")


def run_churn(bench: Bench) -> None:
    profile = bench.profile
    runs = {
        label: measure(bench, f"churn.{label}", addr, profile.churn_procs, profile.churn_seconds)
        for label, addr in bench.targets()
    }
    runs["stub"] = _stub_run(bench, "churn.stub", profile.churn_procs, profile.churn_seconds)
    _report(bench, "churn", runs, Target(ratio_at_least=6), Target())


def relay_round_trip(addr: tuple) -> float:
    """The median of RTT_PROBES Basic.Qos round trips through the relay at
    `addr`, in ms: the round trip the scenario really emulates."""
    wire = open_wire(addr, CYCLE_TIMEOUT)
    times = []
    for _ in range(RTT_PROBES):
        began = time.monotonic()
        wire.send(frames.QOS)
        wire.expect(frames.QOS_OK)
        times.append(time.monotonic() - began)
    wire.close()
    return median(times) * 1000


def run_rtt(bench: Bench) -> None:
    """Both the direct clients and amqplexd's upstream go through the relay.
    The stub row is without it: amqplexd answers its clients locally, and
    the stub shows what local answers cost on this machine."""
    profile = bench.profile
    runs: dict[str, Churn] = {}
    alone: dict[str, Churn] = {}
    with Relay(BROKER, RTT_DELAY) as relay, Daemon(relay.url, bench.workers) as proxy:
        round_trip = relay_round_trip(relay.addr)
        bench.details["relay_round_trip_ms"] = round_trip
        bench.note(f"churn-10ms-rtt: the relay's round trip to the broker is {round_trip:.2f} ms")
        for label, addr in (("direct", relay.addr), ("proxy", proxy.addr)):
            meter = bench.meter(proxy, relay=[relay.pid])
            try:
                runs[label] = measure(
                    bench, f"rtt.{label}", addr, profile.rtt_procs, profile.rtt_seconds, meter
                )
                # One client at a time: the cycle without waiting for a core.
                alone[label] = measure(
                    bench, f"rtt1.{label}", addr, 1, profile.rtt_seconds / 2, meter
                )
            except procs.BenchError as error:
                raise procs.BenchError(f"{error}\namqplexd log:\n{proxy.log_tail()}") from None
    runs["stub"] = _stub_run(bench, "rtt.stub", profile.rtt_procs, profile.rtt_seconds)
    _report(bench, "churn-10ms-rtt", runs, Target(), Target(at_most=1.5))
    bench.details["churn-10ms-rtt, one client"] = {k: v.as_dict() for k, v in alone.items()}
    metric = "median cycle, one client at a time (reference)"
    bench.add(
        Row("churn-10ms-rtt", metric, "ms", alone["direct"].median_ms, alone["proxy"].median_ms)
    )


def _stub_run(bench: Bench, label: str, concurrency: int, seconds: float) -> Churn:
    """The same churn answered by canned bytes (stub.py): what this machine
    allows any implementation, measured in the same run."""
    with Stub() as stub:
        meter = bench.meter(stub=[stub.pid])
        return measure(bench, label, stub.addr, concurrency, seconds, meter, delivers=False)
