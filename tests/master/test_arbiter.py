"""The pre-fork master as operators drive it: real daemon, real signals."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import pika
import pytest
from pamqp import commands

from amqplex.protocol.constants import PROTOCOL_HEADER
from tests.conftest import proxy_params
from tests.support.broker import BROKER_HOST, BROKER_PORT
from tests.support.daemon import TEST_ENV, free_ports, wait_listening
from tests.support.procs import workers
from tests.support.rawclient import RawClient
from tests.support.waiting import wait_until


def title(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as handle:
        return handle.read().replace(b"\0", b" ").decode().strip()


def serving_workers(master_pid: int) -> dict[int, str]:
    return {pid: t for pid, t in workers(master_pid).items() if "draining" not in t}


def publish_once(port: int, queue: str) -> None:
    connection = pika.BlockingConnection(proxy_params(port))
    channel = connection.channel()
    channel.confirm_delivery()
    channel.basic_publish("", queue, b"m")
    connection.close()


def message_count(queue: str) -> int:
    connection = pika.BlockingConnection(pika.ConnectionParameters(BROKER_HOST, BROKER_PORT))
    count = connection.channel().queue_declare(queue, passive=True).method.message_count
    connection.close()
    return count


def test_master_and_workers_are_named_in_ps(fresh_amqplexd):
    daemon = fresh_amqplexd("-w", "2")
    assert title(daemon.process.pid).startswith("amqplexd: master [")
    titles = sorted(
        wait_until(
            lambda: len(workers(daemon.process.pid)) == 2 and workers(daemon.process.pid)
        ).values()
    )
    assert titles == ["amqplexd: worker 1", "amqplexd: worker 2"]


def test_a_dead_worker_is_replaced_and_the_master_says_why(fresh_amqplexd, queue_name):
    daemon = fresh_amqplexd("-w", "1")
    setup = pika.BlockingConnection(proxy_params(daemon.port))
    setup.channel().queue_declare(queue_name)
    setup.close()
    (victim,) = wait_until(lambda: serving_workers(daemon.process.pid))
    os.kill(victim, signal.SIGKILL)
    (replacement,) = wait_until(
        lambda: [pid for pid in serving_workers(daemon.process.pid) if pid != victim]
    )
    assert title(replacement) == "amqplexd: worker 1"
    assert wait_until(lambda: "killed by SIGKILL" in daemon.log_text())
    publish_once(daemon.port, queue_name)
    assert message_count(queue_name) == 1


def test_a_worker_that_keeps_dying_is_restarted_with_growing_backoff(fresh_amqplexd):
    daemon = fresh_amqplexd("-w", "1")
    seen: set[int] = set()
    for _ in range(3):
        pid = wait_until(
            lambda: next((p for p in serving_workers(daemon.process.pid) if p not in seen), None)
        )
        seen.add(pid)
        os.kill(pid, signal.SIGKILL)
    log = wait_until(lambda: "restarting in 1.0 s" in daemon.log_text() and daemon.log_text())
    assert "restarting in 0.5 s" in log


PIDS_CGROUPS = pathlib.Path("/sys/fs/cgroup/pids")


@contextlib.contextmanager
def no_more_processes(pid: int):
    """`pid` in a cgroup of its own whose pids.max lets it fork nothing more
    (the kernel's own EAGAIN: a limit on processes, as root meets it too);
    yields a function that lifts the limit."""
    if not os.access(PIDS_CGROUPS, os.W_OK):
        pytest.skip("no writable pids cgroup here")
    group = PIDS_CGROUPS / f"amqplex-test-{os.getpid()}-{pid}"
    group.mkdir()
    try:
        (group / "cgroup.procs").write_text(str(pid))
        (group / "pids.max").write_text((group / "pids.current").read_text())
        yield lambda: (group / "pids.max").write_text("max")
    finally:
        (group / "pids.max").write_text("max")

        # The master and what it forked meanwhile go back; a dead one leaves
        # once it is reaped.
        def emptied() -> bool:
            for member in (group / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    (PIDS_CGROUPS / "cgroup.procs").write_text(member)
            return not (group / "cgroup.procs").read_text().strip()

        wait_until(emptied, what="the test's cgroup emptied")
        group.rmdir()


def test_a_master_that_cannot_fork_a_worker_carries_on_and_tries_again(fresh_amqplexd):
    daemon = fresh_amqplexd("-w", "1")
    (victim,) = wait_until(lambda: serving_workers(daemon.process.pid))
    with no_more_processes(daemon.process.pid) as lift:
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: "cannot start worker 1" in daemon.log_text(), what="the fork refused")
        assert daemon.process.poll() is None, "the master died"
        lift()
        (replacement,) = wait_until(
            lambda: [pid for pid in serving_workers(daemon.process.pid) if pid != victim],
            what="a new worker",
        )
    with pika.BlockingConnection(proxy_params(daemon.port)) as connection:
        assert connection.channel().is_open


def test_hup_replaces_workers_without_failing_a_client_or_losing_a_message(
    fresh_amqplexd, queue_name
):
    daemon = fresh_amqplexd("-w", "2")
    setup = pika.BlockingConnection(proxy_params(daemon.port))
    setup.channel().queue_declare(queue_name)
    setup.close()
    published = 0
    errors: list[BaseException] = []
    lock = threading.Lock()
    stop = threading.Event()

    def churn() -> None:
        nonlocal published
        while not stop.is_set():
            try:
                publish_once(daemon.port, queue_name)
            except BaseException as error:  # every failure counts
                errors.append(error)
                return
            with lock:
                published += 1

    threads = [threading.Thread(target=churn) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(3):
            before = set(serving_workers(daemon.process.pid))
            target = published + 20
            wait_until(lambda t=target: published >= t or errors)
            os.kill(daemon.process.pid, signal.SIGHUP)
            wait_until(lambda b=before: not (set(serving_workers(daemon.process.pid)) & b))
        target = published + 20
        wait_until(lambda: published >= target or errors)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert errors == []
    assert published >= 80
    assert message_count(queue_name) == published


def test_hup_keeps_the_old_workers_accepting_until_the_new_ones_do(fresh_amqplexd, relay):
    """A new worker asks the broker for its properties before it accepts
    (up to twice upstream.connect_timeout): meanwhile the old one serves,
    and a client arriving then is not left waiting in the queue."""
    daemon = fresh_amqplexd("-w", "1", upstream=relay.url)
    (old,) = wait_until(lambda: serving_workers(daemon.process.pid))
    pika.BlockingConnection(proxy_params(daemon.port)).close()  # it accepts
    relay.delay(1.0)  # the new worker's first answer from the broker: seconds away
    os.kill(daemon.process.pid, signal.SIGHUP)
    daemon.wait_for_log("HUP: reloading configuration")
    started = time.monotonic()
    with RawClient(daemon.port) as client:
        client.send(PROTOCOL_HEADER)
        client.expect(commands.Connection.Start, timeout=10)
    assert time.monotonic() - started < 0.5, "the client waited for the new worker"
    relay.delay(0)
    wait_until(lambda: old not in workers(daemon.process.pid), timeout=20, what="the old one")


def test_hup_with_a_bad_configuration_keeps_the_running_one(fresh_amqplexd, tmp_path):
    config = tmp_path / "amqplex.yaml"
    config.write_text("pool:\n  max_channels: 100\n")
    daemon = fresh_amqplexd("-w", "1", "-c", str(config))
    before = wait_until(lambda: serving_workers(daemon.process.pid))
    config.write_text("pool:\n  max_channels: -5\n")
    os.kill(daemon.process.pid, signal.SIGHUP)
    log = wait_until(lambda: "reload refused" in daemon.log_text() and daemon.log_text())
    assert "pool.max_channels" in log
    assert serving_workers(daemon.process.pid) == before
    connection = pika.BlockingConnection(proxy_params(daemon.port))
    assert connection.channel().is_open
    connection.close()


def test_hup_applies_the_new_log_format_and_level(fresh_amqplexd, tmp_path):
    config = tmp_path / "amqplex.yaml"
    config.write_text("log:\n  format: text\n")
    daemon = fresh_amqplexd("-w", "1", "-c", str(config))
    (old,) = wait_until(lambda: serving_workers(daemon.process.pid))
    config.write_text("log:\n  format: json\n  level: debug\n")
    os.kill(daemon.process.pid, signal.SIGHUP)

    def json_lines() -> list[dict]:
        lines = daemon.log_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    # The new worker's own start, in JSON.
    started = wait_until(
        lambda: [e for e in json_lines() if e["message"].startswith("listening on")],
        what="a JSON line from the new worker",
    )
    assert started[0]["level"] == "info"
    # The old worker accepts until the new one does: then it drains.
    wait_until(lambda: old not in serving_workers(daemon.process.pid), what="the old one draining")
    # Debug lines now show: a client that goes before its Open is one.
    with socket.create_connection(("127.0.0.1", daemon.port)) as sock:
        sock.sendall(b"AMQP\x00\x00\x09\x01")
        sock.recv(4096)
    wait_until(lambda: any(e["level"] == "debug" for e in json_lines()), what="a debug line")


@contextlib.contextmanager
def daemon_from_file(config: pathlib.Path, log: pathlib.Path):
    """amqplexd whose listener and status ports come from `config` alone
    (the Amqplexd helper fixes them with flags, which a reload cannot move)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMQP_")}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "amqplex", f"amqp://{BROKER_HOST}:{BROKER_PORT}"]
            + ["-w", "1", "-c", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**env, **TEST_ENV},
        )
    try:
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(20)


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def serves(port: int) -> bool:
    connection = pika.BlockingConnection(proxy_params(port))
    try:
        return connection.channel().is_open
    finally:
        connection.close()


