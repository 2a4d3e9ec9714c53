"""Client methods the broker would answer with a connection-level error.

On a shared upstream such an error would close every client's channels, so
the proxy refuses these inputs itself, with the code and text RabbitMQ uses,
on the offending client's connection alone (DESIGN rule 6).
"""

from pamqp import commands

from amqplex.protocol import methods
from amqplex.protocol.constants import FRAME_HEADER_SIZE, ReplyCode
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
# Methods a client may send on a channel other than 0.
CLIENT_METHODS = frozenset(
    (
        *_TOPOLOGY,
        commands.Channel.Flow,
        commands.Channel.FlowOk,
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
# for the next one (with Basic.Get only when no_ack, and Publish only when
# not mandatory: see client_channel).
STATELESS_METHODS = frozenset(m.index for m in (*_TOPOLOGY, commands.Basic.Get))
# RabbitMQ's built-in exchange types; a plugin's types are added by config.
EXCHANGE_TYPES = frozenset(("direct", "fanout", "topic", "headers"))

_PUBLISH_IDS = methods.ids(commands.Basic.Publish)
_RECOVER = (commands.Basic.Recover, commands.Basic.RecoverAsync)
_PUBLISH_ARGS = FRAME_HEADER_SIZE + 4 + 2  # after the method index and ticket


def check_publish(frame: bytes) -> bool:
    """Basic.Publish without decoding it (two short strings, then the bits);
    returns whether it is mandatory."""
    pos = _PUBLISH_ARGS
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
    return bool(bits & 0b01)


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
