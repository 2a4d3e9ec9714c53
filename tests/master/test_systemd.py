"""systemd: the unit file (checked by systemd-analyze and by its settings) and
the notify protocol, spoken by the real daemon to a socket the test owns:
READY=1 once it accepts connections, RELOADING=1 / READY=1 around a HUP,
STOPPING=1 on TERM, from the master's own pid (NotifyAccess=main)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from pamqp import commands

from amqplex.config import Config
from amqplex.config.load import DEFAULT_PATHS
from amqplex.master import arbiter
from amqplex.master.limits import LOW_NOFILE
from amqplex.protocol.constants import PROTOCOL_HEADER
from tests.support.rawclient import RawClient

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "amqplexd.service"
INSTALLED = "/usr/local/bin/amqplexd"


def unit_settings() -> dict[str, dict[str, list[str]]]:
    """[Section] -> key -> every value given (a key may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def service(key: str) -> str:
    values = unit_settings()["Service"].get(key)
    assert values, f"[Service] has no {key}="
    return values[-1]  # as systemd reads it: the last assignment wins


def seconds(timespan: str) -> float:
    """A systemd time span ("45", "45s", "1min 30s") in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", timespan):
        total += float(number) * units[unit]
    return total


# -- the unit file ------------------------------------------------------------


def test_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    amqplexd = Path(sys.executable).parent / "amqplexd"
    assert amqplexd.exists(), amqplexd
    text = UNIT.read_text()
    assert INSTALLED in service("ExecStart") and INSTALLED in service("ExecStartPre")
    unit = tmp_path / "amqplexd.service"
    unit.write_text(text.replace(INSTALLED, str(amqplexd)))
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Warnings (unknown keys, bad values) do not change the exit code: none allowed.
    assert "amqplexd.service" not in result.stdout + result.stderr


def test_unit_is_type_notify():
    assert service("Type") == "notify"
    # READY=1 comes from the master, which is the main process.
    assert unit_settings()["Service"].get("NotifyAccess", ["main"])[-1] in ("main", "all")


def test_unit_reload_checks_the_configuration_then_sends_hup_to_the_master():
    check, hup = unit_settings()["Service"]["ExecReload"]
    assert check.split()[1:] == ["--check", "-c", DEFAULT_PATHS[1]]
    assert re.fullmatch(r"/bin/kill -(s )?HUP \$MAINPID", hup), hup


def test_unit_checks_the_configuration_it_starts_with():
    config = DEFAULT_PATHS[1]
    assert service("ExecStart").split()[1:] == ["-c", config]
    assert service("ExecStartPre").split()[1:] == ["--check", "-c", config]


def test_unit_stop_timeout_outlasts_the_drain():
    # systemd SIGKILLs at TimeoutStopSec; the master itself may take the drain,
    # the two close handshakes (clients', upstreams') and its own grace before
    # it kills a stuck worker.
    defaults = Config()
    closes = 2 * defaults.client.close_timeout
    master_stop = defaults.drain_timeout + closes + arbiter.KILL_GRACE
    assert service("KillSignal") == "SIGTERM"
    assert seconds(service("TimeoutStopSec")) > master_stop


def test_unit_raises_the_open_files_limit():
    limit = service("LimitNOFILE")
    soft = limit.split(":")[0]
    assert soft == "infinity" or int(soft) >= LOW_NOFILE


def test_unit_is_hardened():
    assert service("NoNewPrivileges") == "yes"
    assert service("ProtectSystem") == "strict"
    assert service("ProtectHome") in ("yes", "read-only", "tmpfs")
    assert service("PrivateTmp") == "yes"


def test_unit_runs_as_an_unprivileged_user():
    settings = unit_settings()["Service"]
    dynamic = settings.get("DynamicUser", ["no"])[-1] == "yes"
    user = settings.get("User", ["root"])[-1]
    assert dynamic or user not in ("root", "0"), (dynamic, user)


# -- the notify protocol ------------------------------------------------------


class NotifySocket:
    """What systemd would listen on: a datagram socket that also learns each
    sender's pid (SCM_CREDENTIALS), as NotifyAccess=main needs."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)

    def close(self) -> None:
        self.sock.close()

    def receive(self, timeout: float = 15) -> tuple[int, dict[str, str]]:
        """(sender pid, fields) of the next message."""
        self.sock.settimeout(timeout)
        data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = -1
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("iII", payload[:12])[0]
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
        return pid, fields

    def pending(self) -> list[dict[str, str]]:
        """Messages already waiting, without blocking."""
        found = []
        while True:
            try:
                found.append(self.receive(timeout=0.2)[1])
            except TimeoutError:
                return found


@pytest.fixture
def notify_socket(tmp_path):
    path = str(tmp_path / "notify")
    listening = NotifySocket(path)
    yield path, listening
    listening.close()


def serves_amqp(port: int) -> bool:
    """A worker answers the protocol header with Connection.Start."""
    with RawClient(port, timeout=5) as client:
        client.send(PROTOCOL_HEADER)
        _, start = client.expect(commands.Connection.Start)
        return start.version_major == 0 and start.version_minor == 9


def listening_ports(pid: int) -> set[int]:
    """TCP ports process `pid` holds a listening socket on (from /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def start_with_notify(fresh_amqplexd, notify_address: str, listening, *args):
    """Start the daemon in a thread while the test waits for READY=1; the
    moment it arrives, the master's port must already take a connection."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        starting = pool.submit(fresh_amqplexd, *args, env={"NOTIFY_SOCKET": notify_address})
        try:
            sender, ready = listening.receive(timeout=20)
            ports = listening_ports(int(ready.get("MAINPID", sender)))
            for port in ports:
                with socket.create_connection(("127.0.0.1", port), timeout=2):
                    pass  # accepted on the first try, no retry
        finally:
            daemon = starting.result(timeout=30)
    assert daemon.port in ports
    return daemon, sender, ready


def test_ready_once_listening_with_the_masters_pid(fresh_amqplexd, notify_socket):
    address, listening = notify_socket
    daemon, sender, ready = start_with_notify(fresh_amqplexd, address, listening)
    assert ready.get("READY") == "1", ready
    assert ready.get("MAINPID") == str(daemon.process.pid)
    assert sender == daemon.process.pid
    assert serves_amqp(daemon.port)
    assert listening.pending() == []  # nothing else, and nothing from a worker


def test_reloading_then_ready_around_a_hup(fresh_amqplexd, notify_socket):
    address, listening = notify_socket
    daemon, _, ready = start_with_notify(fresh_amqplexd, address, listening)
    assert ready.get("READY") == "1"
    pid = daemon.process.pid
    for _ in range(2):
        before = time.monotonic_ns() // 1000
        os.kill(pid, signal.SIGHUP)
        sender, reloading = listening.receive()
        after = time.monotonic_ns() // 1000
        assert sender == pid
        assert reloading.get("RELOADING") == "1", reloading
        # systemd >= 253 matches a reload by its CLOCK_MONOTONIC time stamp.
        assert before <= int(reloading.get("MONOTONIC_USEC", -1)) <= after, reloading
        sender, ready = listening.receive()
        assert sender == pid
        assert ready.get("READY") == "1", ready
        assert serves_amqp(daemon.port)
    assert daemon.process.poll() is None


def test_ready_follows_reloading_when_the_new_configuration_is_refused(
    fresh_amqplexd, notify_socket, tmp_path
):
    # Without READY=1 systemd would wait for the reload until its timeout.
    address, listening = notify_socket
    config = tmp_path / "amqplex.yaml"
    config.write_text("pool:\n  max_channels: 100\n")
    daemon, _, _ = start_with_notify(fresh_amqplexd, address, listening, "-c", str(config))
    config.write_text("pool:\n  max_channels: 0\n")
    os.kill(daemon.process.pid, signal.SIGHUP)
    assert listening.receive()[1].get("RELOADING") == "1"
    assert listening.receive()[1].get("READY") == "1"
    assert "pool.max_channels" in daemon.log_text()
    assert serves_amqp(daemon.port)


def test_stopping_on_term(fresh_amqplexd, notify_socket):
    address, listening = notify_socket
    daemon, _, _ = start_with_notify(fresh_amqplexd, address, listening)
    daemon.process.send_signal(signal.SIGTERM)
    sender, stopping = listening.receive()
    assert stopping.get("STOPPING") == "1", stopping
    assert sender == daemon.process.pid
    assert daemon.process.wait(20) == 0


def test_abstract_namespace_notify_socket(fresh_amqplexd):
    name = f"amqplex-test-{uuid.uuid4().hex}"
    listening = NotifySocket("\0" + name)
    try:
        daemon, sender, ready = start_with_notify(fresh_amqplexd, "@" + name, listening)
        assert ready.get("READY") == "1", ready
        assert sender == daemon.process.pid
        daemon.process.send_signal(signal.SIGTERM)
        assert listening.receive()[1].get("STOPPING") == "1"
        assert daemon.process.wait(20) == 0
    finally:
        listening.close()
