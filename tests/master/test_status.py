"""GET /, /ready and /metrics on the master, scraped from the real daemon
with two workers."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import time

import pika
import pytest
from prometheus_client.parser import text_string_to_metric_families

from amqplex.master.status import MAX_OPEN_REQUESTS
from tests.conftest import proxy_params
from tests.master.test_arbiter import serving_workers
from tests.support.daemon import free_port
from tests.support.procs import workers
from tests.support.waiting import wait_until


def get(port: int, path: str, accept: str | None = None) -> tuple[int, str, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", path, headers={"Accept": accept} if accept else {})
    response = connection.getresponse()
    body = response.read().decode()
    connection.close()
    return response.status, response.getheader("Content-Type"), body


def scrape(port: int) -> dict[str, float]:
    """Every sample by name with its labels, e.g. 'amqplex_client_errors_total{code=403}'."""
    status, _, body = get(port, "/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


@pytest.fixture
def daemon(fresh_amqplexd):
    return fresh_amqplexd("-w", "2")


def test_health_is_ok_while_accepting(daemon):
    assert get(daemon.status_port, "/")[0::2] == (200, "OK\n")


def test_ready_while_the_broker_is_reachable(daemon):
    status, _, body = get(daemon.status_port, "/ready")
    assert status == 200, body


def test_idle_connections_to_the_status_port_do_not_pile_up_in_the_master(fresh_amqplexd):
    """Connections that never send a request: past MAX_OPEN_REQUESTS the
    oldest are let go, so the master holds a bounded number of descriptors
    (select() takes none past 1023) and answers the next request."""
    daemon = fresh_amqplexd("-w", "1")
    master = daemon.process.pid
    before = len(os.listdir(f"/proc/{master}/fd"))
    idle = []
    try:
        for _ in range(300):
            idle.append(socket.create_connection(("127.0.0.1", daemon.status_port), timeout=10))
        status, _, _ = get(daemon.status_port, "/")
        assert status == 200
        held = len(os.listdir(f"/proc/{master}/fd")) - before
        assert held <= MAX_OPEN_REQUESTS + 1 < len(idle)
    finally:
        for sock in idle:
            sock.close()


def test_a_replaced_workers_last_counters_reach_the_metrics(fresh_amqplexd):
    """The exporter runs once a second; a worker replaced by a reload right
    after its last clients left still has their counters exported."""
    daemon = fresh_amqplexd("-w", "1")
    old = wait_until(lambda: serving_workers(daemon.process.pid))
    for _ in range(3):
        pika.BlockingConnection(proxy_params(daemon.port)).close()
    os.kill(daemon.process.pid, signal.SIGHUP)
    wait_until(lambda: not set(old) & set(workers(daemon.process.pid)), timeout=20)
    # Three, and the harness's own check that the port listens.
    assert scrape(daemon.status_port)["amqplex_client_connections_total"] >= 3


def test_not_ready_when_the_broker_cannot_be_reached(fresh_amqplexd):
    daemon = fresh_amqplexd("-w", "1", upstream=f"amqp://127.0.0.1:{free_port()}")
    status, _, body = get(daemon.status_port, "/ready")
    assert status == 503
    assert "unreachable" in body


def test_active_clients_counts_clients_across_workers_then_returns_to_zero(daemon):
    handshakes = scrape(daemon.status_port).get("amqplex_client_handshake_seconds_count", 0)
    connections = [pika.BlockingConnection(proxy_params(daemon.port)) for _ in range(12)]
    for connection in connections:
        connection.channel()
    assert wait_until(lambda: scrape(daemon.status_port)["amqplex_active_clients"] == 12)
    metrics = scrape(daemon.status_port)
    assert metrics["amqplex_channels_used"] >= 12
    assert metrics["amqplex_client_connections_total"] >= 12
    # Each handshake timed, in the bulk the exporter hands on.
    assert wait_until(
        lambda: (
            scrape(daemon.status_port)["amqplex_client_handshake_seconds_count"] >= handshakes + 12
        )
    )
    # Both workers took some: each one's upstream shows up.
    assert metrics["amqplex_upstream_connections"] >= 1
    for connection in connections:
        connection.close()
    assert wait_until(lambda: scrape(daemon.status_port)["amqplex_active_clients"] == 0)
    assert wait_until(lambda: scrape(daemon.status_port)["amqplex_channels_used"] == 0)


def test_messages_frames_and_errors_are_counted_without_user_labels(daemon, user, queue_name):
    connection = pika.BlockingConnection(proxy_params(daemon.port, user))
    channel = connection.channel()
    channel.queue_declare(queue_name)
    for _ in range(5):
        channel.basic_publish("", queue_name, b"counted")
    for _ in range(5):
        channel.basic_get(queue_name, auto_ack=True)
    connection.close()
    bad = pika.ConnectionParameters(
        host="127.0.0.1",
        port=daemon.port,
        credentials=pika.PlainCredentials(user.name, "wrong-password"),
    )
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(bad)

    def counted() -> dict[str, float] | None:
        # A worker writes its counters one by one, so a scrape can fall
        # between two of them: wait until every one asserted on is in.
        metrics = scrape(daemon.status_port)
        ready = (
            metrics.get("amqplex_messages_published_total", 0) >= 5
            and metrics.get("amqplex_messages_delivered_total", 0) >= 5
            and metrics.get("amqplex_authentication_failures_total", 0) >= 1
            and metrics.get("amqplex_client_errors_total{code=403}", 0) >= 1
        )
        return metrics if ready else None

    metrics = wait_until(counted)
    assert metrics["amqplex_frames_total{direction=from_clients}"] > 0
    assert metrics["amqplex_bytes_total{direction=to_clients}"] > 0
    _, _, body = get(daemon.status_port, "/metrics")
    assert user.name not in body and user.password not in body and "127.0.0.1" not in body


def test_openmetrics_when_the_scraper_asks_for_it(daemon):
    status, content_type, body = get(
        daemon.status_port, "/metrics", accept="application/openmetrics-text; version=1.0.0"
    )
    assert status == 200
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith("# EOF")


def test_a_dead_workers_gauges_vanish_and_its_restart_is_counted(daemon):
    connection = pika.BlockingConnection(proxy_params(daemon.port))
    connection.channel()
    assert wait_until(lambda: scrape(daemon.status_port)["amqplex_active_clients"] == 1)
    before = set(serving_workers(daemon.process.pid))
    for pid in before:
        os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: len(set(serving_workers(daemon.process.pid)) - before) == 2)
    metrics = wait_until(
        lambda: (m := scrape(daemon.status_port))["amqplex_worker_restarts_total"] >= 2 and m
    )
    assert metrics["amqplex_active_clients"] == 0


def test_a_metrics_file_that_cannot_be_read_fails_the_scrape_not_the_master(
    fresh_amqplexd, tmp_path
):
    """An empty .db file, as a worker killed between prometheus-client's
    open and truncate leaves one: /metrics answers 500 and the master goes
    on serving, where the collector's error used to end it."""
    directory = tmp_path / "metrics"
    daemon = fresh_amqplexd("-w", "1", env={"PROMETHEUS_MULTIPROC_DIR": str(directory)})
    (directory / "counter_99999.db").write_bytes(b"")
    assert get(daemon.status_port, "/metrics")[0] == 500
    assert get(daemon.status_port, "/")[0] == 200
    assert daemon.process.poll() is None


