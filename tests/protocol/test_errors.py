"""Errors the proxy answers with a Close: their reply text fits a shortstr."""

from __future__ import annotations

from amqplex.protocol import methods
from amqplex.protocol.constants import ReplyCode
from amqplex.protocol.errors import ChannelException, ConnectionException


def test_a_long_text_of_many_byte_characters_is_cut_to_255_bytes_between_characters():
    error = ConnectionException(ReplyCode.SYNTAX_ERROR, "reply-to key " + "\ufffd" * 200)
    assert len(error.text.encode()) <= 255
    assert error.text.startswith("SYNTAX_ERROR - reply-to key \ufffd")
    assert "\ufffd" * 75 in error.text  # whole characters, none cut in two
    # And a Close can carry it.
    close = methods.decode(methods.connection_close(error.code, error.text, 60, 40))
    assert close.reply_text == error.text


def test_a_short_text_is_kept_whole():
    error = ChannelException(ReplyCode.NOT_FOUND, "no queue 'x'")
    assert error.text == "NOT_FOUND - no queue 'x'"
