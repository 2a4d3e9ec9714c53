"""A relay that moves bytes between its sockets with splice(2) through a
pipe, never copying them into user space: about the least a one-hop proxy
that parses nothing can cost here, and the 64 KB rows' second reference
beside the bare (uvloop) relay.

A thread per direction, blocking sockets: a pump waits for its source and
for its sink's room, as the kernel says, and nothing else is scheduled.
An end of either direction ends both (no half-close: AMQP has none).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import threading

from bench.procs import ChildServer

PIPE_SIZE = 1 << 20  # the kernel's default pipe-max-size


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Move everything from `source` to `sink` until either end closes,
    then shut both down, which ends the other direction's pump too."""
    pipe: tuple[int, int] | None = None
    try:
        pipe = read_end, write_end = os.pipe()
        # Larger pipefuls mean fewer calls; refused past the user's pipe
        # quota, and the default size only costs calls.
        with contextlib.suppress(OSError):
            fcntl.fcntl(read_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        while moved := os.splice(source.fileno(), write_end, PIPE_SIZE, flags=os.SPLICE_F_MOVE):
            while moved:  # a sink short of room takes part of it
                moved -= os.splice(read_end, sink.fileno(), moved, flags=os.SPLICE_F_MOVE)
    except OSError:
        pass  # a reset, a closed peer or no pipe to be had: the connection ends
    finally:
        for fd in pipe or ():
            os.close(fd)
        for sock in (source, sink):
            with contextlib.suppress(OSError):  # already down
                sock.shutdown(socket.SHUT_RDWR)


def _relay(inbound: socket.socket, target: tuple[str, int]) -> None:
    try:
        outbound = socket.create_connection(target)
    except OSError:
        inbound.close()
        return
    for sock in (inbound, outbound):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    back = threading.Thread(target=_pump, args=(outbound, inbound), daemon=True)
    back.start()
    _pump(inbound, outbound)
    back.join()
    inbound.close()
    outbound.close()


def _serve(target: tuple[str, int], report) -> None:  # noqa: ANN001
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    report.send(listener.getsockname()[1])
    while True:  # until the parent terminates this process
        inbound, _ = listener.accept()
        threading.Thread(target=_relay, args=(inbound, target), daemon=True).start()


class SpliceRelay(ChildServer):
    """The zero-copy relay in front of `target`, in a child process."""

    name = "splice relay"

    def __init__(self, target: tuple[str, int]) -> None:
        super().__init__(_serve, target)
