"""Ports for the servers tests start (private redis-server, Flower, the exporter)."""

from __future__ import annotations

import random
import socket

# Below the kernel's ephemeral range (32768-60999 here): a port picked by binding to 0 can be
# taken meanwhile as the local port of any outgoing connection, and the server then fails to bind.
_LOW, _HIGH = 20000, 32000


def free_port() -> int:
    """A port nobody listens on, outside the ephemeral range."""
    for _ in range(200):
        port = random.randrange(_LOW, _HIGH)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_LOW}..{_HIGH}")
