"""Acks without a wait on kombu's stock Redis transport (``redis://``): a consumer bootstep.

kombu's Redis transport emulates acks: a delivered message waits in the ``unacked`` hash (and its
``unacked_index`` sorted set) until the worker's ack removes it, with one ``ZREM``/``HDEL``
pipeline for which the worker's event loop waits a full round trip, once per task. On a busy
prefork worker those waits are what caps throughput (``benchmarks/registry.py``).

:class:`PipelinedRedisAcks` sends that same ``ZREM``/``HDEL`` on a connection of its own (made
from the channel's own connection settings: address, database, password, TLS, key prefix; named
``celery-tq-acks`` in ``CLIENT LIST``) and goes on; the event loop reads the replies when the
socket is readable. What does not change: an ack still leaves only after the task's outcome is
stored (Celery and the hand-over decide when, as before), kombu's bookkeeping of the channel's
prefetch is updated at once as kombu's own ack does, and a message whose ack never reaches Redis
is what it is with plain Celery when a worker dies just before its ack: kombu restores it after
the visibility timeout, marked redelivered, and celery-tq's request skips a task whose record
has ended.

Acks whose replies are not in when the connection fails are sent again through kombu's own path
(the channel's client), and the connection is made again on a later ack (at most once a second).
When the consumer stops (warm shutdown, lost broker connection), the step waits for the replies
in flight (up to the broker's socket timeout, else :data:`FLUSH_TIMEOUT`), then hands acks back
to kombu. Only the exact ``kombu.transport.redis.Transport`` with an event loop (prefork) is
wired: Sentinel, celery-tq's ``tq+redis://`` (which sends acks with its next fetch) and the solo
or threads pools keep their own acks. ``tq_pipeline_redis_acks = False`` turns it off.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from typing import Any

from celery import bootsteps
from kombu.transport import virtual

from celery_tq import celery_seam
from celery_tq.settings import settings_for

__all__ = ["CLIENT_NAME", "FLUSH_TIMEOUT", "PipelinedRedisAcks", "RedisAcks"]

logger = logging.getLogger("celery_tq")

CLIENT_NAME = "celery-tq-acks"
FLUSH_TIMEOUT = 5.0  # seconds a stopping consumer waits for the replies of acks in flight
RECONNECT_DELAY = 1.0  # seconds on kombu's own acks after the connection failed


def _stock_redis_transport(connection: Any) -> bool:
    try:
        from kombu.transport import redis as kombu_redis
    except ImportError:  # kombu without redis-py: nothing to wire
        return False
    return type(getattr(connection, "transport", None)) is kombu_redis.Transport


class RedisAcks:
    """The acks of one channel of kombu's Redis transport, pipelined on a connection of their own
    (the event loop's thread only; every other caller gets kombu's own ack)."""

    def __init__(self, channel: Any, hub: Any) -> None:
        self.channel, self.hub = channel, hub
        self.qos = channel.qos
        self.kombu_ack = self.qos.ack  # kombu's own (bound), for fallbacks and other threads
        prefix = getattr(channel, "global_keyprefix", "") or ""
        self.index_key = prefix + channel.unacked_index_key
        self.hash_key = prefix + channel.unacked_key
        self.loop_thread = threading.get_ident()
        self.in_flight: collections.deque[str] = collections.deque()  # tags sent, replies not all in
        self.replies = 0  # replies read for the oldest tag in flight (each ack has two)
        self.conn: Any = None  # a redis-py Connection
        self.sock: Any = None
        self.connect_after = 0.0
        self.installed = False

    # --- wiring ------------------------------------------------------------------------------

    def install(self) -> None:
        self._connect()
        self.qos.ack = self.ack
        self.installed = True

    def uninstall(self, timeout: float) -> None:
        """Wait for the replies in flight (then kombu's path for the rest) and give acks back."""
        if self.installed:
            self.installed = False
            with contextlib.suppress(AttributeError):
                del self.qos.ack  # the class's method again
        self._flush(timeout)
        self._close()

    # --- the ack -------------------------------------------------------------------------------

    def ack(self, delivery_tag: str) -> None:
        """``QoS.ack``: send the removal and go on (kombu's own ack off the loop or unconnected)."""
        if threading.get_ident() != self.loop_thread or (self.conn is None and not self._connect()):
            self.kombu_ack(delivery_tag)
            return
        conn = self.conn
        try:
            conn.send_packed_command(
                conn.pack_commands(
                    (("ZREM", self.index_key, delivery_tag), ("HDEL", self.hash_key, delivery_tag))
                ),
                check_health=False,
            )
        except Exception as exc:
            self._lost(exc)  # sends the acks in flight through kombu's path
            self.kombu_ack(delivery_tag)
            return
        self.in_flight.append(delivery_tag)
        virtual.QoS.ack(self.qos, delivery_tag)  # the channel's prefetch count, as kombu's ack does

    def _on_readable(self) -> None:
        try:
            self._read(block_for=0.0)
        except Exception as exc:
            self._lost(exc)

    def _read(self, block_for: float) -> None:
        """Read every reply that is in (waiting up to ``block_for`` for the first one)."""
        conn, wait = self.conn, block_for
        while conn is not None and conn.can_read(timeout=wait):
            wait = 0.0
            try:
                conn.read_response(disable_decoding=True)
            except Exception as exc:
                if not _is_error_reply(exc):
                    raise
                # Redis refused one removal (a wrong type under the key): kombu's own ack would
                # fail the same way; the message is restored after the visibility timeout
                logger.warning("celery-tq: Redis refused an ack of %r: %s", self._oldest(), exc)
            if not self.in_flight:
                raise ConnectionError("a reply from Redis that no ack waits for")
            self.replies += 1
            if self.replies == 2:
                self.replies = 0
                self.in_flight.popleft()

    def _oldest(self) -> str | None:
        return self.in_flight[0] if self.in_flight else None

    # --- the connection ------------------------------------------------------------------------

    def _connect(self) -> bool:
        if time.monotonic() < self.connect_after:
            return False
        conn = None
        try:
            conn = self.channel.pool.make_connection()
            conn.connect()
            conn.send_command("CLIENT", "SETNAME", CLIENT_NAME)  # for CLIENT LIST
            conn.read_response()
            sock = celery_seam.connection_socket(conn)
            if sock is None:
                raise ConnectionError("the connection has no socket")
            self.hub.add_reader(sock, self._on_readable)
        except Exception as exc:
            logger.debug("celery-tq: acks go through kombu's own path (%r)", exc)
            self.connect_after = time.monotonic() + RECONNECT_DELAY
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.disconnect()
            return False
        self.conn, self.sock, self.replies = conn, sock, 0
        return True

    def _lost(self, exc: BaseException) -> None:
        logger.debug("celery-tq: the ack connection failed (%r); kombu's path takes its acks", exc)
        tags = list(self.in_flight)
        self._close()
        self.connect_after = time.monotonic() + RECONNECT_DELAY
        for tag in tags:
            self._kombu_remove(tag)

    def _flush(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        try:
            while self.in_flight and self.conn is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no reply from Redis in {timeout:.1f} s")
                self._read(block_for=left)
        except Exception as exc:
            self._lost(exc)

    def _close(self) -> None:
        conn, sock, self.conn, self.sock = self.conn, self.sock, None, None
        self.in_flight.clear()
        self.replies = 0
        if sock is not None:
            with contextlib.suppress(Exception):
                self.hub.remove_reader(sock)
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.disconnect()

    def _kombu_remove(self, tag: str) -> None:
        """The removal again, on the channel's own client (kombu's key prefix applies there)."""
        try:
            with self.channel.conn_or_acquire() as client:
                client.pipeline().zrem(self.channel.unacked_index_key, tag).hdel(
                    self.channel.unacked_key, tag
                ).execute()
        except Exception as exc:
            logger.error(
                "celery-tq: the ack of %r did not reach Redis (%r); kombu restores the message after "
                "its visibility timeout and celery-tq skips a task whose record has ended",
                tag,
                exc,
            )


def _is_error_reply(exc: BaseException) -> bool:
    import redis

    return isinstance(exc, redis.ResponseError)


class PipelinedRedisAcks(bootsteps.StartStopStep):
    """Consumer step: on ``redis://`` with an event loop, acks do not wait for Redis's reply."""

    requires = ("celery.worker.consumer.tasks:Tasks",)
    label = "tq-redis-acks"

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.on = bool(settings_for(c.app).pipeline_redis_acks)
        self.acks: RedisAcks | None = None

    def start(self, c: Any) -> None:
        consumer = getattr(c, "task_consumer", None)
        hub = getattr(c, "hub", None)
        if not self.on or hub is None or consumer is None or not _stock_redis_transport(c.connection):
            return
        acks = RedisAcks(consumer.channel, hub)
        acks.install()
        self.acks = acks

    def stop(self, c: Any) -> None:
        acks, self.acks = self.acks, None
        if acks is not None:
            options = getattr(c.connection, "transport_options", None) or {}
            acks.uninstall(float(options.get("socket_timeout") or FLUSH_TIMEOUT))

    shutdown = stop