def ports_config(port: int, status_port: int) -> str:
    return f"listen:\n  address: 127.0.0.1\n  port: {port}\nmetrics:\n  port: {status_port}\n"


def test_hup_moving_the_ports_serves_the_new_ones_and_lets_the_old_ones_go(tmp_path):
    old, old_status, new, new_status = free_ports(4)
    config = tmp_path / "amqplex.yaml"
    config.write_text(ports_config(old, old_status))
    with daemon_from_file(config, tmp_path / "log") as process:
        wait_listening(old, time.monotonic() + 20, process)
        config.write_text(ports_config(new, new_status))
        os.kill(process.pid, signal.SIGHUP)
        wait_listening(new, time.monotonic() + 20, process)
        assert serves(new)
        # Once the old worker has drained, nothing holds the old ports open
        # (the new worker was forked without them).
        wait_until(lambda: refused(old) and refused(old_status), timeout=20)


def test_hup_refused_for_a_taken_status_port_keeps_the_old_listener_alone(tmp_path):
    old, old_status, new = free_ports(3)
    config = tmp_path / "amqplex.yaml"
    config.write_text(ports_config(old, old_status))
    with (
        socket.create_server(("127.0.0.1", 0)) as taken,
        daemon_from_file(config, tmp_path / "log") as process,
    ):
        wait_listening(old, time.monotonic() + 20, process)
        config.write_text(ports_config(new, taken.getsockname()[1]))
        os.kill(process.pid, signal.SIGHUP)
        wait_until(lambda: "reload refused" in (tmp_path / "log").read_text())
        assert refused(new)  # bound for the reload, and let go with it
        assert serves(old)


