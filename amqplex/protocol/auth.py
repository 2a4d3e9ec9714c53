"""SASL responses a client sends in Connection.StartOk.

PLAIN is "\\0user\\0password"; AMQPLAIN (php-amqplib's default) is an AMQP
field table without its length prefix, with LOGIN and PASSWORD.
"""

import dataclasses
import struct

from pamqp import decode

from amqplex.protocol.constants import ReplyCode
from amqplex.protocol.errors import ConnectionException

MECHANISMS = "PLAIN AMQPLAIN"


@dataclasses.dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str = dataclasses.field(repr=False)


def parse_response(mechanism: str, response: bytes | str) -> Credentials:
    raw = response.encode("latin-1") if isinstance(response, str) else bytes(response)
    if mechanism == "PLAIN":
        parts = raw.split(b"\x00")
        if len(parts) != 3:
            raise _refused("malformed PLAIN response")
        return Credentials(parts[1].decode(), parts[2].decode())
    if mechanism == "AMQPLAIN":
        try:
            _, table = decode.field_table(struct.pack(">I", len(raw)) + raw)
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
    return value.decode() if isinstance(value, bytes | bytearray) else str(value)


def _refused(detail: str) -> ConnectionException:
    return ConnectionException(ReplyCode.ACCESS_REFUSED, detail)
