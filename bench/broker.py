"""Setting up and checking the broker side with pika (never in a hot loop):
queues the scenarios own, their message counts, and their removal."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid

import pika
import pika.exceptions

from bench.procs import BenchError

BROKER = ("127.0.0.1", 5672)
BROKER_URL = f"amqp://{BROKER[0]}:{BROKER[1]}"
PREFIX = "amqplex-bench"
# A safety net: a queue left behind by a killed run expires by itself.
QUEUE_ARGUMENTS = {"x-expires": 15 * 60 * 1000}


class Admin:
    def __init__(self) -> None:
        self._connection: pika.BlockingConnection | None = None
        self._channel = None
        self.queues: list[str] = []

    def _ch(self):  # noqa: ANN202
        if self._channel is None or not self._channel.is_open:
            if self._connection is None or not self._connection.is_open:
                params = pika.ConnectionParameters(
                    *BROKER, heartbeat=0, blocked_connection_timeout=30
                )
                self._connection = pika.BlockingConnection(params)
            self._channel = self._connection.channel()
        return self._channel

    def queue(self, label: str) -> str:
        """Declare a fresh queue for this run."""
        name = f"{PREFIX}.{label}.{uuid.uuid4().hex[:8]}"
        self._ch().queue_declare(name, arguments=QUEUE_ARGUMENTS)
        self.queues.append(name)
        return name

    def count(self, name: str) -> int:
        return self._ch().queue_declare(name, passive=True).method.message_count

    def verify(self, expected: dict[str, int], timeout: float = 10.0) -> float:
        """Every queue holds exactly its expected message count (waiting up to
        `timeout` for messages still on their way); raises otherwise. Returns
        the monotonic time the counts were first seen right."""
        deadline = time.monotonic() + timeout
        while True:
            counts = {name: self.count(name) for name in expected}
            if counts == expected:
                return time.monotonic()
            if time.monotonic() > deadline:
                wrong = {
                    n: f"{counts[n]} != {want}" for n, want in expected.items() if counts[n] != want
                }
                raise BenchError(f"message counts wrong (got != expected): {wrong}")
            time.sleep(0.01)

    def delete(self, name: str) -> None:
        self._ch().queue_delete(name)
        self.queues.remove(name)

    def close(self) -> None:
        """Delete every queue this run declared, then disconnect."""
        try:
            for name in list(self.queues):
                self.delete(name)
        except pika.exceptions.AMQPError as error:
            print(f"warning: could not delete queues {self.queues}: {error!r}")
        finally:
            if self._connection is not None and self._connection.is_open:
                self._connection.close()


CONNECTION_MEMORY = (
    "connection_readers",
    "connection_writers",
    "connection_channels",
    "connection_other",
)


def connection_memory() -> int | None:
    """Bytes the broker accounts to connection and channel processes (its own
    memory breakdown: unlike the VM's RSS, not hidden by allocator caching);
    None if rabbitmq-diagnostics is not available."""
    tool = shutil.which("rabbitmq-diagnostics")
    if tool is None:
        return None
    command = [tool, "-q", "memory_breakdown", "--unit", "bytes", "--formatter", "json"]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True)
        breakdown = json.loads(out.stdout)
    except (subprocess.SubprocessError, ValueError):
        return None
    return sum(breakdown[key]["bytes"] for key in CONNECTION_MEMORY)
