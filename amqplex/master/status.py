"""GET / (health), GET /ready and GET /metrics on listen.port + 1, served
by the master from its own select loop: no thread, so forking stays safe.

Requests are tiny and answered at once; each connection gets one response
and is closed (HTTP/1.0 style), which is all a load balancer's health check
or a Prometheus scrape needs.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import ssl
import time
import typing

from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client.exposition import choose_encoder

from amqplex.protocol.constants import PROTOCOL_HEADER

log = logging.getLogger(__name__)

# A request must arrive whole within this time.
REQUEST_TIMEOUT = 2.0
MAX_REQUEST = 8192
# A worker's successful dial this recent still says the broker is reachable.
READY_WINDOW = 10.0
PROBE_TIMEOUT = 1.0
# Requests being read at once; past it the oldest goes, so that idle
# connections cannot pile up in the master (its loop, its descriptors).
MAX_OPEN_REQUESTS = 64


class Health(typing.Protocol):
    """What the status server asks of the master."""

    def accepting(self) -> tuple[bool, str]: ...

    def broker_address(self) -> tuple[str, int]: ...

    def broker_tls(self) -> ssl.SSLContext | None: ...


@dataclasses.dataclass(slots=True)
class _Request:
    sock: socket.socket
    started: float
    data: bytes = b""


class StatusServer:
    def __init__(self, address: str, port: int, health: Health) -> None:
        self.health = health
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((address, port))
        self.listener.listen(64)
        self.listener.setblocking(False)
        self._requests: dict[int, _Request] = {}

    def fds(self) -> list[int]:
        return [self.listener.fileno(), *self._requests]

    def close(self) -> None:
        for request in self._requests.values():
            request.sock.close()
        self._requests.clear()
        self.listener.close()

    def on_readable(self, fd: int) -> None:
        if fd == self.listener.fileno():
            self._accept()
        elif fd in self._requests:
            self._read(self._requests[fd])

    def expire(self) -> None:
        """Drop requests that did not arrive whole in time."""
        now = time.monotonic()
        for fd, request in list(self._requests.items()):
            if now - request.started > REQUEST_TIMEOUT:
                del self._requests[fd]
                request.sock.close()

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        sock.setblocking(False)
        if len(self._requests) >= MAX_OPEN_REQUESTS:
            oldest = next(iter(self._requests))  # dicts keep their order
            self._requests.pop(oldest).sock.close()
        self._requests[sock.fileno()] = _Request(sock, time.monotonic())

    def _read(self, request: _Request) -> None:
        try:
            chunk = request.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        request.data += chunk
        if chunk and b"\r\n\r\n" not in request.data and len(request.data) < MAX_REQUEST:
            return
        del self._requests[request.sock.fileno()]
        try:
            if chunk:
                self._respond(request)
        finally:
            request.sock.close()

    def _respond(self, request: _Request) -> None:
        head, _, _ = request.data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines[1:])
        }
        if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
            status, content_type, body = 405, "text/plain", b"only GET\n"
        else:
            path = parts[1].split("?", 1)[0]
            try:
                status, content_type, body = self._route(path, headers)
            except Exception:  # a metrics file half written, say: never the master
                log.exception("status request for %s failed", path)
                status, content_type, body = 500, "text/plain", b"internal error\n"
        body_out = b"" if parts and parts[0] == "HEAD" else body
        reason = {
            200: "OK",
            404: "Not Found",
            405: "Method Not Allowed",
            500: "Internal Server Error",
            503: "Service Unavailable",
        }
        response = (
            f"HTTP/1.1 {status} {reason[status]}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode() + body_out
        request.sock.setblocking(True)
        request.sock.settimeout(REQUEST_TIMEOUT)
        try:
            request.sock.sendall(response)
        except OSError as error:
            log.debug("status response not sent: %s", error)

    def _route(self, path: str, headers: dict[str, str]) -> tuple[int, str, bytes]:
        if path == "/":
            ok, reason = self.health.accepting()
            return (
                (200, "text/plain", b"OK\n") if ok else (503, "text/plain", f"{reason}\n".encode())
            )
        if path == "/ready":
            ok, reason = self.health.accepting()
            if ok:
                ok, reason = self._ready()
            return (200 if ok else 503), "text/plain", f"{reason}\n".encode()
        if path == "/metrics":
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            encoder, content_type = choose_encoder(headers.get("accept", ""))
            return 200, content_type, encoder(registry)
        return 404, "text/plain", b"not found: try /, /ready or /metrics\n"

    def _ready(self) -> tuple[bool, str]:
        """Ready while the broker is reachable: a worker holds a connection
        to it, or opened one in the last few seconds, or it answers a probe."""
        values = _gauge_values(
            "amqplex_upstream_connections",
            "amqplex_upstream_last_dial_success_timestamp_seconds",
            "amqplex_upstream_last_dial_failure_timestamp_seconds",
        )
        if values["amqplex_upstream_connections"] > 0:
            return True, "OK: upstream connected"
        success = values["amqplex_upstream_last_dial_success_timestamp_seconds"]
        failure = values["amqplex_upstream_last_dial_failure_timestamp_seconds"]
        if success > failure and time.time() - success < READY_WINDOW:
            return True, "OK: upstream dialled recently"
        return _probe(*self.health.broker_address(), self.health.broker_tls())


def _gauge_values(*names: str) -> dict[str, float]:
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    found = dict.fromkeys(names, 0.0)
    for family in registry.collect():
        for sample in family.samples:
            if sample.name in found:
                found[sample.name] += sample.value
    return found


def _probe(host: str, port: int, context: ssl.SSLContext | None) -> tuple[bool, str]:
    """Does the broker answer an AMQP protocol header with Connection.Start
    (over TLS, as the workers dial it, for an amqps:// upstream)?"""
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT) as plain:
            sock = context.wrap_socket(plain, server_hostname=host) if context else plain
            with sock:
                sock.sendall(PROTOCOL_HEADER)
                head = sock.recv(7)
    except OSError as error:
        return False, f"upstream unreachable: {host}:{port}: {error}"
    if head[:1] == b"\x01":
        return True, "OK: broker answered a probe"
    return False, f"upstream at {host}:{port} did not answer as an AMQP 0-9-1 broker"
