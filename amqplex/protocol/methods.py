"""Method frames through pamqp's typed protocol objects.

The proxy decodes a method only where it must act on it; everything else on
the data path stays bytes (see framing).
"""

from pamqp import base, commands, frame
from pamqp.exceptions import UnmarshalingException

from amqplex.protocol.constants import FRAME_HEADER_SIZE, ReplyCode
from amqplex.protocol.errors import ConnectionException

Method = base.Frame


def decode(frame_bytes: bytes) -> Method:
    """Decode a whole method frame; a malformed one is RabbitMQ's 502."""
    index = int.from_bytes(frame_bytes[FRAME_HEADER_SIZE : FRAME_HEADER_SIZE + 4])
    method_class = commands.INDEX_MAPPING.get(index)
    if method_class is None:
        raise ConnectionException(
            ReplyCode.COMMAND_INVALID,
            f"unknown method: class {index >> 16}, method {index & 0xFFFF}",
            index >> 16,
            index & 0xFFFF,
        )
    method = method_class()
    try:
        method.unmarshal(frame_bytes[FRAME_HEADER_SIZE + 4 : -1])
    except (UnmarshalingException, ValueError, TypeError, IndexError) as error:
        raise ConnectionException(
            ReplyCode.SYNTAX_ERROR,
            f"cannot decode {method.name}: {error}",
            index >> 16,
            index & 0xFFFF,
        ) from error
    except Exception as error:  # pamqp's decoders raise struct.error too
        raise ConnectionException(
            ReplyCode.SYNTAX_ERROR,
            f"cannot decode {method.name}",
            index >> 16,
            index & 0xFFFF,
        ) from error
    return method


def encode(channel: int, method: Method) -> bytes:
    return frame.marshal(method, channel)


def ids(method_class: type[Method]) -> tuple[int, int]:
    """(class_id, method_id) of a pamqp method class, for Close frames."""
    return method_class.index >> 16, method_class.index & 0xFFFF


def connection_close(code: int, text: str, class_id: int = 0, method_id: int = 0) -> bytes:
    return encode(
        0,
        commands.Connection.Close(
            reply_code=code, reply_text=text, class_id=class_id, method_id=method_id
        ),
    )


def channel_close(
    channel: int, code: int, text: str, class_id: int = 0, method_id: int = 0
) -> bytes:
    return encode(
        channel,
        commands.Channel.Close(
            reply_code=code, reply_text=text, class_id=class_id, method_id=method_id
        ),
    )
