"""A publish whose content header and single body frame came with it,
checked in the order the frame-by-frame path checks them and renumbered
onto the upstream channel as one piece.

`reference_renumber` in Python is the reference; where setup.py built
_walk.c, its compiled `whole_publishes` takes a read's run of the messages
it can vouch for (a method, a property list without a headers table, one
body frame that matches the announced size; a large body, which cut()
left a view of the read, goes on as a view of its payload after its
message's piece, as framing.retarget hands it on) and stops at the first
other one, which is the reference's: it raises what the broker would for a bad
one, so the error texts live in one place. tests/worker/test_whole_publish.py
checks the two against each other.
"""

from __future__ import annotations

from pamqp import commands

from amqplex.protocol import framing
from amqplex.protocol.constants import FRAME_OVERHEAD
from amqplex.protocol.content import check_header
from amqplex.worker.rules import check_header_routes, check_publish

_PUBLISH = commands.Basic.Publish.index


def reference_renumber(frame: bytes, header: bytes, body: bytes, uid: bytes) -> bytes | None:
    """The three frames on upstream channel `uid` (two octets), or None if
    they are not one whole Basic.Publish (the frame-by-frame path takes
    them then); a bad publish or header raises its ConnectionException."""
    if framing.method_index(frame) != _PUBLISH:
        return None
    check_publish(frame)
    size = check_header(header)
    check_header_routes(frame, header)
    # Zero: the message ends with its header, and the body frame after it
    # is an error of its own; more: it wants more body frames.
    if size == 0 or size != len(body) - FRAME_OVERHEAD:
        return None
    return b"".join(
        (frame[:1], uid, frame[3:], header[:1], uid, header[3:], body[:1], uid, body[3:])
    )


def mandatory(frame: bytes) -> bool:
    """Whether a publish `reference_renumber` took is mandatory (its last bits octet)."""
    return bool(frame[-2] & 0b01)


if framing._walk is not None:
    # A client's streamed publishes: one call for a read's run of them.
    renumber_run = framing._walk.whole_publishes
else:

    def renumber_run(
        frames: list, start: int, channel: int, uid: bytes
    ) -> tuple[list[bytes | memoryview], int, bool, bool, int]:
        return [], start, False, False, -1  # each message by the reference
