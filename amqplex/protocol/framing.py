"""Reading a byte stream as frames, and the byte-level edits the data path
makes on frames it does not decode.

Content header and body frames are never decoded on the way through: the
reader peeks at the 7-byte frame header, and forwarding only rewrites the
two channel-id bytes. The walks over a read's frames (cut, cut_routed) are
written here in Python, the reference, and in C (_walk.c), which serves
where it was built.
"""

import ctypes
import struct
import sys
import typing

from pamqp import commands

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
# A method frame's payload starts with its class and method id.
_METHOD_ID_SIZE = 4
# The methods that carry a message to a client.
DELIVERIES = frozenset((commands.Basic.Deliver.index, commands.Basic.GetOk.index))

# Body frames bigger than this travel as memoryviews (no copy of the payload).
LARGE_BODY = 2048

Frame = tuple[int, int, bytes]
"""(frame type, channel id, the whole frame: header, payload and end octet)."""


def cut(
    buf: bytes | bytearray | memoryview, pos: int, end: int, frame_max: int, slack: int
) -> tuple[list[Frame], int]:
    """The complete frames in buf[pos:end], checked as RabbitMQ checks them
    (501 FRAME_ERROR), and where the first incomplete one starts. Small
    frames are copied out; large bodies are memoryviews of `buf`."""
    frames: list[Frame] = []
    unpack_header = _FRAME_HEADER.unpack_from
    limit = frame_max + slack
    # A slice of bytes is a copy already; of anything else, bytes() makes one.
    is_bytes = type(buf) is bytes
    while end - pos >= FRAME_OVERHEAD:
        frame_type, channel, size = unpack_header(buf, pos)
        if frame_type not in _FRAME_TYPES or size + FRAME_OVERHEAD > limit:
            raise _bad_header(frame_type, size, frame_max)
        last = pos + FRAME_HEADER_SIZE + size
        if last >= end:
            break
        if buf[last] != FRAME_END:
            raise _bad_end(frame_type, channel, buf[last])
        if size < _METHOD_ID_SIZE and frame_type == FRAME_METHOD:
            raise _no_method_id(buf, pos, size)
        if frame_type == FRAME_BODY and size > LARGE_BODY:
            frames.append((frame_type, channel, memoryview(buf)[pos : last + 1]))
        else:
            raw = buf[pos : last + 1]
            frames.append((frame_type, channel, raw if is_bytes else bytes(raw)))
        pos = last + 1
    return frames, pos


ROUTED = 0
"""The frame type cut_routed gives a run of frames already moved to their
client's channel id (0 is no AMQP frame type)."""

Route = tuple[int, int, typing.Any]
"""Where a channel's frames go: (the high and low octet of the channel id
they get, whom to)."""


