"""Client methods the broker would answer with a connection-level error.

On a shared upstream such an error would close every client's channels, so
the proxy refuses these inputs itself, with the code and text RabbitMQ uses,
on the offending client's connection alone (DESIGN rule 6).
"""

import base64
import binascii
import re
import typing

from pamqp import commands

from amqplex.protocol import methods
from amqplex.protocol.constants import FRAME_HEADER_SIZE, ReplyCode
from amqplex.protocol.content import header_entries, property_flags
from amqplex.protocol.errors import ConnectionException

# Methods that declare, bind, purge or delete: they leave the channel as it
# was opened.
_TOPOLOGY = (
    commands.Exchange.Declare,
    commands.Exchange.Delete,
    commands.Exchange.Bind,
    commands.Exchange.Unbind,
    commands.Queue.Declare,
    commands.Queue.Bind,
    commands.Queue.Purge,
    commands.Queue.Delete,
    commands.Queue.Unbind,
)
# Methods a client may send on a channel other than 0 (FlowOk answers a Flow
# RabbitMQ never sends: it is the broker's 503).
CLIENT_METHODS = frozenset(
    (
        *_TOPOLOGY,
        commands.Channel.Flow,
        commands.Basic.Qos,
        commands.Basic.Consume,
        commands.Basic.Cancel,
        commands.Basic.Get,
        commands.Basic.Ack,
        commands.Basic.Reject,
        commands.Basic.RecoverAsync,
        commands.Basic.Recover,
        commands.Basic.Nack,
        commands.Tx.Select,
        commands.Tx.Commit,
        commands.Tx.Rollback,
        commands.Confirm.Select,
    )
)
# Methods after which a channel is as it was opened: its client may leave it
# for the next one (and Publish when not mandatory: see client_channel). Not
# Basic.Get, even no_ack: the next client's delivery tags would not start at 1.
STATELESS_METHODS = frozenset(m.index for m in _TOPOLOGY)
# RabbitMQ's built-in exchange types; a plugin's types are added by config.
EXCHANGE_TYPES = frozenset(("direct", "fanout", "topic", "headers"))

_PUBLISH_IDS = methods.ids(commands.Basic.Publish)
_RECOVER = (commands.Basic.Recover, commands.Basic.RecoverAsync)
# Where a Basic.Publish's arguments start: after the method index and ticket.
PUBLISH_ARGS = FRAME_HEADER_SIZE + 4 + 2
_HEADERS = commands.Basic.Properties.flags["headers"]
# The names as a table encodes them (a length octet first).
_CC, _BCC = b"\x02CC", b"\x03BCC"

# Direct reply-to: on the default exchange, RabbitMQ (3.10) reads a routing
# key (or a CC or BCC entry) under this prefix as <base64 of an Erlang pid
# term>.<key>, dropping it unless it has exactly two dot-separated parts.
# A rest that is not UTF-8, or a first part that is not such a pid (its node
# an ATOM_UTF8_EXT or SMALL_ATOM_UTF8_EXT of the form name@<hash>), crashes
# the broker's channel, and that closes the whole connection with 541. The
# check takes the form the broker gives out; the few others it also takes
# (a NEW_PID_EXT with a short tail, base64 with whitespace) only a forged
# key has, and they are refused with the rest.
DIRECT_REPLY_QUEUE = "amq.rabbitmq.reply-to"
_DIRECT_REPLY = DIRECT_REPLY_QUEUE.encode() + b"."
_PID_TAIL = {88: 12, 103: 9}  # NEW_PID_EXT, PID_EXT: the octets after the node
_ATOM_LENGTH = {118: 2, 119: 1}  # ATOM_UTF8_EXT, SMALL_ATOM_UTF8_EXT: length octets
_HASHED_NODE = re.compile(rb"[^@]+@[0-9]+")


