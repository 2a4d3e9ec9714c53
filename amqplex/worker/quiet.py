"""Publishes the broker can answer with nothing, ever.

A recycled channel goes to the next client only once nothing its last client
sent can still draw a reply or an error from the broker (DESIGN rule 6):
otherwise that answer would reach the next client. The proxy proves it with
a probe's round trip (upstream_channel.py), which costs the broker more than
anything else in a short-lived client's life. Some publishes need no proof.

RabbitMQ's channel checks a Basic.Publish in this order (rabbit_channel and
rabbit_basic, 3.10): the body against max_message_size (406), write
permission on the exchange (403), that the exchange exists (404) and is not
internal (403), topic permissions on a topic exchange, the properties
(user_id must be the connection's user, expiration a number of
milliseconds, a reply_to of amq.rabbitmq.reply-to needs a direct reply-to
consumer, delivery_mode 1 or 2, the CC and BCC headers arrays: each 406),
and routing keys of direct reply-to (amq.rabbitmq.reply-to.*, whose bad
ones crash the channel). Then it routes; a message without mandatory,
confirms or transactions that reaches no queue, or a full queue that
rejects publishes, is dropped in silence.

A publish to the default exchange, which always exists, is a direct
exchange and is not internal, with none of those properties (but
delivery_mode 1 or 2, and an expiration of one to nine digits) and a
routing key outside amq.rabbitmq.*, can fail only the
size and permission checks. The size limit is the same for a channel's
whole life (the channel reads max_message_size when it opens), so once a
probe has come back clean after such a publish on a channel, any later one
no larger cannot fail it: `UpstreamChannel.proven_body` keeps that size.
The permission is the user's, the same for every client of the upstream
(pools are per user, password and vhost); the broker's channel checks it
again after it has been idle, so an operator revoking the user's write
permission on the vhost while its clients publish can have the first
refusal (403) reach the next client of that same user, which would be
refused the same. A stream queue whose coordinator is unavailable (405) is
the one queue-side refusal left; both are in README's known limits.

Mandatory publishes are not quiet in a different way (a Basic.Return may
come): they make a channel stateful, which is closed rather than recycled.
"""

from __future__ import annotations

from pamqp import commands

from amqplex.protocol.content import after_leading_strings, property_flags
from amqplex.worker.rules import PUBLISH_ARGS

# The properties RabbitMQ checks as it routes whose values are not read here.
CHECKED_PROPERTIES = sum(
    commands.Basic.Properties.flags[name] for name in ("headers", "reply_to", "user_id")
)
_FLAGS = commands.Basic.Properties.flags
_DELIVERY_MODE, _PRIORITY = _FLAGS["delivery_mode"], _FLAGS["priority"]
_CORRELATION_ID, _EXPIRATION = _FLAGS["correlation_id"], _FLAGS["expiration"]
# An expiration RabbitMQ takes (it takes more: "+5", ten digits and up).
_MAX_EXPIRATION_DIGITS = 9
_RESERVED_KEYS = b"amq.rabbitmq."


def quiet_method(frame: bytes) -> bool:
    """Whether a Basic.Publish (check_publish took it) names the default
    exchange and a routing key outside the broker's own."""
    if frame[PUBLISH_ARGS]:
        return False
    key = PUBLISH_ARGS + 2
    reserved = frame[key - 1] >= len(_RESERVED_KEYS) and frame.startswith(_RESERVED_KEYS, key)
    return not reserved


def quiet_header(frame: bytes) -> bool:
    """Whether a content header (check_header took it) carries none of the
    properties the broker checks but a delivery_mode of 1 or 2 and an
    expiration of one to nine digits."""
    flags = property_flags(frame)
    if flags & CHECKED_PROPERTIES:
        return False
    if not flags & (_DELIVERY_MODE | _EXPIRATION):
        return True
    pos = after_leading_strings(frame, flags)  # at delivery_mode: no headers table
    if flags & _DELIVERY_MODE:
        if frame[pos] not in (1, 2):
            return False
        pos += 1
    if not flags & _EXPIRATION:
        return True
    if flags & _PRIORITY:
        pos += 1
    if flags & _CORRELATION_ID:
        pos += 1 + frame[pos]
    size = frame[pos]  # no reply_to before it: that one is checked
    return 0 < size <= _MAX_EXPIRATION_DIGITS and frame[pos + 1 : pos + 1 + size].isdigit()