def test_term_drains_then_closes_with_320_and_exits_0(fresh_amqplexd, queue_name):
    daemon = fresh_amqplexd("-w", "1", env={"AMQP_DRAIN_TIMEOUT": "2"})
    connection = pika.BlockingConnection(proxy_params(daemon.port))
    channel = connection.channel()
    channel.queue_declare(queue_name)
    channel.confirm_delivery()
    for _ in range(10):
        channel.basic_publish("", queue_name, b"before")
    started = time.monotonic()
    os.kill(daemon.process.pid, signal.SIGTERM)
    # Still served while draining.
    channel.basic_publish("", queue_name, b"during")
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as closed:
        connection.process_data_events(time_limit=10)
        connection.process_data_events(time_limit=10)
    assert closed.value.reply_code == 320
    assert daemon.process.wait(15) == 0
    assert time.monotonic() - started >= 1.5
    assert message_count(queue_name) == 11


def test_term_refuses_new_clients_at_once_while_the_old_ones_drain(fresh_amqplexd):
    """As HAProxy's soft stop: the port closes at once, so a new client is
    refused (and tries another proxy) rather than queued where nobody will
    serve it; /ready says so too."""
    daemon = fresh_amqplexd("-w", "1", env={"AMQP_DRAIN_TIMEOUT": "30"})
    connection = pika.BlockingConnection(proxy_params(daemon.port))
    os.kill(daemon.process.pid, signal.SIGTERM)
    wait_until(lambda: refused(daemon.port), timeout=5, what="the port refusing")
    ready = http.client.HTTPConnection("127.0.0.1", daemon.status_port, timeout=5)
    ready.request("GET", "/ready")
    assert ready.getresponse().status == 503
    ready.close()
    assert connection.channel().is_open  # still served while it drains
    connection.close()
    assert daemon.process.wait(15) == 0


def test_quit_exits_at_once(fresh_amqplexd):
    daemon = fresh_amqplexd("-w", "1")
    connection = pika.BlockingConnection(proxy_params(daemon.port))
    started = time.monotonic()
    os.kill(daemon.process.pid, signal.SIGQUIT)
    daemon.process.wait(10)
    assert time.monotonic() - started < 3
    with pytest.raises(pika.exceptions.AMQPError):
        connection.process_data_events(time_limit=2)
        connection.channel()


