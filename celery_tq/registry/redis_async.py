"""A Redis write an event loop drives: the store's merge script, pipelined on a connection of its own.

The hand-over (:mod:`celery_tq.worker.handoff`) writes its pool processes' outcomes from the
worker's main process. On Redis each outcome is one ``EVALSHA`` of the store's merge script
(:class:`~celery_tq.registry.redis.RedisStore`), exactly as the store's own write sends it; a pool
process encodes its outcome's commands in Redis's wire format (:meth:`RedisLoopWrite.encode`), so
the loop only joins what arrived, sends it, and counts the replies: the script answers every call
with one integer (``:1``) or one error line, nothing else. A batch is durable once every reply is
in: Redis has run each call before it answers it (with ``appendfsync always`` it has also written
it to its log; otherwise what the server's persistence settings give, as for every Redis write).

Any error reply (``NOSCRIPT`` after a flush, a script error) or a lost connection raises: the
caller hands the whole batch to the store's own write, which loads the script again, isolates a
record Redis refuses and retries while Redis is down; the merge rule makes writing a call twice
harmless. Connecting (and ``SCRIPT LOAD``) is blocking: the caller does it off the loop. Only plain
TCP connections are driven this way: on TLS (``rediss://``) the pool processes write themselves.
"""

from __future__ import annotations

import contextlib
import select
import socket
from collections.abc import Sequence
from typing import Any

import redis

from celery_tq.registry.loop_write import NotSent
from celery_tq.registry.record import Row, fold

__all__ = ["CLIENT_NAME", "RedisLoopWrite", "redis_loop_write"]

CLIENT_NAME = "celery-tq-outcomes"
SEND_TIMEOUT = 5.0  # a batch that does not fit in the socket's buffer waits this long for room
_COUNT = 4  # bytes of an encoded batch's leading count of commands