def check_publish(frame: bytes) -> bool:
    """Basic.Publish without decoding it (two short strings, then the bits);
    returns whether it is mandatory."""
    pos = PUBLISH_ARGS
    try:
        pos += 1 + frame[pos]  # exchange
        pos += 1 + frame[pos]  # routing key
        bits = frame[pos]
    except IndexError:
        bits = -1
    if bits < 0 or pos + 2 != len(frame):
        raise ConnectionException(
            ReplyCode.FRAME_ERROR, "cannot decode Basic.Publish arguments", *_PUBLISH_IDS
        )
    if bits & 0b10:
        raise ConnectionException(ReplyCode.NOT_IMPLEMENTED, "immediate=true", *_PUBLISH_IDS)
    if frame[PUBLISH_ARGS] == 0:  # the default exchange
        check_direct_reply(frame[PUBLISH_ARGS + 2 : pos])
    return bool(bits & 0b01)


def check_header_routes(method_frame: bytes, header_frame: bytes) -> None:
    """The CC and BCC headers of a publish to the default exchange (both
    frames checked): their keys go where its routing key goes. The broker
    reads the first entry of each name and skips what is not a long string."""
    if method_frame[PUBLISH_ARGS] != 0 or not property_flags(header_frame) & _HEADERS:
        return
    if _CC not in header_frame and _BCC not in header_frame:
        return  # no entry of either name: check_header has decoded the table once already
    seen = set()
    for name, keys in header_entries(header_frame):
        if name in ("CC", "BCC") and name not in seen:
            seen.add(name)
            if isinstance(keys, list):  # another type is the broker's 406
                for key in keys:
                    if isinstance(key, str):
                        check_direct_reply(key.encode())
                    elif type(key) is bytes:  # a long string that is not UTF-8
                        check_direct_reply(key)


def check_direct_reply(key: bytes) -> None:
    """Refuse a direct reply-to key that would crash the broker's channel
    (see _DIRECT_REPLY) with its 541, on this client alone. One that names
    a node outside the cluster cannot be told from a good one here (README,
    known limits)."""
    if not key.startswith(_DIRECT_REPLY):
        return
    rest = key[len(_DIRECT_REPLY) :]
    try:
        rest.decode()
    except UnicodeDecodeError:
        _refuse_direct_reply(key)
    parts = [part for part in rest.split(b".") if part]
    if len(parts) != 2:
        return  # dropped by the broker
    try:
        term = base64.b64decode(parts[0], validate=True)
    except binascii.Error:
        term = b""
    if not _is_reply_pid(term):
        _refuse_direct_reply(key)


def _refuse_direct_reply(key: bytes) -> typing.NoReturn:
    raise ConnectionException(
        ReplyCode.INTERNAL_ERROR,
        f"cannot decode direct reply-to routing key '{key.decode(errors='replace')}'",
    )


def _is_reply_pid(term: bytes) -> bool:
    """Whether `term` is Erlang's external format of a pid on "name@<hash>"."""
    if len(term) < 4 or term[0] != 131 or term[1] not in _PID_TAIL:
        return False
    width = _ATOM_LENGTH.get(term[2])
    if width is None:
        return False
    start = 3 + width
    end = start + int.from_bytes(term[3:start], "big")
    if not _HASHED_NODE.fullmatch(term[start:end]):
        return False
    return len(term) == end + _PID_TAIL[term[1]]


def check_client_method(method: methods.Method, exchange_types: frozenset[str]) -> None:
    method_class = type(method)
    ids = methods.ids(method_class)
    if method_class not in CLIENT_METHODS:
        # RabbitMQ's words for a server-only (or connection) method on a channel.
        raise ConnectionException(ReplyCode.COMMAND_INVALID, "unimplemented method", *ids)
    if method_class is commands.Exchange.Declare:
        if not method.passive and method.exchange_type not in exchange_types:
            raise ConnectionException(
                ReplyCode.COMMAND_INVALID,
                f"unknown exchange type '{method.exchange_type}'",
                *ids,
            )
    elif method_class is commands.Basic.Qos:
        if method.prefetch_size != 0:
            raise ConnectionException(
                ReplyCode.NOT_IMPLEMENTED, f"prefetch_size!=0 ({method.prefetch_size})", *ids
            )
    elif method_class is commands.Channel.Flow:
        if not method.active:
            raise ConnectionException(ReplyCode.NOT_IMPLEMENTED, "active=false", *ids)
    elif method_class in _RECOVER and not method.requeue:
        raise ConnectionException(ReplyCode.NOT_IMPLEMENTED, "requeue=false", *ids)
