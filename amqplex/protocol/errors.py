"""Protocol errors the proxy answers with a Close, as the broker would."""

from amqplex.protocol.constants import ReplyCode


class AMQPError(Exception):
    """An error to report to the peer with a Close carrying these fields.

    The reply text follows RabbitMQ's form, "NOT_FOUND - no queue 'x'", so
    clients show the same message they would get from the broker itself.
    """

    def __init__(self, code: ReplyCode, detail: str, class_id: int = 0, method_id: int = 0) -> None:
        text = f"{code.name} - {detail}"
        super().__init__(text)
        self.code = code
        # A shortstr: at most 255 bytes, cut between characters (a client's
        # own bytes, such as a bad reply-to key, can make it long).
        self.text = text.encode()[:255].decode(errors="ignore")
        self.class_id = class_id
        self.method_id = method_id


class ConnectionException(AMQPError):
    """A hard error (the spec's "connection exception"): the client's whole
    connection is closed."""


class ChannelException(AMQPError):
    """A soft error (the spec's "channel exception"): only that channel is
    closed."""
