"""A canned-reply stub: the churn reference for what answering a cycle
costs on this machine when nothing else is done.

It answers the six steps of a churn cycle (protocol header, StartOk, Open,
Channel.Open, Channel.Close, Connection.Close) with pre-encoded replies as
soon as each step's last frame is in, and closes the socket after the last:
no credentials, no channel table, no broker, no logging. A proxy's churn
rate cannot beat the stub's measured in the same run, so the stub's rate
over the broker's is the ceiling any churn ratio has here.
"""

from __future__ import annotations

import asyncio

from pamqp import commands, frame

from bench import frames
from bench.procs import ChildServer, serve_loopback

# (the method id that ends a step, the reply to it, on which channel); the
# protocol header is step 0.
_STEPS = (
    (
        b"",
        commands.Connection.Start(server_properties={}, mechanisms="PLAIN", locales="en_US"),
        0,
    ),
    (
        frames.method_id(10, 11),  # StartOk
        commands.Connection.Tune(channel_max=16, frame_max=frames.FRAME_MAX, heartbeat=0),
        0,
    ),
    (frames.method_id(10, 40), commands.Connection.OpenOk(), 0),  # Open
    (frames.method_id(20, 10), commands.Channel.OpenOk(), frames.CHANNEL),  # Channel.Open
    (frames.CHANNEL_CLOSE_ID, commands.Channel.CloseOk(), frames.CHANNEL),
    (frames.CONNECTION_CLOSE_ID, commands.Connection.CloseOk(), 0),
)
_TRIGGERS = [trigger for trigger, _, _ in _STEPS]
_REPLIES = [frame.marshal(reply, channel) for _, reply, channel in _STEPS]


class _Session(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.step = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        pos = 0
        if self.step == 0:
            if len(buf) < len(frames.PROTOCOL_HEADER):
                self.buf = buf
                return
            pos = len(frames.PROTOCOL_HEADER)
            self._answer()
        while len(buf) - pos >= 8:
            frame_type, size = frames.FRAME_HEAD.unpack_from(buf, pos)
            end = pos + 8 + size
            if end > len(buf):
                break
            if frame_type == 1 and buf[pos + 7 : pos + 11] == _TRIGGERS[self.step]:
                self._answer()
            pos = end
        self.buf = buf[pos:]

    def _answer(self) -> None:
        self.transport.write(_REPLIES[self.step])
        self.step += 1
        if self.step == len(_STEPS):
            self.transport.close()


def _serve(report) -> None:  # noqa: ANN001
    serve_loopback(lambda loop: _Session, report)


class Stub(ChildServer):
    name = "stub"

    def __init__(self) -> None:
        super().__init__(_serve)