def _command(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


def _read_reply(sock: socket.socket, buffer: bytearray) -> bytes:
    """One simple, integer or bulk reply, blocking (the handshake only); raises on an error reply."""
    while b"\r\n" not in buffer:
        chunk = sock.recv(4096)
        if not chunk:
            raise redis.ConnectionError("Redis closed the connection")
        buffer += chunk
    end = buffer.index(b"\r\n")
    line = bytes(buffer[:end])
    del buffer[: end + 2]
    if line.startswith(b"-"):
        raise redis.ResponseError(line[1:].decode(errors="replace"))
    if line.startswith(b"$"):
        size = int(line[1:])
        while len(buffer) < size + 2:
            chunk = sock.recv(4096)
            if not chunk:
                raise redis.ConnectionError("Redis closed the connection")
            buffer += chunk
        value = bytes(buffer[:size])
        del buffer[: size + 2]
        return value
    return line[1:]


class RedisLoopWrite:
    """One connection of a :class:`~celery_tq.registry.redis.RedisStore`'s, for batches of merge
    calls an event loop sends and reads (one batch at a time)."""

    def __init__(self, store: Any, address: tuple[str, int], params: dict[str, Any]) -> None:
        self.store = store
        self.address, self.params = address, params
        self._sock: socket.socket | None = None
        self._buffer = bytearray()
        self._expected = 0  # replies the batch in flight still waits for
        self._error: str | None = None

    @property
    def closed(self) -> bool:
        return self._sock is None

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def fileno(self) -> int:
        assert self._sock is not None
        return self._sock.fileno()

    def connect(self) -> None:
        host, port = self.address
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.settimeout(self.params.get("socket_connect_timeout") or 5.0)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        try:
            sock.connect((host, port))
            sock.settimeout(self.params.get("socket_timeout") or 30.0)
            buffer = bytearray()
            password, username = self.params.get("password"), self.params.get("username")
            if password:
                auth = [username.encode(), password.encode()] if username else [password.encode()]
                sock.sendall(_command(b"AUTH", *auth))
                _read_reply(sock, buffer)
            sock.sendall(_command(b"SELECT", str(self.params.get("db") or 0).encode()))
            _read_reply(sock, buffer)
            sock.sendall(_command(b"CLIENT", b"SETNAME", CLIENT_NAME.encode()))  # for CLIENT LIST
            _read_reply(sock, buffer)
            sock.sendall(_command(b"SCRIPT", b"LOAD", self.store.merge_script.encode()))
            if _read_reply(sock, buffer).decode() != self.store.merge_sha:
                raise redis.ResponseError("the merge script loaded under another SHA1")
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.close()
        self._sock, self._buffer, self._expected = sock, buffer, 0

    def encode(self, rows: Sequence[Row]) -> bytes:
        """The merge calls of ``rows`` (one per task, folded as the store's write folds them),
        led by their number."""
        store, sha = self.store, self.store.merge_sha.encode()
        calls = [
            _command(b"EVALSHA", sha, b"1", store.key(change["id"]).encode(), *store.script_args(change))
            for change in fold(rows).values()
        ]
        return len(calls).to_bytes(_COUNT, "big") + b"".join(calls)

    def send(self, rows: Sequence[Row], encoded: Sequence[bytes]) -> None:
        sock = self._sock
        if sock is None or self._expected:
            raise NotSent("no idle connection")
        parts = list(encoded) if encoded else [self.encode(rows)]
        expected = sum(int.from_bytes(part[:_COUNT], "big") for part in parts)
        data = memoryview(b"".join(part[_COUNT:] for part in parts))
        try:
            poller: select.poll | None = None
            while data:
                try:
                    sent = sock.send(data)
                except BlockingIOError:
                    if poller is None:
                        poller = select.poll()
                        poller.register(sock.fileno(), select.POLLOUT)
                    if not poller.poll(SEND_TIMEOUT * 1000):
                        raise TimeoutError("Redis took no more of the batch") from None
                    continue
                data = data[sent:]
        except Exception as exc:
            # part of the batch may have gone: the store's own write writes all of it (again: the
            # merge rule holds), and this connection is done with
            self.close()
            raise NotSent(f"the connection failed ({exc})") from exc
        self._expected, self._error = expected, None

    def poll(self) -> bool:
        sock = self._sock
        assert sock is not None
        try:
            while True:
                try:
                    chunk = sock.recv(65536)
                except BlockingIOError:
                    break
                if not chunk:
                    raise redis.ConnectionError("Redis closed the connection")
                self._buffer += chunk
        except OSError as exc:
            self.close()
            raise redis.ConnectionError(str(exc)) from exc
        except redis.ConnectionError:
            self.close()
            raise
        buffer = self._buffer
        start = 0
        while self._expected and (end := buffer.find(b"\r\n", start)) >= 0:
            kind = buffer[start : start + 1]
            if kind == b"-":
                if self._error is None:
                    self._error = buffer[start + 1 : end].decode(errors="replace")
            elif kind != b":":  # the script answers with an integer: anything else is out of step
                self.close()
                raise redis.ResponseError(f"unexpected reply from Redis: {bytes(buffer[start:end])[:80]!r}")
            start = end + 2
            self._expected -= 1
        del buffer[:start]
        if self._expected:
            return False
        if self._error is not None:
            error, self._error = self._error, None
            raise redis.ResponseError(error)
        return True

    def close(self) -> None:
        sock, self._sock, self._expected = self._sock, None, 0
        self._buffer = bytearray()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()


def redis_loop_write(store: Any) -> RedisLoopWrite | None:
    """A loop connection for ``store`` (not connected yet), or None when it connects otherwise
    than over plain TCP (TLS)."""
    if not store.batches_outcomes:
        return None
    params = dict(store.client.connection_pool.connection_kwargs)
    return RedisLoopWrite(store, (params.get("host") or "localhost", int(params.get("port") or 6379)), params)
