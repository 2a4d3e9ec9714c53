"""Log output: text for people, JSON (one object a line) for collectors.

Fields passed as `extra={"fields": {...}}` (session ends, upstream events)
become "key=value" pairs in text and keys of the JSON object.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
import time

from amqplex import procid

TEXT_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT, built directly: the generic Formatter path and a
    strftime per line cost more than the line, one per client session."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.stack_info:
            record.process = procid.current()
            line = super().format(record)
        else:
            line = (
                f"{self._asctime(record)} {procid.current()} {record.levelname} {record.name}: "
                f"{record.getMessage()}"
            )
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{key}={_text(value)}" for key, value in fields.items())
        return line

    def _asctime(self, record: logging.LogRecord) -> str:
        """As Formatter.formatTime writes it, the date and time made once a second."""
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime(self.default_time_format, self.converter(second))
        return f"{self._stamp},{int(record.msecs):03d}"


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": procid.current(),
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class BufferedHandler(logging.handlers.MemoryHandler):
    """Holds INFO and DEBUG lines (one per client session: thousands a
    second under churn) and writes them in batches: at WARNING, when the
    buffer is full, or when flush() is called (workers do, every second).

    The busiest lines need not even be records until then: defer() keeps
    what makes one, and flush() makes them all in one go, which costs a
    churning worker less than a record made between a client's frames.
    A worker's loop thread is the only caller."""

    def __init__(self, target: logging.Handler) -> None:
        super().__init__(capacity=512, flushLevel=logging.WARNING, target=target)
        self._deferred: list[tuple[float, logging.Logger, int, str, dict]] = []

    def defer(self, logger: logging.Logger, level: int, message: str, fields: dict) -> None:
        self._deferred.append((time.time(), logger, level, message, fields))
        if len(self._deferred) + len(self.buffer) >= self.capacity:
            self.flush()

    def emit(self, record: logging.LogRecord) -> None:
        # Deferred lines came first: they go before this one.
        self._make_deferred()
        super().emit(record)

    def flush(self) -> None:
        # One write for the batch, not a write per line.
        self.acquire()
        try:
            self._make_deferred()
            if self.buffer and self.target is not None:
                lines = [self.target.format(record) for record in self.buffer]
                stream = self.target.stream
                try:
                    stream.write("\n".join(lines) + "\n")
                    stream.flush()
                except OSError:  # a closed or full stderr: as StreamHandler.emit does
                    self.handleError(self.buffer[0])
                self.buffer.clear()
        finally:
            self.release()

    def _make_deferred(self) -> None:
        if not self._deferred:
            return
        records = [_record(*line) for line in self._deferred]
        self.buffer.extend(records)
        self._deferred.clear()


def _record(
    created: float, logger: logging.Logger, level: int, message: str, fields: dict
) -> logging.LogRecord:
    """The record logger.log(level, message, extra={"fields": fields}) makes,
    as if made at `created`. Its source is what every record here gets, with
    logging._srcfile None (configure)."""
    record = logger.makeRecord(
        logger.name,
        level,
        "(unknown file)",
        0,
        message,
        (),
        None,
        "(unknown function)",
        extra={"fields": fields},
    )
    # The times LogRecord.__init__ (3.11) derives from time.time_ns(), moved
    # back to `created`.
    record.relativeCreated -= (record.created - created) * 1000
    record.created = created
    record.msecs = int((created - int(created)) * 1000) + 0.0
    return record


def configure(level: str, format: str) -> None:
    # Nothing here prints a line's source, thread or process name, and the
    # formatters know the process id (procid): not collecting them makes each
    # record cheaper (the logging HOWTO's "Optimization"), which counts at
    # one line per client session.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.logProcesses = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


def buffer_output(logger_name: str) -> None:
    """Batch the lines of one busy logger (a worker's client sessions: one
    line each, thousands a second under churn); see flush() and defer()."""
    root = logging.getLogger()
    stream = next(h for h in root.handlers if isinstance(h, logging.StreamHandler))
    busy = logging.getLogger(logger_name)
    busy.addHandler(BufferedHandler(stream))
    busy.propagate = False


def defer(logger: logging.Logger, level: int, message: str, fields: dict) -> None:
    """logger.log(level, message) with `fields`, made a record only when
    its batch is written where that is the same thing: the logger's one
    handler a BufferedHandler (buffer_output) and no filter, level or other
    handler the record would meet on its way."""
    if not logger.isEnabledFor(level):
        return
    handlers = logger.handlers
    if len(handlers) == 1 and not logger.propagate and not logger.filters:
        handler = handlers[0]
        if isinstance(handler, BufferedHandler) and not handler.filters and level >= handler.level:
            handler.defer(logger, level, message, fields)
            return
    logger.log(level, message, extra={"fields": fields})


def flush(logger_name: str) -> None:
    for handler in logging.getLogger(logger_name).handlers:
        handler.flush()


def _text(value: object) -> str:
    text = str(value)
    return json.dumps(text) if (" " in text or '"' in text or not text) else text