def test_quit_during_a_drain_exits_at_once(fresh_amqplexd):
    """TERM, then QUIT while a client still holds the drain: everything
    exits now, not after the drain or the master's kill grace."""
    daemon = fresh_amqplexd("-w", "1", env={"AMQP_DRAIN_TIMEOUT": "60"})
    connection = pika.BlockingConnection(proxy_params(daemon.port))
    (worker,) = wait_until(lambda: serving_workers(daemon.process.pid))
    os.kill(daemon.process.pid, signal.SIGTERM)
    wait_until(lambda: "draining" in title(worker), what="the worker draining")
    started = time.monotonic()
    os.kill(daemon.process.pid, signal.SIGQUIT)
    daemon.process.wait(10)
    assert time.monotonic() - started < 3
    assert not os.path.exists(f"/proc/{worker}"), "the master left its worker behind"
    assert "did not stop in time" not in daemon.log_text()
    with contextlib.suppress(pika.exceptions.AMQPError):
        connection.close()


def test_workers_whose_master_died_drain_and_exit(fresh_amqplexd):
    """A master killed outright (OOM, SIGKILL) must not leave workers
    serving with nobody to restart, reload or stop them."""
    daemon = fresh_amqplexd("-w", "1", env={"AMQP_DRAIN_TIMEOUT": "1"})
    connection = pika.BlockingConnection(proxy_params(daemon.port))
    (worker,) = wait_until(lambda: serving_workers(daemon.process.pid))
    os.kill(daemon.process.pid, signal.SIGKILL)
    daemon.process.wait(5)
    try:
        with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as closed:
            connection.process_data_events(time_limit=10)
            connection.process_data_events(time_limit=10)
        assert closed.value.reply_code == 320
        wait_until(lambda: not os.path.exists(f"/proc/{worker}"), what="the worker's exit")
        assert "is gone: draining" in daemon.log_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)  # nobody else would


def test_a_replaced_worker_that_will_not_finish_is_killed_after_its_drain(fresh_amqplexd):
    daemon = fresh_amqplexd(
        "-w", "1", env={"AMQP_DRAIN_TIMEOUT": "0.5", "AMQP_CLIENT_CLOSE_TIMEOUT": "0.5"}
    )
    (old,) = wait_until(lambda: serving_workers(daemon.process.pid))
    os.kill(old, signal.SIGSTOP)  # hung: it will never act on the TERM
    try:
        os.kill(daemon.process.pid, signal.SIGHUP)
        wait_until(lambda: set(serving_workers(daemon.process.pid)) - {old}, what="a new worker")
        # 0.5 + 2 x 0.5 + KILL_GRACE (5 s), with room for a loaded host.
        wait_until(lambda: old not in workers(daemon.process.pid), timeout=15, what="the kill")
        assert "did not stop in time; killing it" in daemon.log_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(old, signal.SIGKILL)


def test_ttin_adds_and_ttou_removes_a_worker(fresh_amqplexd):
    daemon = fresh_amqplexd("-w", "1")
    wait_until(lambda: len(serving_workers(daemon.process.pid)) == 1)
    os.kill(daemon.process.pid, signal.SIGTTIN)
    wait_until(lambda: len(serving_workers(daemon.process.pid)) == 2)
    os.kill(daemon.process.pid, signal.SIGTTOU)
    wait_until(lambda: len(workers(daemon.process.pid)) == 1)


@pytest.mark.parametrize(
    ("env", "said"),
    [
        # Refused with the configuration now, before the master binds anything.
        ({"AMQP_LISTEN_ADDRESS": "0.0.0.0:5673"}, "listen.address: not an address to listen on"),
        ({"AMQP_LISTEN_PORT": "{taken}"}, "listen.address, listen.port: cannot listen on"),
        ({"AMQP_METRICS_PORT": "{taken}"}, "metrics.address, metrics.port: cannot serve status"),
    ],
    ids=["address-with-a-port", "listen-port-taken", "status-port-taken"],
)
def test_a_listener_that_cannot_be_bound_is_a_message_naming_the_keys(env, said):
    """As a bad setting is: exit 1 and a line naming what to fix, not a
    traceback (an address --check cannot refuse, a port taken meanwhile)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        env = {key: value.format(taken=port) for key, value in env.items()}
        clean = {k: v for k, v in os.environ.items() if not k.startswith("AMQP_")}
        result = subprocess.run(
            [sys.executable, "-m", "amqplex", f"amqp://{BROKER_HOST}:{BROKER_PORT}", "-w", "1"],
            env={
                **clean,
                **TEST_ENV,
                "AMQP_LISTEN_ADDRESS": "127.0.0.1",
                "AMQP_LISTEN_PORT": str(free_ports(1)[0]),
                **env,
            },
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    assert said in result.stderr
    assert "Traceback" not in result.stderr
