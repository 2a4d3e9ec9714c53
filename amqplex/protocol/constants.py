"""Wire constants of AMQP 0-9-1 and RabbitMQ's reply codes."""

import enum

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"

FRAME_METHOD = 1
FRAME_HEADER = 2
FRAME_BODY = 3
FRAME_HEARTBEAT = 8
FRAME_END = 0xCE
# type, channel, size; the payload and the end octet follow.
FRAME_HEADER_SIZE = 7
FRAME_OVERHEAD = FRAME_HEADER_SIZE + 1
# The spec's smallest frame_max: every peer must accept frames this large.
FRAME_MIN_SIZE = 4096
# RabbitMQ's default max_message_size (3.8 and later), in body octets.
MAX_MESSAGE_SIZE = 128 * 1024 * 1024
HEARTBEAT_FRAME = b"\x08\x00\x00\x00\x00\x00\x00\xce"

BASIC_CLASS_ID = 60


class ReplyCode(enum.IntEnum):
    """Reply codes as RabbitMQ names them in reply texts ("NOT_FOUND - ...")."""

    REPLY_SUCCESS = 200
    CONTENT_TOO_LARGE = 311
    NO_ROUTE = 312
    NO_CONSUMERS = 313
    CONNECTION_FORCED = 320
    INVALID_PATH = 402
    ACCESS_REFUSED = 403
    NOT_FOUND = 404
    RESOURCE_LOCKED = 405
    PRECONDITION_FAILED = 406
    FRAME_ERROR = 501
    SYNTAX_ERROR = 502
    COMMAND_INVALID = 503
    CHANNEL_ERROR = 504
    UNEXPECTED_FRAME = 505
    RESOURCE_ERROR = 506
    NOT_ALLOWED = 530
    NOT_IMPLEMENTED = 540
    INTERNAL_ERROR = 541
