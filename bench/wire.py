"""A blocking AMQP client over a raw socket that only sends pre-encoded
frames and peeks at frame headers: cheap enough that a handful of these
processes never limit what they measure."""

from __future__ import annotations

import socket
import struct

from bench import frames
from bench.frames import FRAME_END, FRAME_HEAD

# One receive buffer per process (a generator process runs one Wire at a
# time): sock.recv(n) would malloc n bytes per call, and at churn rates glibc
# maps, faults in and unmaps them every time, which cost the generators
# two fifths of their CPU.
_RECV_VIEW = memoryview(bytearray(1 << 16))
_CONSUME_BUFFER = 4 << 20  # > frame_max: a whole frame always fits


class ProtocolError(Exception):
    """The peer answered something a well-behaved run never sees."""


class Wire:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    @classmethod
    def connect(cls, addr: tuple[str, int], timeout: float) -> Wire:
        # A blocking socket bounded by the kernel (SO_SNDTIMEO bounds connect
        # too): a Python timeout would add a poll() before every call.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        seconds = int(timeout)
        bound = struct.pack("ll", seconds, int((timeout - seconds) * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, bound)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, bound)
        # As pika and php-amqplib do: small frames go out at once.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.connect(addr)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close_socket(self) -> None:
        self.sock.close()

    # -- reading ------------------------------------------------------------------

    def _frame(self) -> tuple[int, bytes]:
        """The next whole frame: (type, payload)."""
        buf = self.buf
        while True:
            if len(buf) >= 7:
                frame_type, size = FRAME_HEAD.unpack_from(buf)
                end = 7 + size
                if len(buf) > end:
                    if buf[end] != FRAME_END:
                        raise ProtocolError("bad frame end")
                    payload = bytes(buf[7:end])
                    del buf[: end + 1]
                    return frame_type, payload
            received = self.sock.recv_into(_RECV_VIEW)
            if not received:
                raise ProtocolError("connection closed by peer")
            buf += _RECV_VIEW[:received]

    def expect(self, wanted: bytes) -> bytes:
        """Read up to the next method frame, which must be `wanted`; heartbeats
        are skipped. Returns its payload."""
        while True:
            frame_type, payload = self._frame()
            if frame_type == 8:
                continue
            if frame_type != 1:
                raise ProtocolError(f"unexpected frame type {frame_type}")
            if payload[:4] != wanted:
                raise ProtocolError(f"expected {wanted.hex()}, got {frames.describe(payload)}")
            return payload

    def count_messages(self, count: int) -> None:
        """Read a no-ack consumer's ConsumeOk and then `count` whole messages
        (a message counts once its last body byte is in). The kernel writes
        straight into one buffer (recv_into) and frames are walked by their
        headers only, so each byte is copied once."""
        buf = bytearray(_CONSUME_BUFFER)
        view = memoryview(buf)
        filled = len(self.buf)
        buf[:filled] = self.buf
        pos = done = remaining = 0
        consuming = False
        head = FRAME_HEAD.unpack_from
        while done < count:
            if filled == len(buf):  # keep the incomplete frame, reuse the space
                buf[: filled - pos] = buf[pos:filled]
                filled -= pos
                pos = 0
            received = self.sock.recv_into(view[filled:])
            if not received:
                raise ProtocolError(f"connection closed after {done} of {count} messages")
            filled += received
            while pos + 7 <= filled:
                frame_type, size = head(buf, pos)
                frame_end = pos + 7 + size
                if frame_end >= filled:
                    break
                if buf[frame_end] != FRAME_END:
                    raise ProtocolError("bad frame end")
                if frame_type == 3:
                    remaining -= size
                    if remaining == 0:
                        done += 1
                elif frame_type == 2:
                    remaining = frames.body_size(buf, pos + 7)
                elif frame_type == 1:
                    mid = buf[pos + 7 : pos + 11]
                    if mid == frames.CONSUME_OK:
                        consuming = True
                    elif mid != frames.DELIVER or not consuming:
                        raise ProtocolError(f"while consuming: {frames.describe(buf[pos + 7 :])}")
                pos = frame_end + 1
            if pos == filled:
                pos = filled = 0
        view.release()
        self.buf = bytearray(buf[pos:filled])

    # -- conversations ------------------------------------------------------------

    def handshake(self) -> None:
        """Header to Connection.OpenOk, one round trip per step as clients do
        (TuneOk and Open go together, as pika sends them)."""
        self.send(frames.PROTOCOL_HEADER)
        self.expect(frames.START)
        self.send(frames.START_OK)
        tune = self.expect(frames.TUNE)
        offered = frames.tune_frame_max(tune)
        if offered and offered < frames.FRAME_MAX:
            raise ProtocolError(f"server offers frame_max {offered} < {frames.FRAME_MAX}")
        self.send(frames.TUNE_OK + frames.CONNECTION_OPEN)
        self.expect(frames.OPEN_OK)

    def open_channel(self) -> None:
        self.send(frames.CHANNEL_OPEN)
        self.expect(frames.CHANNEL_OPEN_OK)

    def close(self) -> None:
        """Channel.Close, then Connection.Close, waiting for each CloseOk like
        a polite client; then the socket."""
        try:
            self.send(frames.CHANNEL_CLOSE)
            self.expect(frames.CHANNEL_CLOSE_OK)
            self.send(frames.CONNECTION_CLOSE)
            self.expect(frames.CONNECTION_CLOSE_OK)
        finally:
            self.sock.close()


def open_wire(addr: tuple[str, int], timeout: float) -> Wire:
    """A connected, handshaken client with channel 1 open."""
    wire = Wire.connect(addr, timeout)
    try:
        wire.handshake()
        wire.open_channel()
    except BaseException:
        wire.close_socket()
        raise
    return wire
