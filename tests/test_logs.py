"""Log lines operators rely on: one per client session end with who, how
long, how much and how it ended; text or JSON; never a password."""

from __future__ import annotations

import json

import pika

from tests.conftest import proxy_params


def test_a_session_end_line_says_who_how_long_how_much_and_how_it_ended(fresh_amqplexd, user):
    daemon = fresh_amqplexd()
    connection = pika.BlockingConnection(proxy_params(daemon.port, user))
    connection.channel()
    connection.close()
    line = daemon.wait_for_log("client session ended")
    for field in (
        "client=127.0.0.1:",
        f"user={user.name}",
        "vhost=/",
        "duration=",
        "bytes_in=",
        "bytes_out=",
        "close_code=200",
    ):
        assert field in line, field
    assert user.password not in daemon.log_text()


def test_json_logs_carry_the_same_fields(fresh_amqplexd, user):
    daemon = fresh_amqplexd(env={"AMQP_LOG_FORMAT": "json"})
    connection = pika.BlockingConnection(proxy_params(daemon.port, user))
    connection.close()
    line = daemon.wait_for_log("client session ended")
    entry = json.loads(line)
    assert entry["level"] == "info"
    assert entry["user"] == user.name
    assert entry["close_code"] == 200
    assert entry["bytes_in"] > 0 and entry["bytes_out"] > 0
    for other in daemon.log_text().splitlines():
        json.loads(other)  # every line is one JSON object


def test_workers_run_on_uvloop(fresh_amqplexd):
    daemon = fresh_amqplexd()
    assert "event loop: uvloop" in daemon.wait_for_log("event loop:")


def test_upstream_events_are_logged(fresh_amqplexd, user):
    daemon = fresh_amqplexd(
        env={"AMQP_POOL_IDLE_TIMEOUT": "0.5", "AMQP_POOL_CLEANUP_INTERVAL": "0.2"}
    )
    pika.BlockingConnection(proxy_params(daemon.port, user)).close()
    assert "open" in daemon.wait_for_log("upstream 1 for <Pool user=")
    assert "idle for" in daemon.wait_for_log("closing upstream for")
