"""A hand-driven AMQP client over a plain socket, for sending what real
clients never would (bad frames, out-of-order content, foreign channels)
and for reading exactly what comes back."""

from __future__ import annotations

import select
import socket
import ssl
import struct
import time

from pamqp import commands, frame, header

from amqplex.protocol.auth import Credentials, plain_response
from amqplex.protocol.constants import FRAME_METHOD, PROTOCOL_HEADER
from amqplex.protocol.framing import FrameReader


class RawClient:
    def __init__(
        self,
        port: int,
        host: str = "127.0.0.1",
        timeout: float = 10,
        context: ssl.SSLContext | None = None,
    ) -> None:
        """Plain TCP, or TLS with `context` (verifying the name localhost)."""
        self.sock = socket.create_connection((host, port), timeout=timeout)
        if context is not None:
            self.sock = context.wrap_socket(self.sock, server_hostname="localhost")
        self.reader = FrameReader(1 << 24)
        self.frames: list = []
        self.tune: commands.Connection.Tune | None = None
        self.start: commands.Connection.Start | None = None

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- sending ------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def method(self, channel: int, method) -> None:
        self.send(frame.marshal(method, channel))

    def publish(
        self,
        channel: int,
        body: bytes,
        exchange: str = "",
        routing_key: str = "q",
        properties: commands.Basic.Properties | None = None,
    ) -> None:
        self.method(channel, commands.Basic.Publish(exchange=exchange, routing_key=routing_key))
        properties = properties or commands.Basic.Properties()
        self.send(frame.marshal(header.ContentHeader(0, len(body), properties), channel))
        if body:
            self.send(body_frame(channel, body))

    # -- reading ------------------------------------------------------------------

    def read_frame(self, timeout: float = 10):
        """(type, channel, decoded method or raw frame bytes); None on EOF."""
        deadline = time.monotonic() + timeout
        while not self.frames:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                raise TimeoutError("no frame in time") from None
            if not data:
                return None
            self.frames.extend(self.reader.feed(data))
        frame_type, channel, raw = self.frames.pop(0)
        if frame_type == FRAME_METHOD:
            return frame_type, channel, frame.unmarshal(raw)[2]
        return frame_type, channel, raw

    def read_method(self, timeout: float = 10, skip_heartbeats: bool = True):
        """(channel, method); None on EOF."""
        while True:
            got = self.read_frame(timeout)
            if got is None:
                return None
            frame_type, channel, value = got
            if frame_type == FRAME_METHOD:
                return channel, value
            if not skip_heartbeats:
                return channel, value

    def expect(self, method_class, timeout: float = 10):
        got = self.read_method(timeout)
        assert got is not None, f"connection closed while expecting {method_class.__name__}"
        channel, method = got
        assert isinstance(method, method_class), f"expected {method_class.__name__}, got {method!r}"
        return channel, method

    def expect_connection_close(self, timeout: float = 10) -> commands.Connection.Close:
        """Read until Connection.Close (answered with CloseOk) and return it."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.read_method(max(0.01, deadline - time.monotonic()))
            assert got is not None, "socket closed without Connection.Close"
            channel, method = got
            if isinstance(method, commands.Connection.Close):
                self.method(0, commands.Connection.CloseOk())
                return method

    def read_eof(self, timeout: float = 10) -> bool:
        """True if the peer closes the socket within `timeout` (frames are skipped)."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                if self.read_frame(remaining) is None:
                    return True
            except TimeoutError:
                return False
            except (ConnectionResetError, BrokenPipeError):
                return True
        return False

    # -- the handshake --------------------------------------------------------------

    def handshake(
        self,
        user: str = "guest",
        password: str = "guest",
        vhost: str = "/",
        mechanism: str = "PLAIN",
        response: bytes | str | None = None,
        frame_max: int = 0,
        heartbeat: int = 0,
        capabilities: dict | None = None,
        open_connection: bool = True,
    ):
        self.send(PROTOCOL_HEADER)
        _, self.start = self.expect(commands.Connection.Start)
        if response is None:
            response = plain_response(Credentials(user, password))
        self.method(
            0,
            commands.Connection.StartOk(
                client_properties={"product": "rawclient", "capabilities": capabilities or {}},
                mechanism=mechanism,
                response=response,
                locale="en_US",
            ),
        )
        got = self.read_method()
        if got is None or isinstance(got[1], commands.Connection.Close):
            return got  # refused at login, as the broker does after StartOk
        assert isinstance(got[1], commands.Connection.Tune), f"expected Tune, got {got[1]!r}"
        self.tune = got[1]
        self.method(
            0,
            commands.Connection.TuneOk(
                channel_max=self.tune.channel_max,
                frame_max=frame_max or self.tune.frame_max,
                heartbeat=heartbeat,
            ),
        )
        if not open_connection:
            return None
        self.method(0, commands.Connection.Open(virtual_host=vhost))
        return self.read_method()

    def open_channel(self, channel: int = 1) -> None:
        self.method(channel, commands.Channel.Open())
        self.expect(commands.Channel.OpenOk)


def body_frame(channel: int, body: bytes) -> bytes:
    return struct.pack(">BHI", 3, channel, len(body)) + body + b"\xce"


def message(channel: int, routing_key: str, body: bytes) -> bytes:
    """A whole publish to the default exchange: method, header, one body frame."""
    return (
        frame.marshal(commands.Basic.Publish(exchange="", routing_key=routing_key), channel)
        + frame.marshal(header.ContentHeader(0, len(body), commands.Basic.Properties()), channel)
        + body_frame(channel, body)
    )


def send_until_refused(sock: socket.socket, data: bytes, refused_for: float, timeout: float) -> int:
    """Send `data` without blocking until the peer has taken nothing for
    `refused_for` seconds (or all of it went); how many bytes went. The
    socket is left non-blocking."""
    sock.setblocking(False)
    sent, refused_since = 0, None
    deadline = time.monotonic() + timeout
    while sent < len(data) and time.monotonic() < deadline:
        try:
            sent += sock.send(data[sent : sent + 65536])
            refused_since = None
        except BlockingIOError:
            now = time.monotonic()
            refused_since = refused_since or now
            if now - refused_since >= refused_for:
                return sent
            select.select([], [sock], [], refused_for)
    return sent


def amqplain_response(user: str, password: str) -> bytes:
    """AMQPLAIN's field table without its length prefix, as php-amqplib sends it."""
    from pamqp import encode

    table = encode.field_table({"LOGIN": user, "PASSWORD": password})
    return table[4:]
