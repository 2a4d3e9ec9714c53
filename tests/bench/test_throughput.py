"""The throughput scenarios' places and runs: every place runs in every
turn, each turn starting one place later, and the table gets each place's median run, not its first
or best one; the zero-copy relay runs where it is a reference (large
messages), and each relay's CPU is its own group."""

from __future__ import annotations

import dataclasses

from bench.context import QUICK, Bench
from bench.throughput import Rate, Size, _in_turns, _meter, _places

SMALL = Size("256 B", 256, 0.95)
LARGE = Size("64 KB", 65536, 0.85)
PLACES = [("direct", ("127.0.0.1", 1)), ("proxy", ("127.0.0.1", 2)), ("relay", ("127.0.0.1", 3))]


def _bench(turns: int) -> Bench:
    return Bench(dataclasses.replace(QUICK, turns=turns), admin=None, proxy=None, workers=2)


def _rate(per_second: float) -> Rate:
    return Rate(messages=int(per_second), seconds=1.0, size=256, cpu={})


def test_places_take_turns_each_starting_one_place_later_and_keep_their_median_run():
    run = _runs({"direct": [100, 300, 200], "proxy": [90, 60, 80], "relay": [5, 4, 6]})
    bench = _bench(turns=3)
    runs = _in_turns(bench, "publish", SMALL, PLACES, run)
    assert run.done == [
        *("direct", "proxy", "relay"),
        *("proxy", "relay", "direct"),
        *("relay", "direct", "proxy"),
    ]
    assert {label: run.per_second for label, run in runs.items()} == {
        "direct": 200,
        "proxy": 80,
        "relay": 5,
    }
    assert "0.90x, 0.20x, 0.40x" in bench.notes[-1]


def test_an_even_count_keeps_the_lower_middle_run():
    runs = _in_turns(
        _bench(turns=2), "publish", SMALL, PLACES[:2], _runs({"direct": [40, 10], "proxy": [7, 9]})
    )
    assert (runs["direct"].per_second, runs["proxy"].per_second) == (10, 7)


def _runs(rates: dict[str, list[int]]):  # noqa: ANN202
    """A run() giving each place its rates in order."""
    done: list[str] = []

    def run(label: str, addr: tuple) -> Rate:
        done.append(label)
        return _rate(rates[label][done.count(label) - 1])

    run.done = done
    return run


class _Server:
    def __init__(self, name: str, pid: int, port: int) -> None:
        self.name, self.pid, self.addr = name, pid, ("127.0.0.1", port)


class _Daemon:
    addr = ("127.0.0.1", 5673)

    def pids(self) -> list[int]:
        return [11, 12]


def test_the_zero_copy_relay_runs_for_large_messages_only():
    bench = dataclasses.replace(_bench(turns=1), proxy=_Daemon())
    relay, splice = _Server("relay", 21, 6001), _Server("splice relay", 22, 6002)
    small = [label for label, _ in _places(bench, SMALL, relay, splice)]
    large = [label for label, _ in _places(bench, LARGE, relay, splice)]
    assert small == ["direct", "proxy", "relay"]
    assert large == ["direct", "proxy", "relay", "splice"]
    assert dict(_places(bench, LARGE, relay, splice))["splice"] == splice.addr


def test_each_relay_is_metered_as_a_group_of_its_own():
    bench = dataclasses.replace(_bench(turns=1), proxy=_Daemon())
    relays = (_Server("relay", 21, 6001), _Server("splice relay", 22, 6002))
    groups = _meter(bench, relays, None).groups
    assert groups["amqplexd"] == [11, 12]
    assert (groups["relay"], groups["splice relay"]) == ([21], [22])
