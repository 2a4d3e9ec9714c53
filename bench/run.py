"""The benchmark harness: start amqplexd, run the scenarios against the
broker and through the proxy, print the table, keep the JSON."""

from __future__ import annotations

import argparse
import dataclasses
import time
import traceback
from collections.abc import Callable

from bench import churn, clients, report, throughput
from bench.broker import BROKER_URL, Admin
from bench.context import FULL, QUICK, Bench
from bench.daemon import Daemon
from bench.procs import BenchError

SCENARIOS: dict[str, tuple[Callable[[Bench], None], str]] = {
    "churn": (churn.run_churn, "(a) connect, channel, publish one message, close"),
    "rtt": (churn.run_rtt, "(b) the same churn with the broker 10 ms of round trip away"),
    # Memory before the throughput runs: the broker's VM takes long to give
    # back what gigabytes of queued messages took.
    "memory": (clients.run_memory, "(e) resident memory per idle client"),
    "clients": (clients.run_clients, "(f) thousands of clients connecting at once"),
    "publish": (throughput.run_publish, "(c) publish throughput, 256 B and 64 KB"),
    "consume": (throughput.run_consume, "(d) no-ack consume throughput, 256 B and 64 KB"),
}

NOISE_NOTE = (
    "Broker, amqplexd, the load generators (and anything else running) share this "
    "machine's cores: compare ratios within a run, and runs only on a quiet machine."
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs: a smoke test")
    parser.add_argument(
        "--scenario",
        action="append",
        choices=list(SCENARIOS),
        help="run only this scenario (repeatable); default: all, in the order listed",
    )
    parser.add_argument("--workers", type=int, default=2, help="amqplexd workers (-w), default 2")
    return parser.parse_args(argv)


def run_scenarios(bench: Bench, names: list[str]) -> list[str]:
    """Run each scenario; a failure is reported and the next one still runs."""
    failures: list[str] = []
    for name in names:
        scenario, description = SCENARIOS[name]
        print(f"== {name}: {description}", flush=True)
        began = time.monotonic()
        try:
            scenario(bench)
        except Exception as error:  # noqa: BLE001 - reported, and the next scenario runs
            if not isinstance(error, BenchError):
                traceback.print_exc()
            text = f"{name}: {error}\namqplexd log tail:\n{bench.proxy.log_tail(10)}"
            failures.append(text)
            print(f"!! FAILED {text}", flush=True)
        print(f"   ({time.monotonic() - began:.1f} s)", flush=True)
    return failures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = args.scenario or list(SCENARIOS)
    profile = QUICK if args.quick else FULL
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    machine = report.machine()
    admin = Admin()
    try:
        with Daemon(BROKER_URL, args.workers) as proxy:
            bench = Bench(profile, admin, proxy, args.workers)
            failures = run_scenarios(bench, names)
            clients.report_worker_rss(bench)
    finally:
        admin.close()
    print()
    print(report.table(bench.rows))
    print()
    print(f"note: {NOISE_NOTE} Load average {machine['loadavg'][0]:.2f} at start.")
    for failure in failures:  # in full above and in the JSON
        print(f"FAILED {failure.splitlines()[0]}")
    path = report.write_json(
        {
            "started": started,
            "quick": args.quick,
            "workers": args.workers,
            "profile": dataclasses.asdict(profile),
            "machine": machine,
            "loadavg_end": report.machine()["loadavg"],
            "rows": [row.as_dict() for row in bench.rows],
            "details": bench.details,
            "notes": bench.notes,
            "failures": failures,
        }
    )
    print(f"results: {path}")
    return 1 if failures else 0
