"""The zero-copy relay (bench/splice_relay.py) is a reference only if it is
a faithful one: every byte both ways, in order, and a close on one side
ends the other."""

from __future__ import annotations

import os
import socket
import stat
import threading

from bench import splice_relay
from bench.broker import BROKER, Admin
from bench.splice_relay import SpliceRelay
from bench.throughput import publish_worker
from tests.support.echo import Echo

TIMEOUT = 10.0
MESSAGES = 50
STREAM = 3 << 20  # several pipefuls


def _read_exactly(sock: socket.socket, count: int, into: bytearray) -> None:
    while len(into) < count and (data := sock.recv(1 << 16)):
        into += data


def test_every_byte_arrives_in_order_both_ways_and_a_close_ends_the_far_side():
    sent = os.urandom(STREAM)
    echoed = bytearray()
    peer = Echo()
    try:
        with SpliceRelay(peer.addr) as relay:
            client = socket.create_connection(relay.addr, timeout=TIMEOUT)
            reader = threading.Thread(target=_read_exactly, args=(client, len(sent), echoed))
            reader.start()
            client.sendall(sent)
            reader.join(TIMEOUT)
            client.close()
            assert peer.ended.wait(TIMEOUT), "the relay did not pass the client's close on"
    finally:
        peer.close()
    assert bytes(peer.got) == sent
    assert bytes(echoed) == sent


def test_a_pump_finishes_a_pipeful_its_sink_takes_in_parts(monkeypatch):
    """splice(2) into a socket may move less than asked when the socket is
    short of room: the pump must move the rest before reading more."""
    real_splice = os.splice

    def short_writes(src: int, dst: int, count: int, *args: object, **kwargs: object) -> int:
        if stat.S_ISFIFO(os.fstat(src).st_mode):
            count = min(count, 1000)
        return real_splice(src, dst, count, *args, **kwargs)

    monkeypatch.setattr(splice_relay.os, "splice", short_writes)
    sent = os.urandom(1 << 18)
    source, source_end = socket.socketpair()
    sink, sink_end = socket.socketpair()
    received = bytearray()
    pump = threading.Thread(target=splice_relay._pump, args=(source, sink))
    pump.start()
    source_end.sendall(sent)
    source_end.shutdown(socket.SHUT_WR)
    sink_end.settimeout(TIMEOUT)
    _read_exactly(sink_end, len(sent) + 1, received)  # to the EOF the pump's end sends
    pump.join(TIMEOUT)
    for sock in (source, source_end, sink, sink_end):
        sock.close()
    assert bytes(received) == sent


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
