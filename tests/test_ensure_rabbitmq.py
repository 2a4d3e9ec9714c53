"""scripts/ensure-rabbitmq, which `make test` runs first: it checks the
broker the suite will use, the one in AMQP_TEST_URL."""

import os
import subprocess
from pathlib import Path

from tests.support.broker import BROKER_URL

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "ensure-rabbitmq"


def run(url: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "AMQP_TEST_URL": url}
    return subprocess.run([SCRIPT], env=env, capture_output=True, text=True, timeout=30)


def test_the_suites_broker_listening_is_enough():
    assert run(BROKER_URL).returncode == 0


def test_a_broker_it_cannot_start_is_named_not_replaced_by_the_local_one():
    # A loopback address on another port: starting the local RabbitMQ would
    # not make it listen there, and checking 5672 instead would pass wrongly.
    result = run("amqp://guest:guest@127.0.0.1:1/")
    assert result.returncode == 1
    assert "127.0.0.1:1 is not listening" in result.stderr