def test_health_is_503_while_draining(fresh_amqplexd):
    # The client never answers the Close 320 the drain ends with: the worker
    # exits after drain_timeout and then client.close_timeout.
    daemon = fresh_amqplexd(
        "-w", "1", env={"AMQP_DRAIN_TIMEOUT": "2", "AMQP_CLIENT_CLOSE_TIMEOUT": "1"}
    )
    connection = pika.BlockingConnection(proxy_params(daemon.port))
    connection.channel()
    os.kill(daemon.process.pid, signal.SIGTERM)
    status, _, body = wait_until(lambda: (r := get(daemon.status_port, "/"))[0] == 503 and r)
    assert "draining" in body
    started = time.monotonic()
    daemon.process.wait(20)
    assert time.monotonic() - started < 10


def test_health_is_503_while_no_worker_is_alive(fresh_amqplexd):
    daemon = fresh_amqplexd("-w", "1")
    killed: set[int] = set()

    def no_live_worker() -> tuple[int, str, str] | None:
        # Kill each worker as it appears: the master's restart backoff grows
        # (0.5 s, 1 s, 2 s ...) and leaves a window with no worker at all.
        for pid in set(serving_workers(daemon.process.pid)) - killed:
            killed.add(pid)
            os.kill(pid, signal.SIGKILL)
        answer = get(daemon.status_port, "/")
        return answer if answer[0] == 503 else None

    status, _, body = wait_until(no_live_worker, timeout=20, interval=0.02)
    assert "no live worker" in body
    # And it comes back by itself.
    assert wait_until(lambda: get(daemon.status_port, "/")[0] == 200, timeout=20)
