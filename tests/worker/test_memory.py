"""A worker's memory under streams of large messages (amqplex/worker/memory.py):
their pages are reused, not mapped afresh for each message, and what a burst
took goes back to the system afterwards."""

from __future__ import annotations

import struct
import time

import pika
from pamqp import commands, frame, header

from tests.conftest import proxy_params
from tests.support.rawclient import RawClient
from tests.support.waiting import wait_until
from tests.worker.test_limits import resident_mb, worker_pids

BODY = b"x" * 65536


def publish_frames(queue: str) -> bytes:
    """One 64 KB message to `queue` on channel 1, as raw frames."""
    return (
        frame.marshal(commands.Basic.Publish(exchange="", routing_key=queue), 1)
        + frame.marshal(header.ContentHeader(0, len(BODY), commands.Basic.Properties()), 1)
        + struct.pack(">BHI", 3, 1, len(BODY))
        + BODY
        + b"\xce"
    )


def capped_queue(port: int, name: str) -> None:
    setup = pika.BlockingConnection(proxy_params(port))
    setup.channel().queue_declare(name, arguments={"x-max-length": 100})
    setup.close()


def minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as handle:
        return int(handle.read().rsplit(")", 1)[1].split()[7])


def test_large_messages_reuse_pages_instead_of_faulting_in_new_ones(fresh_amqplexd, queue_name):
    daemon = fresh_amqplexd("-w", "1")
    capped_queue(daemon.port, queue_name)
    (worker,) = worker_pids(daemon.process.pid)
    messages = 2000
    with RawClient(daemon.port) as client:
        client.handshake()
        client.open_channel(1)
        before = minor_faults(worker)
        for _ in range(messages // 16):
            client.send(publish_frames(queue_name) * 16)
        client.method(1, commands.Basic.Qos(prefetch_count=1))
        client.expect(commands.Basic.QosOk, timeout=30)
        faults = minor_faults(worker) - before
    # glibc's defaults map and fault in every page of each 64 KB message
    # (16 pages and more a message); with the allocator tuned, about two (the
    # pages the once-a-second malloc_trim gave back, read into again).
    assert faults / messages < 4, f"{faults / messages:.1f} page faults per 64 KB message"


def test_worker_memory_returns_after_a_burst_of_large_messages(fresh_amqplexd, queue_name):
    daemon = fresh_amqplexd("-w", "1")
    capped_queue(daemon.port, queue_name)
    (worker,) = worker_pids(daemon.process.pid)
    baseline = resident_mb(worker)
    message = publish_frames(queue_name)
    with RawClient(daemon.port) as client:
        client.handshake()
        client.open_channel(1)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            client.send(message * 16)  # ~1 MB a send, for 3 s
        client.method(1, commands.Basic.Qos(prefetch_count=1))
        client.expect(commands.Basic.QosOk, timeout=30)
    # The freed buffers go back to the system, not just to the allocator.
    wait_until(lambda: resident_mb(worker) < baseline + 5, timeout=10, interval=0.2)
