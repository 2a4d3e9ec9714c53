"""The real RabbitMQ the tests run against, and its own view of things."""

from __future__ import annotations

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
        "list_connections", "--formatter", "json", "name", "user", "vhost", "client_properties"
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
    on a shared amqplexd."""

    def __init__(self, vhost: str = "/") -> None:
        self.name = f"t-{uuid.uuid4().hex[:10]}"
        self.password = uuid.uuid4().hex
        self.vhost = vhost
        rabbitmqctl("add_user", self.name, self.password)
        rabbitmqctl("set_permissions", "-p", vhost, self.name, ".*", ".*", ".*")

    def delete(self) -> None:
        rabbitmqctl("delete_user", self.name)
