"""The churn generators' cycle, compiled (bench/_cycle.c) and in Python: both
go through a whole conversation with the broker and refuse a wrong answer
the same way, so a broken proxy cannot pass for a fast one."""

from __future__ import annotations

import socket
import threading
import uuid

import pika
import pytest
from pamqp import commands, frame

from bench import churn, frames
from bench.broker import BROKER, BROKER_URL
from bench.wire import ProtocolError


@pytest.fixture(params=["compiled", "python"])
def cycle(request, monkeypatch):
    if request.param == "compiled":
        if churn._cycle is None:
            pytest.fail("bench/_cycle.c was not built (make .venv/.installed builds it)")
    else:
        monkeypatch.setattr(churn, "_cycle", None)
    return churn.cycle


def test_cycles_publish_their_message_through_the_broker(cycle):
    queue = f"amqplex-test.churn.{uuid.uuid4().hex[:8]}"
    with pika.BlockingConnection(pika.URLParameters(BROKER_URL)) as connection:
        channel = connection.channel()
        channel.queue_declare(queue, auto_delete=False)
        try:
            conversation = churn.steps(frames.publish(queue, churn.MESSAGE_SIZE))
            for _ in range(3):
                cycle(BROKER, conversation)
            assert channel.queue_declare(queue, passive=True).method.message_count == 3
        finally:
            channel.queue_delete(queue)


def _peer(answers: list[bytes]) -> tuple[tuple[str, int], threading.Thread]:
    """A one-connection server that sends each of `answers` after a read,
    then closes once the next step is in (unread bytes would make its close
    a reset): a broker that goes wrong at a chosen step."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(10)

    def serve() -> None:
        with server, server.accept()[0] as conn:
            for answer in answers:
                conn.recv(65536)
                conn.sendall(answer)
            conn.recv(65536)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server.getsockname(), thread


START = frame.marshal(
    commands.Connection.Start(server_properties={}, mechanisms="PLAIN", locales="en_US"), 0
)


def test_a_wrong_reply_is_refused_with_what_came_instead(cycle):
    refusal = frame.marshal(commands.Connection.Close(403, "ACCESS_REFUSED - no", 0, 0), 0)
    addr, thread = _peer([START, refusal])
    with pytest.raises(ProtocolError, match="expected 000a001e, got Connection.Close 403"):
        cycle(addr, churn.steps(b""))
    thread.join(10)


def test_a_content_frame_in_place_of_a_method_is_refused(cycle):
    addr, thread = _peer([START + b"\x03\x00\x00\x00\x00\x00\x01x\xce"])
    with pytest.raises(ProtocolError, match="unexpected frame type 3"):
        cycle(addr, churn.steps(b""))
    thread.join(10)


def test_a_peer_that_hangs_up_mid_conversation_is_an_error(cycle):
    addr, thread = _peer([START])
    with pytest.raises(ProtocolError, match="connection closed by peer"):
        cycle(addr, churn.steps(b""))
    thread.join(10)
