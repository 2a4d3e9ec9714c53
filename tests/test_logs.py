"""Log lines operators rely on: one per client session end with who, how
long, how much and how it ended; text or JSON; never a password."""

from __future__ import annotations

import io
import json
import logging
import time

import pika

from amqplex import logs
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


def _buffered(name: str) -> tuple[logging.Logger, logs.BufferedHandler, io.StringIO]:
    out = io.StringIO()
    target = logging.StreamHandler(out)
    target.setFormatter(logs.TextFormatter())
    logger = logging.getLogger(f"tests.logs.{name}")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    handler = logs.BufferedHandler(target)
    logger.addHandler(handler)
    return logger, handler, out


def test_a_deferred_line_is_written_at_flush_as_logging_it_would_write_it():
    logger, handler, out = _buffered("same")
    fields = {"client": "127.0.0.1:5", "close_text": "bye now", "bytes_in": 3}
    logger.info("client session ended", extra={"fields": fields})
    logs.defer(logger, logging.INFO, "client session ended", fields)
    assert out.getvalue() == ""
    handler.flush()
    logged, deferred = out.getvalue().splitlines()
    assert deferred.split(" ", 2)[2] == logged.split(" ", 2)[2]
    assert 'client=127.0.0.1:5 close_text="bye now" bytes_in=3' in deferred


def test_a_deferred_line_keeps_the_time_it_was_deferred_at(monkeypatch):
    logger, handler, out = _buffered("time")
    monkeypatch.setattr(logs.time, "time", lambda: 86400.25)
    logs.defer(logger, logging.INFO, "client session ended", {})
    monkeypatch.undo()
    handler.flush()
    [record_time] = [line.split(" ")[1] for line in out.getvalue().splitlines()]
    assert record_time.endswith(",250")
    assert out.getvalue().startswith(time.strftime("%Y-%m-%d", time.localtime(86400.25)))


def test_deferred_lines_stay_in_order_with_lines_logged_between_them():
    logger, handler, out = _buffered("order")
    logs.defer(logger, logging.INFO, "first", {})
    logger.info("second")
    logs.defer(logger, logging.INFO, "third", {})
    logger.warning("fourth")  # WARNING writes the batch at once
    assert [line.rsplit(": ", 1)[1] for line in out.getvalue().splitlines()] == [
        "first",
        "second",
        "third",
        "fourth",
    ]


def test_deferred_lines_are_written_when_the_buffer_fills_and_at_close():
    logger, handler, out = _buffered("full")
    for number in range(handler.capacity):
        logs.defer(logger, logging.INFO, f"line {number}", {})
    assert len(out.getvalue().splitlines()) == handler.capacity
    logs.defer(logger, logging.INFO, "last", {})
    handler.close()  # what logging.shutdown does at a worker's exit
    assert out.getvalue().splitlines()[-1].endswith("last")


def test_a_deferred_line_below_the_level_is_dropped_and_without_buffering_written_at_once():
    logger, handler, out = _buffered("level")
    logger.setLevel(logging.INFO)
    logs.defer(logger, logging.DEBUG, "not this", {})
    handler.flush()
    assert out.getvalue() == ""
    logger.removeHandler(handler)
    direct = logging.StreamHandler(out)
    logger.addHandler(direct)
    logs.defer(logger, logging.INFO, "at once", {"a": 1})
    assert out.getvalue() == "at once\n"
