"""SASL responses a client sends in Connection.StartOk.

PLAIN is "\\0user\\0password"; AMQPLAIN (php-amqplib's default) is an AMQP
field table without its length prefix, with LOGIN and PASSWORD.
"""

import dataclasses
import struct

from amqplex.protocol import tables
from amqplex.protocol.constants import ReplyCode
from amqplex.protocol.errors import ConnectionException

MECHANISMS = "PLAIN AMQPLAIN"


@dataclasses.dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str = dataclasses.field(repr=False)


def parse_response(mechanism: str, response: bytes | str) -> Credentials:
    # pamqp hands over the response as text when it is valid UTF-8, else as
    # bytes: encoding it back as UTF-8 restores the bytes the client sent.
    raw = response.encode() if isinstance(response, str) else bytes(response)
    if mechanism == "PLAIN":
        parts = raw.split(b"\x00")
        if len(parts) != 3:
            raise _refused("malformed PLAIN response")
        return Credentials(_text(parts[1]), _text(parts[2]))
    if mechanism == "AMQPLAIN":
        try:
            _, table = tables.field_table(struct.pack(">I", len(raw)) + raw)
        except Exception as error:
            raise _refused("malformed AMQPLAIN response") from error
        login, password = table.get("LOGIN"), table.get("PASSWORD")
        if login is None or password is None:
            raise _refused("AMQPLAIN response needs LOGIN and PASSWORD")
        return Credentials(_text(login), _text(password))
    raise _refused(f"unsupported authentication mechanism '{mechanism}'")


def plain_response(credentials: Credentials) -> str:
    return f"\x00{credentials.username}\x00{credentials.password}"


def _text(value: object) -> str:
    if not isinstance(value, bytes | bytearray):
        return str(value)
    try:
        return value.decode()
    except UnicodeDecodeError:
        # Credentials the broker could never match; the error names no bytes.
        raise _refused("credentials are not valid UTF-8") from None


def _refused(detail: str) -> ConnectionException:
    return ConnectionException(ReplyCode.ACCESS_REFUSED, detail)
