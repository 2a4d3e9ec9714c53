"""The real RabbitMQ the tests run against, and its own view of things."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import urllib.parse
import uuid

BROKER_URL = os.environ.get("AMQP_TEST_URL", "amqp://guest:guest@127.0.0.1:5672/")
_url = urllib.parse.urlsplit(BROKER_URL)
BROKER_HOST = _url.hostname or "127.0.0.1"
BROKER_PORT = _url.port or 5672
BROKER_USER = urllib.parse.unquote(_url.username or "guest")
BROKER_PASSWORD = urllib.parse.unquote(_url.password or "guest")


def rabbitmqctl(*args: str, timeout: float = 60) -> str:
    result = subprocess.run(
        ["rabbitmqctl", "-q", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    return result.stdout


def connections(user: str | None = None) -> list[dict]:
    """The broker's connection list, optionally only one user's."""
    out = rabbitmqctl(
        "list_connections",
        "--formatter",
        "json",
        "name",
        "user",
        "vhost",
        "client_properties",
        "timeout",
    )
    rows = json.loads(out or "[]")
    return [row for row in rows if user is None or row["user"] == user]


def proxy_connections(user: str) -> list[dict]:
    """Connections amqplex opened to the broker for `user`."""
    return [row for row in connections(user) if _product(row) == "amqplex"]


def _product(row: dict) -> str:
    props = row.get("client_properties") or []
    # rabbitmqctl's JSON renders the table as [[key, type, value], ...]
    for entry in props:
        if isinstance(entry, list) and entry and entry[0] == "product":
            return entry[-1]
    if isinstance(props, dict):
        return props.get("product", "")
    return ""


def queue_names() -> set[str]:
    out = rabbitmqctl("list_queues", "--formatter", "json", "name")
    return {row["name"] for row in json.loads(out or "[]")}


class BrokerUser:
    """A user of its own for a test, so the test gets pools of its own even
    on a shared amqplexd: new_user() hands one out."""

    def __init__(self, name: str, password: str) -> None:
        self.name = name
        self.password = password


# Users are made a batch at a time and deleted all at once when the suite
# ends (delete_users): each rabbitmqctl call starts an Erlang VM (0.7-0.8 s
# here), and three calls a user were one and a half minutes of the suite.
# rabbitmqctl eval runs on the broker's node what add_user, set_permissions
# and delete_user run, for many users in one call.
_BATCH = 8
_ACTOR = '<<"amqplex-tests">>'
_ready: list[BrokerUser] = []
_made: list[BrokerUser] = []


def new_user() -> BrokerUser:
    """A fresh user with every permission on "/", never handed out before."""
    if not _ready:
        batch = [BrokerUser(f"t-{uuid.uuid4().hex[:10]}", uuid.uuid4().hex) for _ in range(_BATCH)]
        _made.extend(batch)  # first: a batch that fails halfway is deleted too
        _eval(
            f'ok = rabbit_auth_backend_internal:add_user(<<"{u.name}">>, '
            f'<<"{u.password}">>, {_ACTOR}), '
            f'ok = rabbit_auth_backend_internal:set_permissions(<<"{u.name}">>, <<"/">>, '
            f'<<".*">>, <<".*">>, <<".*">>, {_ACTOR})'
            for u in batch
        )
        _ready.extend(batch)
    return _ready.pop()


def delete_users() -> None:
    """Every user new_user() made, used or not (one that is gone already, or
    was never made, does not stop the others)."""
    if _made:
        _eval(
            f'catch rabbit_auth_backend_internal:delete_user(<<"{u.name}">>, {_ACTOR})'
            for u in _made
        )
        _made.clear()
        _ready.clear()


def _eval(expressions) -> None:  # noqa: ANN001 - an iterable of Erlang expressions
    # Names and passwords are hex and a prefix: nothing to quote.
    rabbitmqctl("eval", ", ".join(expressions) + ", ok.")


def consumers_by_upstream(user: str) -> list[int]:
    """Consumers the broker counts on each connection of `user`, fewest first."""
    out = rabbitmqctl(
        "list_channels", "--formatter", "json", "connection", "user", "consumer_count"
    )
    counts: collections.Counter[str] = collections.Counter()
    for row in json.loads(out or "[]"):
        if row["user"] == user and row["consumer_count"]:
            counts[str(row["connection"])] += row["consumer_count"]
    return sorted(counts.values())
