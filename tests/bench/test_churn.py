"""The churn generators' cycle, compiled (bench/_cycle.c) and in Python:
both go through a whole conversation with the broker, and both refuse a
wrong answer with the same error, so a broken proxy cannot pass for a fast
one and the two cannot drift apart."""

from __future__ import annotations

import contextlib
import socket
import threading
import uuid

import pika
import pytest
from pamqp import commands, frame

from bench import churn, frames
from bench.broker import BROKER, BROKER_URL
from bench.wire import ProtocolError


def _method(method: commands.Frame, channel: int = 0) -> bytes:
    return frame.marshal(method, channel)


START = _method(commands.Connection.Start(server_properties={}, mechanisms="PLAIN"))
REPLIES = [
    START,
    _method(commands.Connection.Tune(channel_max=16, frame_max=131072, heartbeat=0)),
    _method(commands.Connection.OpenOk()),
    _method(commands.Channel.OpenOk(), frames.CHANNEL),
    _method(commands.Channel.CloseOk(), frames.CHANNEL),
    _method(commands.Connection.CloseOk()),
]
HEARTBEAT = b"\x08\x00\x00\x00\x00\x00\x00\xce"
REFUSAL = _method(commands.Connection.Close(403, "ACCESS_REFUSED - no", 0, 0))
CONTENT = b"\x03\x00\x01\x00\x00\x00\x01x\xce"


def test_the_compiled_cycle_is_built():
    assert churn._cycle is not None, "bench/build.py could not build _cycle.c: is gcc installed?"


@pytest.fixture(params=["compiled", "python"])
def cycle(request, monkeypatch):
    if request.param == "compiled" and churn._cycle is None:
        pytest.skip("not built (test_the_compiled_cycle_is_built fails)")
    if request.param == "python":
        monkeypatch.setattr(churn, "_cycle", None)
    return churn.cycle


def test_cycles_publish_their_message_through_the_broker(cycle):
    queue = f"amqplex-test.churn.{uuid.uuid4().hex[:8]}"
    with pika.BlockingConnection(pika.URLParameters(BROKER_URL)) as connection:
        channel = connection.channel()
        channel.queue_declare(queue)
        try:
            conversation = churn.steps(frames.publish(queue, churn.MESSAGE_SIZE))
            for _ in range(3):
                cycle(BROKER, conversation)
            assert channel.queue_declare(queue, passive=True).method.message_count == 3
        finally:
            channel.queue_delete(queue)


def _peer(answers: list) -> tuple[tuple[str, int], threading.Thread]:
    """A one-connection server that, for each of `answers`, reads once and
    then sends it (a tuple: each piece in a write of its own), then reads
    until the client closes (unread bytes would make its close a reset): a
    broker that goes wrong, or splits its replies, where a test says."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(10)

    def serve() -> None:
        with server, server.accept()[0] as conn:
            conn.settimeout(10)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for answer in answers:
                conn.recv(65536)
                for piece in answer if isinstance(answer, tuple) else (answer,):
                    conn.sendall(piece)
            with contextlib.suppress(ConnectionResetError):  # it closed with bytes unread
                while conn.recv(65536):
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server.getsockname(), thread


@pytest.mark.parametrize(
    "answers",
    [
        REPLIES,
        [(HEARTBEAT, START), HEARTBEAT + REPLIES[1], *REPLIES[2:]],
        [b"".join(REPLIES)],
        [(START[:3], START[3:]), (REPLIES[1][:9], REPLIES[1][9:]), *REPLIES[2:]],
    ],
    ids=["one reply a step", "heartbeats between", "all replies at once", "replies split"],
)
def test_a_whole_conversation_completes(cycle, answers):
    addr, thread = _peer(answers)
    cycle(addr, churn.steps(b""))
    thread.join(10)
    assert not thread.is_alive()


@pytest.mark.parametrize(
    "answers, error",
    [
        ([START, REFUSAL], "expected 000a001e, got Connection.Close 403 ACCESS_REFUSED - no"),
        ([START + CONTENT], "unexpected frame type 3"),
        ([START[:-1] + b"\x00"], "bad frame end"),
        ([HEARTBEAT[:-1] + b"\x00" + START], "bad frame end"),
        ([b"\x01\x00\x00\x00\x00\x00\x02\x00\x0a\xce"], "expected 000a000a, got method frame of 2"),
        ([START], "connection closed by peer"),
    ],
    ids=["wrong method", "content frame", "bad end", "bad end on a heartbeat", "short", "hang-up"],
)
def test_a_wrong_answer_is_refused_with_what_came_instead(cycle, answers, error):
    if error == "connection closed by peer":
        addr, thread = _hang_up_after(answers)
    else:
        addr, thread = _peer(answers)
    with pytest.raises(ProtocolError) as refused:
        cycle(addr, churn.steps(b""))
    assert str(refused.value).startswith(error)
    thread.join(10)


def _hang_up_after(answers: list) -> tuple[tuple[str, int], threading.Thread]:
    """A peer that answers, reads the next step and closes."""
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


def test_a_silent_peer_times_the_cycle_out(cycle, monkeypatch):
    monkeypatch.setattr(churn, "CYCLE_TIMEOUT", 0.2)
    addr, thread = _peer([])
    with pytest.raises(BlockingIOError):
        cycle(addr, churn.steps(b""))
    thread.join(10)


def test_nobody_listening_is_a_refused_connection(cycle):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        addr = taken.getsockname()
    with pytest.raises(ConnectionRefusedError):
        cycle(addr, churn.steps(b""))


def test_the_compiled_cycle_refuses_a_frame_larger_than_its_buffer():
    if churn._cycle is None:
        pytest.skip("not built (test_the_compiled_cycle_is_built fails)")
    huge = _method(commands.Connection.Start(server_properties={"x": "y" * 70000}))
    addr, thread = _peer([huge])
    with pytest.raises(ProtocolError, match="frame over 65536 bytes"):
        churn.cycle(addr, churn.steps(b""))
    thread.join(10)


@pytest.mark.parametrize(
    "host, port, steps, error",
    [
        ("localhost", 5672, (), ValueError),
        ("127.0.0.1", 65536, (), ValueError),
        ("127.0.0.1", 5672, ((b"", b"abc"),), TypeError),
        ("127.0.0.1", 5672, ((b"", b"abcd"),) * 17, ValueError),
    ],
    ids=["a name", "a port out of range", "a 3-byte method id", "17 steps"],
)
def test_the_compiled_cycle_checks_its_arguments(host, port, steps, error):
    if churn._cycle is None:
        pytest.skip("not built (test_the_compiled_cycle_is_built fails)")
    with pytest.raises(error):
        churn._cycle.cycle(host, port, 1.0, steps)
