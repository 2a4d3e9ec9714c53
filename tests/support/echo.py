"""A loopback peer for relay tests."""

from __future__ import annotations

import socket
import threading

TIMEOUT = 10.0


class Echo:
    """A loopback peer that sends back everything it reads as it reads it,
    keeps a copy, and notes when its client has gone."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.addr = self.listener.getsockname()
        self.got = bytearray()
        self.ended = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        conn.settimeout(TIMEOUT)
        try:
            while data := conn.recv(1 << 16):
                self.got += data
                conn.sendall(data)
        except OSError:
            pass  # the relay shut the connection while an echo was going out
        self.ended.set()
        conn.close()

    def close(self) -> None:
        self.listener.close()
