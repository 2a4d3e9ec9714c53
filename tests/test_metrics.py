from prometheus_client import CollectorRegistry, Histogram

from amqplex import metrics
from amqplex.worker.stats import Stats

# Below the first bound, on a bound (le is inclusive), between, over all.
SECONDS = [0.0001, 0.0005, 0.0005, 0.003, 0.2, 0.2, 0.2, 10, 42.0]


def samples(histogram: Histogram) -> dict:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for m in histogram.collect()
        for s in m.samples
        if not s.name.endswith("_created")
    }


def test_bulk_observations_leave_what_observing_each_leaves():
    observed = Histogram(
        "one_by_one", "d", buckets=metrics.HANDSHAKE_BUCKETS, registry=CollectorRegistry()
    )
    bulk = Histogram(
        "one_by_one", "d", buckets=metrics.HANDSHAKE_BUCKETS, registry=CollectorRegistry()
    )
    stats = Stats()
    for seconds in SECONDS:
        observed.observe(seconds)
        stats.handshake_done(seconds)
    metrics.add_observations(bulk, stats.handshakes, stats.handshake_seconds)
    assert samples(bulk) == samples(observed)
    assert samples(bulk)[("one_by_one_count", ())] == len(SECONDS)