def cut_routed(
    buf: bytearray,
    pos: int,
    end: int,
    frame_max: int,
    slack: int,
    routes: dict[int, Route],
    watched: frozenset[int],
) -> tuple[list, int, int, int]:
    """cut() for a broker's stream, most of which only needs its channel ids
    changed: a frame on a channel in `routes` gets its new id written in
    place, and consecutive ones on that channel leave as one piece,
    (ROUTED, whom to, bytes), where the rest of the proxy never sees them
    frame by frame. The methods in `watched`, which the proxy acts on, and
    frames on other channels come out as cut() gives them, in stream order.
    Also returns where the first incomplete frame starts, how many frames
    were routed and how many of them were deliveries."""
    items: list = []
    unpack_header = _FRAME_HEADER.unpack_from
    unpack_index = _UINT32.unpack_from
    limit = frame_max + slack
    view = memoryview(buf)
    run_channel = -1  # the routed channel of the frames since run_start
    run_start = pos
    high = low = 0
    target = None
    routed = deliveries = 0
    while end - pos >= FRAME_OVERHEAD:
        # cut()'s checks, repeated inline: a call a frame would cost more.
        frame_type, channel, size = unpack_header(buf, pos)
        if frame_type not in _FRAME_TYPES or size + FRAME_OVERHEAD > limit:
            raise _bad_header(frame_type, size, frame_max)
        last = pos + FRAME_HEADER_SIZE + size
        if last >= end:
            break
        if buf[last] != FRAME_END:
            raise _bad_end(frame_type, channel, buf[last])
        if size < _METHOD_ID_SIZE and frame_type == FRAME_METHOD:
            raise _no_method_id(buf, pos, size)
        if channel != run_channel:
            if run_start < pos:
                items.append((ROUTED, target, view[run_start:pos].tobytes()))
            run_start = pos
            route = routes.get(channel)
            if route is None:
                run_channel = -1
            else:
                run_channel = channel
                high, low, target = route
        if run_channel < 0 or (
            frame_type == FRAME_METHOD
            and (index := unpack_index(buf, pos + FRAME_HEADER_SIZE)[0]) in watched
        ):
            # Not routed: as cut() gives it, after the run before it.
            if run_start < pos:
                items.append((ROUTED, target, view[run_start:pos].tobytes()))
            if frame_type == FRAME_BODY and size > LARGE_BODY:
                items.append((frame_type, channel, view[pos : last + 1]))
            else:
                items.append((frame_type, channel, view[pos : last + 1].tobytes()))
            pos = run_start = last + 1
            continue
        buf[pos + 1] = high  # two octet stores cost a quarter of a slice store
        buf[pos + 2] = low
        routed += 1
        if frame_type == FRAME_METHOD:
            if index in DELIVERIES:
                deliveries += 1
        elif frame_type == FRAME_BODY and size > LARGE_BODY:
            # Its payload is not copied: the piece is a view of the buffer.
            if run_start < pos:
                items.append((ROUTED, target, view[run_start:pos].tobytes()))
            items.append((ROUTED, target, view[pos : last + 1]))
            run_start = last + 1
        pos = last + 1
    if run_start < pos and run_channel >= 0:
        items.append((ROUTED, target, view[run_start:pos].tobytes()))
    return items, pos, routed, deliveries


# The walkers above are the reference; where setup.py could build
# _walk.c (the same walks in C: they touch every frame, and were a quarter
# of a worker's CPU consuming small messages), cut and cut_routed are its.
reference_cut = cut
reference_cut_routed = cut_routed
try:
    from amqplex.protocol import _walk
except ImportError:  # built without a C compiler
    _walk = None

if _walk is not None:

    def cut(
        buf: bytes | bytearray | memoryview, pos: int, end: int, frame_max: int, slack: int
    ) -> tuple[list[Frame], int]:
        try:
            return _walk.cut(buf, pos, end, frame_max, slack)
        except _walk.BadFrame as bad:
            raise _refusal(buf, bad.args[0], end, frame_max, slack) from None

    def cut_routed(
        buf: bytearray,
        pos: int,
        end: int,
        frame_max: int,
        slack: int,
        routes: dict[int, Route],
        watched: frozenset[int],
    ) -> tuple[list, int, int, int]:
        try:
            return _walk.cut_routed(buf, pos, end, frame_max, slack, routes, watched, DELIVERIES)
        except _walk.BadFrame as bad:
            raise _refusal(buf, bad.args[0], end, frame_max, slack) from None


def _refusal(
    buf: bytes | bytearray | memoryview, pos: int, end: int, frame_max: int, slack: int
) -> ConnectionException:
    """The error for the frame at `pos` the compiled walker refused, in the
    reference walker's words (its checks are cut_routed's too)."""
    try:
        reference_cut(buf, pos, end, frame_max, slack)
    except ConnectionException as error:
        return error
    raise AssertionError(f"the compiled walker refused a frame at {pos} that cut() accepts")


def _bad_header(frame_type: int, size: int, frame_max: int) -> ConnectionException:
    if frame_type not in _FRAME_TYPES:
        return ConnectionException(ReplyCode.FRAME_ERROR, f"type {frame_type}, all octets = <<>>")
    return too_large(frame_type, size, frame_max)


def too_large(frame_type: int, size: int, frame_max: int) -> ConnectionException:
    """RabbitMQ's 501 for a frame whose payload is `size` octets, more than a
    connection with `frame_max` takes."""
    return ConnectionException(
        ReplyCode.FRAME_ERROR,
        f"type {frame_type}, all octets = <<>>: "
        f"{{frame_too_large,{size},{frame_max - FRAME_OVERHEAD}}}",
    )


