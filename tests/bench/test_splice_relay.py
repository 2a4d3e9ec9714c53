"""The zero-copy relay (bench/splice_relay.py) is a reference only if it is
a faithful one: every byte both ways, in order, and a close on one side
ends the other."""

from __future__ import annotations

import os
import socket
import threading

from bench.broker import BROKER, Admin
from bench.splice_relay import SpliceRelay
from bench.throughput import publish_worker

TIMEOUT = 10.0
MESSAGES = 50


class _Recorder:
    """A loopback peer that keeps what it reads and, when its client has
    closed, answers with everything it got, reversed."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.addr = self.listener.getsockname()
        self.got = bytearray()
        self.ended = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        conn.settimeout(TIMEOUT)
        while data := conn.recv(1 << 16):
            self.got += data
        self.ended.set()
        conn.close()

    def close(self) -> None:
        self.listener.close()


def _receive_all(sock: socket.socket) -> bytes:
    received = bytearray()
    while data := sock.recv(1 << 16):
        received += data
    return bytes(received)


def test_every_byte_arrives_in_order_and_a_close_ends_the_far_side():
    sent = os.urandom(3 << 20)  # several pipefuls
    peer = _Recorder()
    try:
        with SpliceRelay(peer.addr) as relay:
            client = socket.create_connection(relay.addr, timeout=TIMEOUT)
            client.sendall(sent)
            client.shutdown(socket.SHUT_WR)
            assert peer.ended.wait(TIMEOUT), "the relay did not pass the client's close on"
            assert _receive_all(client) == b"", "the relay's side should close with the peer's"
            client.close()
    finally:
        peer.close()
    assert bytes(peer.got) == sent


class _Go:
    def go(self) -> None:
        pass  # one publisher: nobody to start together with


def test_a_publisher_through_it_has_every_message_in_the_queue():
    """The bench's own 64 KB publisher through the relay to the broker: its
    closing round trip is answered and the queue holds every message, where
    a lost or reordered byte would have been a protocol error or a short
    count."""
    admin = Admin()
    try:
        queue = admin.queue("splice-relay-test")
        with SpliceRelay(BROKER) as relay:
            publish_worker(_Go(), relay.addr, queue, 65536, MESSAGES)
        admin.verify({queue: MESSAGES})
    finally:
        admin.close()
