"""The client listening socket, bound by the master before it forks so that
every worker accepts from the same queue and a reload refuses nobody."""

from __future__ import annotations

import socket

BACKLOG = 4096


def bind(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Lets a second amqplexd (an upgrade, a blue/green switch) bind the same port.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((address, port))
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock
