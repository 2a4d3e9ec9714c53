"""Many AMQP clients driven at once from one process by a selector loop:
every client connects at the same moment and walks a script of
(expected reply, what to send then) with pre-encoded frames."""

from __future__ import annotations

import errno
import selectors
import socket
import time

from bench import frames
from bench.frames import FRAME_END, FRAME_HEAD
from bench.wire import ProtocolError

Script = list[tuple[bytes, bytes]]


def open_script(publish: bytes) -> Script:
    """After the protocol header: handshake, open channel 1, publish one message."""
    return [
        (frames.START, frames.START_OK),
        (frames.TUNE, frames.TUNE_OK + frames.CONNECTION_OPEN),
        (frames.OPEN_OK, frames.CHANNEL_OPEN),
        (frames.CHANNEL_OPEN_OK, publish),
    ]


CLOSE_SCRIPT: Script = [(frames.CONNECTION_CLOSE_OK, b"")]


class _Client:
    __slots__ = ("sock", "step", "buf", "started", "took")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.step = 0
        self.buf = bytearray()
        self.started = time.monotonic()
        self.took = 0.0


def _send(sock: socket.socket, data: bytes) -> None:
    """Small writes to a fresh socket; block for the rest in the unlikely case
    the kernel takes only part."""
    sent = sock.send(data)
    if sent < len(data):
        sock.setblocking(True)
        try:
            sock.sendall(data[sent:])
        finally:
            sock.setblocking(False)


def _methods(client: _Client) -> list[bytes]:
    """Complete method payloads in the client's buffer (heartbeats dropped)."""
    buf = client.buf
    out: list[bytes] = []
    while len(buf) >= 7:
        frame_type, size = FRAME_HEAD.unpack_from(buf)
        end = 7 + size
        if len(buf) <= end:
            break
        if buf[end] != FRAME_END:
            raise ProtocolError("bad frame end")
        if frame_type == 1:
            out.append(bytes(buf[7:end]))
        elif frame_type != 8:
            raise ProtocolError(f"unexpected frame type {frame_type}")
        del buf[: end + 1]
    return out


class Fleet:
    def __init__(self, addr: tuple[str, int], count: int) -> None:
        self.addr = addr
        self.count = count
        self.clients: list[_Client] = []

    def open(self, publish: bytes, deadline: float) -> list[float]:
        """Connect every client at once and run the open script; return each
        client's time from connect() to its last step."""
        selector = selectors.DefaultSelector()
        for _ in range(self.count):
            sock = socket.socket()
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client = _Client(sock)
            self.clients.append(client)
            code = sock.connect_ex(self.addr)
            if code not in (0, errno.EINPROGRESS):
                raise ProtocolError(f"connect: {errno.errorcode.get(code, code)}")
            selector.register(sock, selectors.EVENT_WRITE, client)
        self._drive(selector, open_script(publish), deadline, connecting=True)
        return [client.took for client in self.clients]

    def close(self, deadline: float) -> None:
        """Connection.Close every client, wait for all CloseOks, close sockets."""
        selector = selectors.DefaultSelector()
        try:
            for client in self.clients:
                client.step = 0
                selector.register(client.sock, selectors.EVENT_READ, client)
                _send(client.sock, frames.CONNECTION_CLOSE)
            self._drive(selector, CLOSE_SCRIPT, deadline, connecting=False)
        finally:
            self.abort()

    def abort(self) -> None:
        for client in self.clients:
            client.sock.close()

    def _drive(
        self, selector: selectors.BaseSelector, script: Script, deadline: float, connecting: bool
    ) -> None:
        pending = len(self.clients)
        try:
            while pending:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    raise ProtocolError(
                        f"{pending} of {len(self.clients)} clients not done in time"
                    )
                for key, _ in selector.select(min(timeout, 1.0)):
                    client: _Client = key.data
                    if connecting and client.step == 0 and key.events == selectors.EVENT_WRITE:
                        self._connected(selector, client)
                        continue
                    if self._read(client, script):
                        selector.unregister(client.sock)
                        pending -= 1
        finally:
            selector.close()

    def _connected(self, selector: selectors.BaseSelector, client: _Client) -> None:
        code = client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            raise ProtocolError(f"connect: {errno.errorcode.get(code, code)}")
        selector.modify(client.sock, selectors.EVENT_READ, client)
        _send(client.sock, frames.PROTOCOL_HEADER)

    def _read(self, client: _Client, script: Script) -> bool:
        """Advance the client through its script; True once it is done."""
        data = client.sock.recv(65536)
        if not data:
            raise ProtocolError(f"connection closed at step {client.step}")
        client.buf += data
        for payload in _methods(client):
            expected, reply = script[client.step]
            if payload[:4] != expected:
                raise ProtocolError(f"step {client.step}: got {frames.describe(payload)}")
            if reply:
                _send(client.sock, reply)
            client.step += 1
            if client.step == len(script):
                client.took = time.monotonic() - client.started
                return True
        return False
