"""Ports for the servers tests start (private redis-server, Flower, the exporter)."""

from __future__ import annotations

import os
import random
import socket

# Below the kernel's ephemeral range (32768-60999 here): a port picked by binding to 0 can be
# taken meanwhile as the local port of any outgoing connection, and the server then fails to bind.
_LOW, _HIGH = 20000, 32000
# Test processes running at once (pytest-xdist workers, other checkouts) each use a Redis database
# base of their own (tests/conftest.py, 0..14 in steps of 2): each base gets a slice of the range,
# so two processes never pick the same free port between the check and the bind.
_SLICES = 8


def _slice() -> tuple[int, int]:
    base = int(os.environ.get("TQ_TEST_REDIS_DB_BASE", "12"))
    size = (_HIGH - _LOW) // _SLICES
    low = _LOW + (base // 2) % _SLICES * size
    return low, low + size


def free_port() -> int:
    """A port nobody listens on, outside the ephemeral range, in this test process's slice."""
    low, high = _slice()
    for _ in range(200):
        port = random.randrange(low, high)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}..{high}")
