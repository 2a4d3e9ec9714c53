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
import typing

from amqplex import procid

TEXT_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"


class Parts(typing.NamedTuple):
    """What a line is made of (no exception): a record's, or a deferred
    line's, which never becomes one (BufferedHandler)."""

    created: float
    msecs: int
    levelname: str
    name: str
    message: str
    fields: dict | None

    @classmethod
    def of(cls, record: logging.LogRecord) -> Parts:
        return cls(
            record.created,
            int(record.msecs),
            record.levelname,
            record.name,
            record.getMessage(),
            getattr(record, "fields", None),
        )


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT, built directly: the generic Formatter path and a
    strftime per line cost more than the line, one per client session."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        line = self.line(Parts.of(record))
        # A traceback's lines follow, as Formatter.format puts them.
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line

    def line(self, parts: Parts) -> str:
        message = parts.message
        if not message.isprintable():
            # A client's words in a message (an exchange type it sent, say)
            # must not start a line of their own: escaped, as JSON would.
            message = json.dumps(message)[1:-1]
        line = (
            f"{self._asctime(parts.created, parts.msecs)} {procid.current()} "
            f"{parts.levelname} {parts.name}: {message}"
        )
        return line + " " + _pairs(parts.fields) if parts.fields else line

    def _asctime(self, created: float, msecs: int) -> str:
        """As Formatter.formatTime writes it, the date and time made once a second."""
        second = int(created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime(self.default_time_format, self.converter(second))
        return f"{self._stamp},{msecs:03d}"


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = self.entry(Parts.of(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)

    def line(self, parts: Parts) -> str:
        return json.dumps(self.entry(parts), default=str)

    def entry(self, parts: Parts) -> dict:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(parts.created))
            + f".{parts.msecs:03d}Z",
            "level": parts.levelname.lower(),
            "logger": parts.name,
            "pid": procid.current(),
            "message": parts.message,
        }
        entry.update(parts.fields or {})
        return entry


def _msecs(created: float) -> int:
    """The milliseconds of a line that has no record, from its time (as
    LogRecord.__init__ made a record's up to Python 3.12)."""
    return int((created - int(created)) * 1000)


class BufferedHandler(logging.handlers.MemoryHandler):
    """Holds INFO and DEBUG lines (one per client session: thousands a
    second under churn) and writes them in batches: at WARNING, when the
    buffer is full, or when flush() is called (workers do, every second).

    The busiest lines are never records: defer() keeps their parts, and
    flush() has the target's formatter write each from them (line()), which
    costs a churning worker less than making and formatting a record does.
    A worker's loop thread is the only caller."""

    def __init__(self, target: logging.Handler) -> None:
        super().__init__(capacity=512, flushLevel=logging.WARNING, target=target)

    def defer(self, logger: logging.Logger, level: int, message: str, fields: dict) -> None:
        # In self.buffer with the records, so that lines keep their order.
        created = time.time()
        level_name = logging.getLevelName(level)
        self.buffer.append(
            Parts(created, _msecs(created), level_name, logger.name, message, fields)
        )
        if len(self.buffer) >= self.capacity:
            self.flush()

    def flush(self) -> None:
        # One write for the batch, not a write per line.
        self.acquire()
        try:
            if self.buffer and self.target is not None:
                target = self.target
                # Deferred lines were the formatters' here (defer()); one set
                # since then without line() gets them as text.
                line = getattr(target.formatter, "line", _TEXT.line)
                lines = [
                    line(entry) if type(entry) is Parts else target.format(entry)
                    for entry in self.buffer
                ]
                try:
                    target.stream.write("\n".join(lines) + "\n")
                    target.stream.flush()
                except OSError:  # a closed or full stderr: as StreamHandler.emit does
                    first = self.buffer[0]
                    if type(first) is Parts:
                        first = logging.makeLogRecord({"msg": first.message})
                    self.handleError(first)
                self.buffer.clear()
        finally:
            self.release()


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
    """logger.log(level, message) with `fields`, never made a record but
    written from its parts with its batch where that writes the same line:
    the logger's one handler a BufferedHandler (buffer_output) whose target
    formats with one of the formatters here, and no filter, level or other
    handler the record would meet on its way."""
    if not logger.isEnabledFor(level):
        return
    handlers = logger.handlers
    if len(handlers) == 1 and not logger.propagate and not logger.filters:
        handler = handlers[0]
        if (
            isinstance(handler, BufferedHandler)
            and not handler.filters
            and level >= handler.level
            and isinstance(
                getattr(handler.target, "formatter", None), TextFormatter | JSONFormatter
            )
        ):
            handler.defer(logger, level, message, fields)
            return
    logger.log(level, message, extra={"fields": fields})


def flush(logger_name: str) -> None:
    for handler in logging.getLogger(logger_name).handlers:
        handler.flush()


_TEXT = TextFormatter()


def _pairs(fields: dict) -> str:
    return " ".join([f"{key}={_text(value)}" for key, value in fields.items()])


def _text(value: object) -> str:
    """A value as it goes after "key=": bare, or quoted as JSON when empty or
    holding a space, a quote or anything unprintable (a newline in a client's
    user name must not start a line of its own). A session line has eight,
    so the usual cases skip json.dumps: numbers, and printable ASCII that
    quotes as is."""
    kind = type(value)
    if kind is int or kind is float:
        return str(value)
    text = value if kind is str else str(value)
    if text and " " not in text and '"' not in text and text.isprintable():
        return text
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'
    return json.dumps(text)