def _no_method_id(buf: bytes | bytearray | memoryview, pos: int, size: int) -> ConnectionException:
    """A method frame too short to hold a method id, in RabbitMQ's words."""
    octets = ",".join(
        map(str, bytes(buf[pos + FRAME_HEADER_SIZE : pos + FRAME_HEADER_SIZE + size]))
    )
    return ConnectionException(
        ReplyCode.FRAME_ERROR, f"type {FRAME_METHOD}, all octets = <<{octets}>>: unknown_frame"
    )


def _bad_end(frame_type: int, channel: int, octet: int) -> ConnectionException:
    return ConnectionException(
        ReplyCode.FRAME_ERROR,
        f"type {frame_type}, channel {channel}: bad frame end octet {octet}",
    )


class FrameSplitter:
    """Cuts frames out of the bytes the event loop read (a Protocol's
    data_received), where they lie: only a frame that spans reads is joined.
    Large body frames come out as memoryviews of the bytes read."""

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
        frames, pos = cut(data, 0, len(data), self.frame_max, self.slack)
        if pos < len(data):
            rest = data[pos:] if pos else data
            self._pending = [rest]
            self._pending_size = len(rest)
            # With a whole header read, cut() has checked it: wait for the
            # frame. Otherwise wait for enough to check the header.
            self._wanted = (
                FRAME_OVERHEAD + _FRAME_HEADER.unpack_from(rest)[2]
                if len(rest) >= FRAME_OVERHEAD
                else FRAME_OVERHEAD
            )
        return frames

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held back."""
        return self._pending_size if self._pending else 0


# Sizes of the buffer a read lands in: it doubles while reads fill it and
# halves while they use under a quarter of it, so a stream gets large reads,
# and an upstream gone quiet keeps only the smallest. That still holds a
# burst of deliveries: a read that fills the buffer has the event loop read
# again at once, and from 1 KiB, the old smallest size, nearly half of a
# 256 B consumer's reads were such second reads, a system call each. There are
# few upstreams; clients' reads are FrameSplitter's.
MIN_READ = 1 << 16
MAX_READ = 1 << 18
# The least room worth reading into before a new buffer is taken: while a
# body handed out as a view still pins the buffer, each new one costs its
# whole size, so a buffer is used nearly to its end first.
MIN_SPACE = 1 << 12


class FrameReader:
    """Cuts frames out of what a peer sends, read straight into the reader's
    own buffer (asyncio's BufferedProtocol: get_buffer, then frames): no
    bytes object is made per read and a frame that spans reads is not
    joined. For an upstream, whose reads are large; a client's are mostly
    small, and FrameSplitter costs fewer Python calls a read for those.

    Large body frames come out as memoryviews of the buffer (see retarget).
    A region handed out is never written again: the buffer is reused from
    its start only when no view of it is left, and replaced otherwise."""

    __slots__ = (
        "frame_max",
        "slack",
        "_buf",
        "_start",
        "_end",
        "_offered",
        "_last",
        "_size",
    )

    def __init__(self, frame_max: int, slack: int = 0) -> None:
        self.frame_max = frame_max
        # Bytes a frame may exceed frame_max by. RabbitMQ lets clients off by
        # up to 8 (its FRAME_SIZE_FUDGE: a payload may be frame_max long), so
        # the proxy's client side does too.
        self.slack = slack
        self._buf = bytearray()  # sized by the first read
        self._start = 0  # the first byte not yet cut into a frame
        self._end = 0  # the first byte not yet read
        self._offered = 0  # bytes the last get_buffer offered
        self._last = 0  # bytes the last read brought
        self._size = MIN_READ  # what the next new buffer gets

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next read goes (sizehint, asyncio's, is not needed)."""
        end = self._end
        if self._start == end:
            if end and not _viewed(sys.getrefcount(self._buf)):
                self._start = self._end = end = 0
            wanted = FRAME_OVERHEAD
        else:
            wanted = self._wanted()
        space = len(self._buf) - end
        if space < wanted or space < MIN_SPACE or len(self._buf) * 2 <= self._size:
            self._rebuffer()
            end = self._end
            space = len(self._buf) - end
        self._offered = space
        return memoryview(self._buf)[end:]

    def received(self, nbytes: int) -> None:
        """`nbytes` were read into the last buffer get_buffer gave (frames()
        can say so itself)."""
        self._end += nbytes
        self._last = nbytes
        if nbytes == self._offered:
            self._size = min(self._size * 2, MAX_READ)
        elif nbytes * 4 < self._size:
            self._size = max(self._size // 2, MIN_READ)

    def frames(self, nbytes: int = 0) -> list[Frame]:
        """The complete frames read so far, after a read of `nbytes`; an
        incomplete one stays."""
        if nbytes:
            self.received(nbytes)
        try:
            frames, self._start = cut(self._buf, self._start, self._end, self.frame_max, self.slack)
        except ConnectionException:
            self._drop()
            raise
        self._all_cut()
        return frames

    def routed(
        self, nbytes: int, routes: dict[int, Route], watched: frozenset[int]
    ) -> tuple[list, int, int]:
        """frames() with `routes` applied (see cut_routed): the frames and
        runs, how many frames were routed, and how many were deliveries."""
        self.received(nbytes)
        try:
            items, self._start, routed, deliveries = cut_routed(
                self._buf, self._start, self._end, self.frame_max, self.slack, routes, watched
            )
        except ConnectionException:
            self._drop()
            raise
        self._all_cut()
        return items, routed, deliveries

    def _drop(self) -> None:
        # Nothing after a bad frame can be trusted: what was read is dropped.
        self._start = self._end

    def _all_cut(self) -> None:
        if (
            self._start == self._end
            and len(self._buf) > MIN_READ
            and self._last * 4 < len(self._buf)
        ):
            # All cut, and a short read: the peer has gone quiet for now.
            self._buf = bytearray()
            self._start = self._end = 0
            self._size = MIN_READ

    def feed(self, data: bytes) -> list[Frame]:
        """The frames in bytes read elsewhere (a stream reader's)."""
        frames: list[Frame] = []
        data = memoryview(data)
        while data:
            space = self.get_buffer()
            taken = min(len(space), len(data))
            space[:taken] = data[:taken]
            space.release()
            frames += self.frames(taken)
            data = data[taken:]
        return frames

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held back."""
        return self._end - self._start

    def _wanted(self) -> int:
        """Bytes the frame under way still needs: all of it once its header
        is read, else what completes the header."""
        held = self._end - self._start
        if held < FRAME_OVERHEAD:
            return FRAME_OVERHEAD - held
        size = _FRAME_HEADER.unpack_from(self._buf, self._start)[2]
        # A size over the limit is refused by frames(): never make room for it.
        return FRAME_OVERHEAD + min(size, self.frame_max + self.slack) - held

    def _rebuffer(self) -> None:
        """Room for the next read, with the unread part moved to its start:
        of this buffer if no frame handed out still points into it, else of
        a new one."""
        held = self._end - self._start
        size = max(self._size, held + self._wanted())
        if _fits(self._buf, size) and not _viewed(sys.getrefcount(self._buf)):
            moved = memoryview(self._buf)
            moved[:held] = moved[self._start : self._end]
        else:
            moved = memoryview(_allocate(size))
            moved[:held] = memoryview(self._buf)[self._start : self._end]
            self._buf = moved.obj
        moved.release()
        self._start, self._end = 0, held


_new_bytearray = ctypes.pythonapi.PyByteArray_FromStringAndSize
_new_bytearray.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
_new_bytearray.restype = ctypes.py_object


def _allocate(size: int) -> bytearray:
    """A buffer whose bytes are not zeroed first (bytearray(size) zeroes
    them): reads write what is used of it, and zeroing would touch every page
    of it, faulting in fresh ones whenever the allocator has just given
    memory back. While a peer drains slowly its transport holds frames of
    several reads, so a stream takes a new buffer for most reads."""
    return _new_bytearray(None, size)


def _fits(buf: bytearray, size: int) -> bool:
    """Big enough for `size`, and not so big that it wastes memory."""
    return size <= len(buf) <= 4 * size


def _viewed(refcount: int) -> bool:
    """Whether a memoryview of a buffer is alive (a frame handed out, or the
    last read's), given its refcount as read where one name holds it: else
    only that name and getrefcount's own argument refer to it."""
    return refcount > 2


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
