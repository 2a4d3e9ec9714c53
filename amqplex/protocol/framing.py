"""Splitting a byte stream into frames, and the byte-level edits the data
path makes on frames it does not decode.

Content header and body frames are never decoded on the way through: the
splitter peeks at the 7-byte frame header, and forwarding only rewrites the
two channel-id bytes.
"""

import struct
import typing

from amqplex.protocol.constants import (
    FRAME_BODY,
    FRAME_END,
    FRAME_HEADER,
    FRAME_HEADER_SIZE,
    FRAME_HEARTBEAT,
    FRAME_METHOD,
    FRAME_OVERHEAD,
    ReplyCode,
)
from amqplex.protocol.errors import ConnectionException

_FRAME_HEADER = struct.Struct(">BHI")
_CHANNEL = struct.Struct(">H")
_UINT32 = struct.Struct(">I")
_FRAME_TYPES = frozenset((FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT))

# Body frames bigger than this travel as memoryviews (no copy of the payload).
LARGE_BODY = 2048

Frame = tuple[int, int, bytes]
"""(frame type, channel id, the whole frame: header, payload and end octet)."""


class FrameSplitter:
    """Cuts frames out of the bytes a peer sends, checking each frame's type,
    size and end octet as RabbitMQ does (501 FRAME_ERROR otherwise).

    Large body frames come out as memoryviews of the bytes read, so their
    payload is never copied on its way through the proxy (see retarget)."""

    __slots__ = ("frame_max", "slack", "_pending", "_pending_size", "_wanted")

    def __init__(self, frame_max: int, slack: int = 0) -> None:
        self.frame_max = frame_max
        # Bytes a frame may exceed frame_max by. RabbitMQ lets clients off by
        # up to 8 (its FRAME_SIZE_FUDGE: a payload may be frame_max long), so
        # the proxy's client side does too.
        self.slack = slack
        # Reads holding an incomplete frame, joined once it is all here.
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._wanted = 0

    def split(self, data: bytes) -> list[Frame]:
        """Return the complete frames in the stream so far, keeping the rest."""
        if not self._pending:
            return self._cut(data)
        self._pending_size += len(data)
        if self._pending_size < self._wanted:
            self._pending.append(data)
            return []
        if self._wanted == FRAME_OVERHEAD:  # a header was cut: rare, and small
            self._pending.append(data)
            joined = b"".join(self._pending)
            self._pending = []
            return self._cut(joined)
        # Join just the frame that was waiting; the rest of this read is cut
        # where it lies.
        taken = len(data) - (self._pending_size - self._wanted)
        self._pending.append(memoryview(data)[:taken])
        whole = b"".join(self._pending)
        self._pending = []
        frames = self._cut(whole)
        if taken < len(data):
            frames.extend(self._cut(data[taken:] if taken < 4096 else memoryview(data)[taken:]))
        return frames

    def _cut(self, data: bytes | memoryview) -> list[Frame]:
        frames: list[Frame] = []
        pos = 0
        size_left = len(data)
        is_view = type(data) is memoryview
        view = data if is_view else None
        unpack_header = _FRAME_HEADER.unpack_from
        while size_left >= FRAME_OVERHEAD:
            frame_type, channel, size = unpack_header(data, pos)
            if frame_type not in _FRAME_TYPES:
                raise ConnectionException(
                    ReplyCode.FRAME_ERROR, f"type {frame_type}, all octets = <<>>"
                )
            if size + FRAME_OVERHEAD > self.frame_max + self.slack:
                raise ConnectionException(
                    ReplyCode.FRAME_ERROR,
                    f"type {frame_type}, all octets = <<>>: "
                    f"{{frame_too_large,{size},{self.frame_max - FRAME_OVERHEAD}}}",
                )
            end = pos + FRAME_HEADER_SIZE + size
            if size_left < size + FRAME_OVERHEAD:
                break
            if data[end] != FRAME_END:
                raise ConnectionException(
                    ReplyCode.FRAME_ERROR,
                    f"type {frame_type}, channel {channel}: bad frame end octet {data[end]}",
                )
            if frame_type == FRAME_BODY and size > LARGE_BODY:
                if view is None:
                    view = memoryview(data)
                frames.append((frame_type, channel, view[pos : end + 1]))
            elif is_view:
                frames.append((frame_type, channel, bytes(data[pos : end + 1])))
            else:
                frames.append((frame_type, channel, data[pos : end + 1]))
            pos = end + 1
            size_left -= size + FRAME_OVERHEAD
        if size_left:
            rest = data[pos:] if pos else data
            self._pending = [rest]
            self._pending_size = size_left
            # With a whole header read, the loop above has checked it: wait for
            # the frame. Otherwise wait for enough to check the header.
            self._wanted = (
                FRAME_OVERHEAD + _FRAME_HEADER.unpack_from(rest)[2]
                if size_left >= FRAME_OVERHEAD
                else FRAME_OVERHEAD
            )
        return frames

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held back."""
        return self._pending_size if self._pending else 0


def channel_bytes(channel: int) -> bytes:
    return _CHANNEL.pack(channel)


def retarget(frames: typing.Iterable[bytes | memoryview], channel: bytes) -> list:
    """Frames moved to another channel, as pieces for one writelines call: a
    small frame is copied with its channel bytes replaced; a large body keeps
    its payload where it was read and gets a new 7-byte header of its own."""
    pieces = []
    for frame in frames:
        if type(frame) is memoryview:
            pieces.append(body_header(frame, channel))
            pieces.append(frame[FRAME_HEADER_SIZE:])
        else:
            pieces.append(frame[:1] + channel + frame[3:])
    return pieces


def body_header(frame: memoryview, channel: bytes) -> bytes:
    return b"\x03" + channel + bytes(frame[3:FRAME_HEADER_SIZE])


def rewrite_channel(frame: bytes, channel: bytes) -> bytes:
    """The same frame on another channel (`channel` from channel_bytes)."""
    return frame[:1] + channel + frame[3:]


def method_index(frame: bytes) -> int:
    """The (class_id << 16 | method_id) of a method frame: pamqp's `index`."""
    return _UINT32.unpack_from(frame, FRAME_HEADER_SIZE)[0]


def split_body(frame: bytes, channel: bytes, frame_max: int) -> list[bytes]:
    """Re-cut one body frame into frames no larger than the peer's frame_max."""
    payload = memoryview(frame)[FRAME_HEADER_SIZE:-1]
    step = frame_max - FRAME_OVERHEAD
    end = bytes((FRAME_END,))
    frames = []
    for start in range(0, len(payload), step):
        chunk = payload[start : start + step]
        frames.append(
            b"".join(
                (
                    bytes((FRAME_BODY,)),
                    channel,
                    _UINT32.pack(len(chunk)),
                    chunk,
                    end,
                )
            )
        )
    return frames
