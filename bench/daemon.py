"""amqplexd started by the harness: the pre-fork master and its workers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import procinfo
from bench.procs import BenchError

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0


def free_ports(count: int) -> list[int]:
    """`count` different ports free now: each bound while the next is
    picked (one at a time, the kernel may hand out the same one again)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


class Daemon:
    def __init__(self, upstream: str, workers: int, env: dict[str, str] | None = None) -> None:
        self.upstream = upstream
        self.workers = workers
        self.env = env or {}
        self.port, self.metrics_port = free_ports(2)
        self.process: subprocess.Popen | None = None
        self.log_path = ""
        # Every worker seen, with its start time, to kill leftovers safely.
        self._seen: dict[int, int | None] = {}

    @property
    def addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def start(self) -> Daemon:
        log_fd, self.log_path = tempfile.mkstemp(prefix="amqplexd-bench-", suffix=".log")
        command = [sys.executable, "-m", "amqplex", self.upstream, "-l", "127.0.0.1"]
        command += ["-p", str(self.port), "-w", str(self.workers)]
        env = {
            **os.environ,
            "AMQP_METRICS_PORT": str(self.metrics_port),
            "AMQP_DRAIN_TIMEOUT": "2",
            **self.env,
        }
        self.process = subprocess.Popen(
            command, stdout=log_fd, stderr=subprocess.STDOUT, env=env, cwd=ROOT
        )
        os.close(log_fd)
        self._wait_ready(time.monotonic() + START_TIMEOUT)
        return self

    def _wait_ready(self, deadline: float) -> None:
        """Listening, and every worker forked."""
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(
                    f"amqplexd exited with {self.process.returncode}: {self.log_tail()}"
                )
            if len(self.worker_pids()) >= self.workers and _listening(self.port):
                return
            time.sleep(0.05)
        raise BenchError(f"amqplexd not ready in {START_TIMEOUT:.0f} s: {self.log_tail()}")

    def worker_pids(self) -> list[int]:
        pids = procinfo.children(self.process.pid)
        for pid in pids:
            self._seen.setdefault(pid, procinfo.start_time(pid))
        return pids

    def pids(self) -> list[int]:
        return [self.process.pid, *self.worker_pids()]

    def rss(self) -> int:
        """Resident bytes summed over the master and its workers."""
        return procinfo.total_rss(self.pids())

    def worker_rss(self) -> dict[int, int]:
        return {pid: procinfo.rss(pid) for pid in self.worker_pids()}

    def log_text(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self) -> None:
        """TERM the master (it drains and stops its workers); KILL what is left."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pid, started in self._seen.items():
            # Only our own worker if it outlived the master, never a reused pid.
            if started is not None and procinfo.start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self.log_path:
            os.unlink(self.log_path)

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
