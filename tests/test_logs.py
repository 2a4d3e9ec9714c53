"""Log lines operators rely on: one per client session end with who, how
long, how much and how it ended; text or JSON; never a password."""

from __future__ import annotations

import datetime
import io
import json
import logging
import sys
import time
import types
import weakref

import pika
import pytest
from hypothesis import given
from hypothesis import strategies as st

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


@pytest.fixture
def buffered():
    """A logger of the test's own writing through a BufferedHandler into a
    string, as a worker's session logger does (buffer_output); removed after."""
    made = []

    def make(name: str) -> tuple[logging.Logger, logs.BufferedHandler, io.StringIO]:
        out = io.StringIO()
        target = logging.StreamHandler(out)
        target.setFormatter(logs.TextFormatter())
        logger = logging.getLogger(f"tests.logs.{name}")
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        handler = logs.BufferedHandler(target)
        logger.addHandler(handler)
        made.append((logger, handler))
        return logger, handler, out

    yield make
    for logger, handler in made:
        logger.removeHandler(handler)
        handler.close()
        logger.propagate = True


def test_a_deferred_line_is_written_at_flush_as_logging_it_would_write_it(buffered):
    logger, handler, out = buffered("same")
    fields = {"client": "127.0.0.1:5", "close_text": "bye now", "bytes_in": 3}
    logger.info("client session ended", extra={"fields": fields})
    logs.defer(logger, logging.INFO, "client session ended", fields)
    assert out.getvalue() == ""
    handler.flush()
    logged, deferred = out.getvalue().splitlines()
    assert deferred.split(" ", 2)[2] == logged.split(" ", 2)[2]
    assert 'client=127.0.0.1:5 close_text="bye now" bytes_in=3' in deferred


def test_a_deferred_json_line_is_written_as_logging_would_write_it(buffered):
    logger, handler, out = buffered("json")
    handler.target.setFormatter(logs.JSONFormatter())
    fields = {"client": "127.0.0.1:5", "close_text": "bye now", "bytes_in": 3}
    logger.info("client session ended", extra={"fields": fields})
    logs.defer(logger, logging.INFO, "client session ended", fields)
    handler.flush()
    logged, deferred = (json.loads(line) for line in out.getvalue().splitlines())
    moments = [
        datetime.datetime.strptime(entry.pop("time"), "%Y-%m-%dT%H:%M:%S.%fZ")
        for entry in (logged, deferred)
    ]
    assert abs(moments[1] - moments[0]) < datetime.timedelta(seconds=1)
    assert deferred == logged
    assert deferred["close_text"] == "bye now" and deferred["level"] == "info"


def test_a_deferred_line_is_never_made_a_record(buffered):
    logger, handler, out = buffered("lazy")
    made = []
    factory = logging.getLogRecordFactory()
    logging.setLogRecordFactory(lambda *a, **k: made.append(a) or factory(*a, **k))
    try:
        logs.defer(logger, logging.INFO, "client session ended", {"user": "guest"})
        handler.flush()
        logger.info("a record")  # the control: this one is
    finally:
        logging.setLogRecordFactory(factory)
    assert len(made) == 1
    assert out.getvalue().splitlines()[0].endswith("client session ended user=guest")


def test_a_batch_that_cannot_be_written_is_reported_with_its_first_line(buffered, monkeypatch):
    logger, handler, out = buffered("unwritable")
    reported = []
    monkeypatch.setattr(handler, "handleError", reported.append)

    def refuse(text: str) -> None:
        raise OSError("no space left on device")

    monkeypatch.setattr(out, "write", refuse)
    logs.defer(logger, logging.INFO, "client session ended", {})
    handler.flush()
    assert [record.getMessage() for record in reported] == ["client session ended"]
    assert handler.buffer == []


def test_a_deferred_line_keeps_the_time_it_was_deferred_at(buffered, monkeypatch):
    logger, handler, out = buffered("time")
    monkeypatch.setattr(logs, "time", types.SimpleNamespace(time=lambda: 86400.25))
    logs.defer(logger, logging.INFO, "client session ended", {})
    monkeypatch.undo()
    handler.flush()
    assert out.getvalue().startswith(
        time.strftime("%Y-%m-%d %H:%M:%S,250", time.localtime(86400.25))
    )


def test_deferred_lines_stay_in_order_with_lines_logged_between_them(buffered):
    logger, handler, out = buffered("order")
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


def test_deferred_lines_are_written_when_the_buffer_fills(buffered):
    logger, handler, out = buffered("full")
    for number in range(handler.capacity - 1):
        logs.defer(logger, logging.INFO, f"line {number}", {})
    assert out.getvalue() == ""
    logger.info("the one that fills it")
    lines = out.getvalue().splitlines()
    assert len(lines) == handler.capacity
    assert lines[-2].endswith(f"line {handler.capacity - 2}")
    assert lines[-1].endswith("the one that fills it")


def test_deferred_lines_are_written_at_logging_shutdown(buffered):
    """What a worker's exit does (Arbiter.spawn_worker)."""
    logger, handler, out = buffered("exit")
    logs.defer(logger, logging.INFO, "last words", {})
    logging.shutdown([weakref.ref(handler)])
    assert out.getvalue().endswith("last words\n")


def test_a_line_is_logged_at_once_where_deferring_it_would_change_it(buffered):
    logger, handler, out = buffered("filtered")
    logger.addFilter(lambda record: "secret" not in record.getMessage())
    logs.defer(logger, logging.INFO, "a secret", {})
    logs.defer(logger, logging.INFO, "no filter stops this", {})
    handler.flush()
    assert out.getvalue().splitlines()[0].endswith("no filter stops this")
    assert len(out.getvalue().splitlines()) == 1


def test_a_deferred_line_below_the_level_is_dropped_and_without_buffering_written_at_once():
    out = io.StringIO()
    logger = logging.getLogger("tests.logs.unbuffered")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    direct = logging.StreamHandler(out)
    logger.addHandler(direct)
    try:
        logs.defer(logger, logging.DEBUG, "not this", {})
        logs.defer(logger, logging.INFO, "at once", {"a": 1})
        assert out.getvalue() == "at once\n"
    finally:
        logger.removeHandler(direct)


@given(st.one_of(st.text(), st.integers(), st.floats(allow_nan=False), st.booleans(), st.none()))
def test_a_field_value_is_bare_or_quoted_as_json_would_quote_it(value):
    text = str(value)
    quoted = not text or " " in text or '"' in text or not text.isprintable()
    assert logs._text(value) == (json.dumps(text) if quoted else text)


def test_a_client_chosen_message_cannot_start_a_log_line_of_its_own(capsys):
    """Client text reaches messages too (the reason a client is closed, an
    exchange type it declared): escaped, it stays on its line; a traceback
    still follows on lines of its own."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logs.TextFormatter())
    logger = logging.getLogger("amqplex.test-forged-message")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("closing client: unknown type '%s'", "x\n2026-12-03 ERROR amqplex: forged")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed for 'a\rb'")
    finally:
        logger.removeHandler(handler)
    lines = capsys.readouterr().err.splitlines()
    assert not any(line.startswith("2026-12-03 ERROR") for line in lines), lines
    assert "unknown type 'x\\n2026-12-03 ERROR amqplex: forged'" in lines[0]
    assert "failed for 'a\\rb'" in lines[1]
    assert lines[2] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: boom"


def test_a_client_chosen_value_cannot_start_a_log_line_of_its_own():
    forged = "x\n2026-12-03 13:00:00,000 1 ERROR\tamqplex: forged"
    assert "\n" not in logs._pairs({"user": forged, "vhost": "a\tb"})
