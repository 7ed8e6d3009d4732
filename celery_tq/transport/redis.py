"""Reliable, batched Redis transport: ``tq+redis://host:port/db`` (``tq+rediss://`` for TLS).

Wire-compatible with kombu's Redis transport: the same queue and priority-step list keys
(``queue``, ``queue<sep><step>``), the same JSON envelope pushed with LPUSH, the same binding
sets, and fanout (events, broadcast, ``celery inspect``) through kombu's pub/sub code
unchanged. Stock producers, ``celery purge`` and Flower keep working against it.

What differs is consuming (scripts in :mod:`celery_tq.transport.redis_scripts`):

* **Reliable fetch.** One script moves up to the prefetch allowance of messages atomically
  from the queue keys into this consumer's processing lists (highest priority step first,
  round-robin between queues of a step, FIFO inside a key) and applies the pending acks.
  An ack removes the message from the processing list; acks ride on the next fetch and are
  flushed before blocking, by the heartbeat thread and on close.
* **Liveness, not visibility.** A daemon thread refreshes the consumer's heartbeat key every
  ``heartbeat_interval`` s (TTL ``heartbeat_ttl``) and every ``recover_interval`` s runs a
  script that moves the processing lists of consumers whose heartbeat expired back to the
  FRONT of their queues, marked redelivered (``delivery_info['redelivered']``). A live
  worker's long, ETA or prefetched messages are never redelivered behind its back.
  ``max_hold`` (s, off by default) stops the heartbeat when the consumer's event loop has not
  run for that long (a hung worker); with the solo pool it must exceed the longest task.
* **Cut-off links.** The heartbeat thread is also the link's watchdog: its commands time out
  after ``heartbeat_ttl / 4`` s, and when no beat got through for ``heartbeat_ttl / 2`` s the
  link is taken as frozen (a partition drops packets silently: no error, no RST): the sockets
  of every channel of this process on that server are shut down, and for ``heartbeat_ttl`` s
  (or until a beat gets through) new commands on it fail at once instead of blocking the event
  loop on a connect (the event dispatcher's publish did). The worker sees "connection lost" at
  once, drops what it had reserved (Celery's reconnect does) and reconnects under a new
  consumer id. Once no beat
  got through for ``heartbeat_ttl`` s the heartbeat has expired and other workers may have
  recovered this consumer's messages: the channel is **fenced**, it delivers nothing more
  (a fetch reply that arrives late is dropped) and refuses to fetch again.
* **Wake-up.** Producers of this transport add a marker to ``_tq.wake.<queue>`` after the
  message; an idle consumer blocks on the markers of all its queues (BZPOPMIN) and fetches
  when woken. Stock producers write no marker: the block times out after
  ``polling_interval`` (default 1 s) and the consumer fetches anyway.
* **One client per connection**: no ``redis.Redis`` built per call.

Transport options (besides kombu's Redis ones): ``heartbeat_interval`` (2), ``heartbeat_ttl``
(12), ``recover_interval`` (3), ``recover_limit`` (1000), ``fetch_limit`` (100), ``max_hold``
(None). Defaults differ from kombu's for ``socket_timeout`` (30), ``socket_connect_timeout``
(10) and ``health_check_interval`` (10), so a frozen link is noticed.

Scope: Redis >= 6.2, standalone or the primary that Redis Sentinel names:
``tq+sentinel://host:26379[;sentinel://host2:26379]/db`` with ``master_name`` in the transport
options (:mod:`celery_tq.transport.redis_sentinel`: after a failover the worker reconnects to the
new primary and the scripts are loaded again). Redis Cluster is refused at connect time;
``global_keyprefix`` is honoured (every key, the transport's own included, is prefixed).

Members of kombu's classes used here (kombu 5.7.0; ``tests/unit/test_seam.py`` checks they exist):
overridden in ``kombu.transport.redis.Channel``: ``_connparams``, ``_on_connection_disconnect``,
``_put``, ``_get``, ``_brpop_start``, ``_brpop_read``; called or read on it:
``_create_client``, ``_prepare_virtual_host``, ``_get_message_priority``, ``_q_for_pri``,
``_expires``, ``_queue_cycle``, ``_maybe_update_queues_expire``, ``_fanout_queues``, ``_pool``,
``_async_pool``, ``_disconnect_pools``, ``_close_clients``, ``_in_poll``,
``_brpop_sent_at``, ``_closing``; on ``kombu.transport.virtual.QoS``: ``_delivered``,
``_quick_ack``, ``_flush``; on ``kombu.transport.virtual.Transport`` (``channel.connection``):
``_callbacks``, ``_deliver``.
redis-py's private members, and the fanout publish that counts its receivers (task events
paused while no monitor listens), go through :mod:`celery_tq.celery_seam`.
"""

from __future__ import annotations

import collections
import hashlib
import importlib
import logging
import os
import socket
import threading
import uuid
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from queue import Empty
from time import monotonic
from typing import Any

import redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from celery_tq.celery_seam import connection_socket, kombu_parse_url, pool_connections
from celery_tq.errors import ConfigurationError
from celery_tq.transport import redis_scripts

# kombu's stubs describe little of its Redis transport: use it untyped.
kombu_redis: Any = importlib.import_module("kombu.transport.redis")
virtual: Any = importlib.import_module("kombu.transport.virtual")

__all__ = ["Channel", "LinkFrozen", "QoS", "Transport"]

logger = logging.getLogger("celery_tq.transport.redis")

MIN_REDIS = (6, 2)
WAKE = "_tq.wake."
_SSL_KEYS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname")
_checked_servers: set[tuple[Any, ...]] = set()
# This process's channels, so a frozen link found by one consumer's heartbeat also frees the
# others on that server (the event dispatcher's publish blocked on the same link, for one).
_live_channels: weakref.WeakSet[Channel] = weakref.WeakSet()
# Links found frozen (see Channel._tq_watch_link) -> monotonic time the mark lapses. While marked,
# commands fail at once instead of blocking the event loop on a connect that cannot succeed.
_frozen_links: dict[tuple[Any, ...], float] = {}


class LinkFrozen(redis.exceptions.RedisError):
    """A publish or query sent while this process's link to the server is marked frozen.

    Not a connection error on purpose: kombu's ``ensure()`` retries those without end (Celery's
    worker heartbeat publishes that way), which would block the event loop until the link
    returns; this one reaches the caller (kombu's timer logs it) and the loop goes on."""


class _Script:
    """A Lua script sent by EVALSHA, loaded again after NOSCRIPT (restart, failover, flush)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def __call__(self, client: Any, args: Sequence[Any]) -> Any:
        try:
            return client.execute_command("EVALSHA", self.sha, 0, *args)
        except redis.exceptions.NoScriptError:
            client.execute_command("SCRIPT", "LOAD", self.source)
            return client.execute_command("EVALSHA", self.sha, 0, *args)


FETCH = _Script(redis_scripts.FETCH)
RESTORE = _Script(redis_scripts.RESTORE)
RECOVER = _Script(redis_scripts.RECOVER)
ADOPT = _Script(redis_scripts.ADOPT)


def _new_consumer_id() -> str:
    host = socket.gethostname().replace("|", "_")
    return f"{host}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def check_server(client: Any, where: str) -> None:
    """Refuse Redis Cluster and Redis < 6.2 with a message saying what to do instead."""
    cluster = client.info("cluster")
    if int(cluster.get("cluster_enabled", 0) or 0):
        raise ConfigurationError(
            f"tq+redis:// does not support Redis Cluster ({where} has cluster_enabled:1): its scripts "
            "touch several queue keys at once. Use a standalone Redis (a Sentinel-managed primary "
            "works: tq+sentinel://), or the stock redis:// transport."
        )
    version = str(client.info("server").get("redis_version", "0"))
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts < MIN_REDIS:
        raise ConfigurationError(f"tq+redis:// needs Redis >= 6.2 (LMOVE); {where} runs {version}")


class QoS(virtual.QoS):  # type: ignore[misc]
    """Prefetch accounting is kombu's; acks and requeues go to the processing lists."""

    restore_at_shutdown = True

    def ack(self, delivery_tag: str) -> None:
        self.channel._tq_ack(delivery_tag)
        super().ack(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if requeue:
            self.channel._tq_restore([delivery_tag])
        else:
            self.channel._tq_ack(delivery_tag)
        self._quick_ack(delivery_tag)

    def restore_unacked(self) -> list[tuple[BaseException, Any]]:
        self._flush()
        messages = list(self._delivered.items())
        self._delivered.clear()
        try:
            self.channel._tq_restore([tag for tag, _ in reversed(messages)])
        except Exception as exc:
            return [(exc, message) for _, message in messages]
        return []

    def restore_visible(self, *args: Any, **kwargs: Any) -> None:
        # No visibility timeout: called by kombu's timers, it only proves the loop runs.
        self.channel._tq_touch()


class Channel(kombu_redis.Channel):  # type: ignore[misc]
    """kombu's Redis channel with reliable batched fetch (see the module docstring)."""

    QoS = QoS

    heartbeat_interval = 2.0
    heartbeat_ttl = 12.0
    recover_interval = 3.0
    recover_limit = 1000
    fetch_limit = 100
    max_hold: float | None = None
    socket_timeout = 30.0
    socket_connect_timeout = 10.0
    socket_keepalive = True
    health_check_interval = 10

    from_transport_options = (
        *kombu_redis.Channel.from_transport_options,
        "heartbeat_interval",
        "heartbeat_ttl",
        "recover_interval",
        "recover_limit",
        "fetch_limit",
        "max_hold",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._tq_pid = os.getpid()
        self._tq_cid = _new_consumer_id()
        self._tq_lock = threading.Lock()
        self._tq_held: dict[str, tuple[str, bytes]] = {}
        self._tq_acks: collections.deque[tuple[str, bytes]] = collections.deque()
        self._tq_inflight: list[tuple[str, bytes]] = []
        self._tq_no_ack: set[str] = set()
        self._tq_cmd: str | None = None
        self._tq_rotate = False
        self._tq_seen = monotonic()
        self._tq_stop = threading.Event()
        self._tq_thread: threading.Thread | None = None
        self._tq_cached: tuple[Any, Any] | None = None
        self._tq_beat_ok_at = monotonic()
        self._tq_severed = False
        self._tq_fenced = False
        connection = args[0] if args else kwargs["connection"]
        self._tq_check_options(connection.client)
        conninfo = connection.client
        self._tq_link = (type(self), conninfo.hostname, conninfo.port, conninfo.virtual_host)
        self._tq_refuse_if_frozen()  # Celery's reconnect: retry later rather than block on connect
        super().__init__(*args, **kwargs)
        _live_channels.add(self)
        self.brpop_timeout = self.connection.brpop_timeout
        try:
            self._tq_check_server()
        except BaseException:
            self._disconnect_pools()
            self._close_clients()
            raise

    # -- connection ------------------------------------------------------------------------

    def _tq_check_options(self, conninfo: Any) -> None:
        """Refuse what this transport cannot honour, before anything connects."""
        if conninfo.transport_options.get("master_name"):
            raise ConfigurationError(
                "tq+redis:// talks to one Redis server, not to Redis Sentinel: for Sentinel use "
                "tq+sentinel://host:26379[;sentinel://host2:26379]/db (master_name in "
                "broker_transport_options)"
            )

    def _tq_url(self) -> Any:
        return kombu_parse_url(self.connection.client.hostname or "redis://")

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        url = self._tq_url()
        conninfo = self.connection.client
        if url.scheme == "rediss" and not conninfo.ssl:
            self.connection_class = self.connection_class_ssl
        params: dict[str, Any] = super()._connparams(asynchronous=asynchronous)
        params["host"] = url.hostname or "127.0.0.1"
        params["port"] = url.port or kombu_redis.DEFAULT_PORT
        params["db"] = self._prepare_virtual_host(url.path or conninfo.virtual_host)
        if url.scheme == "rediss" and not conninfo.ssl:
            params.setdefault("ssl_cert_reqs", "required")
            params.update({k: v for k, v in url.query.items() if k in _SSL_KEYS})
        return params

    def _tq_server(self) -> str:
        """``host:port`` of the server the channel's pool connects to."""
        params = self.pool.connection_kwargs
        return f"{params.get('host')}:{params.get('port')}"

    def _tq_check_server(self) -> None:
        where = self._tq_server()
        ident = (where, self.pool.connection_kwargs.get("db"), self.global_keyprefix)
        if ident not in _checked_servers:
            check_server(self._tq_client(), where)
            _checked_servers.add(ident)

    def _tq_new_pool(self) -> Any:
        """A pool of its own on the heartbeat's short timeouts (the heartbeat thread, and the
        requeue when a channel closes), released by :meth:`_tq_drop_pool`."""
        timeout = self._tq_beat_timeout()
        params = {**self._connparams(), "socket_timeout": timeout, "socket_connect_timeout": timeout}
        return redis.ConnectionPool(**params)

    def _tq_beat_timeout(self) -> float:
        """Socket timeout of the heartbeat thread: short, so a frozen link fails its beats."""
        return max(1.0, min(self.socket_timeout or self.heartbeat_ttl, self.heartbeat_ttl / 4))

    def _tq_drop_pool(self, pool: Any) -> None:
        pool.disconnect()

    def _tq_client(self) -> Any:
        """The channel's one synchronous client, rebuilt when its pool changes (fork, close)."""
        self._tq_refuse_if_frozen()
        pool = self.pool
        cached = self._tq_cached
        if cached is None or cached[0] is not pool:
            cached = self._tq_cached = (pool, redis.Redis(connection_pool=pool))
        return cached[1]

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        self._tq_refuse_if_frozen(LinkFrozen)  # e.g. an event's publish: fail, don't block the loop
        pool = self.pool
        cached = self.__dict__.get("_tq_kombu_client")
        if cached is None or cached[0] is not pool:
            cached = self.__dict__["_tq_kombu_client"] = (pool, self._create_client())
        yield cached[1]

    def _on_connection_disconnect(self, connection: Any) -> None:
        client = self.__dict__.get("client")
        if client is not None and getattr(client, "connection", None) is connection:
            self._tq_rotate = True
        super()._on_connection_disconnect(connection)

    # -- producing ---------------------------------------------------------------------------

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        pri = self._get_message_priority(message, reverse=False)
        key = self._q_for_pri(queue, pri)
        payload = dumps(message)
        expires = self._expires.get(queue) if self._expires else None
        batch = kwargs.pop("_publish_batch", None)
        if batch is not None:
            batch.add("lpush", key, payload)
            batch.add("zadd", WAKE + queue, {"w": 0})
            for step in self.priority_steps if expires is not None else ():
                batch.add("pexpire", self._q_for_pri(queue, step), expires)
            return
        with self.conn_or_acquire() as client, client.pipeline(transaction=False) as pipe:
            pipe.lpush(key, payload)
            pipe.zadd(WAKE + queue, {"w": 0})
            for step in self.priority_steps if expires is not None else ():
                pipe.pexpire(self._q_for_pri(queue, step), expires)
            pipe.execute()

    # -- consuming ---------------------------------------------------------------------------

    def basic_consume(self, queue: str, no_ack: bool = False, *args: Any, **kwargs: Any) -> Any:
        if no_ack:
            self._tq_no_ack.add(queue)
        else:
            self._tq_no_ack.discard(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def _tq_keys(self, queues: Sequence[str]) -> list[str]:
        return [self._q_for_pri(queue, step) for step in self.priority_steps for queue in queues]

    def _tq_fetch_args(self, queues: Sequence[str], n: int, acks: Sequence[tuple[str, bytes]]) -> list[Any]:
        args: list[Any] = [
            self.global_keyprefix,
            self._tq_cid,
            int(self.heartbeat_ttl * 1000),
            n,
            len(acks),
            len(queues),
            len(self.priority_steps),
        ]
        for src, raw in acks:
            args += (src, raw)
        return [*args, *queues, *self._tq_keys(queues)]

    def _tq_drain_acks(self) -> list[tuple[str, bytes]]:
        acks = []
        while True:
            try:
                acks.append(self._tq_acks.popleft())
            except IndexError:
                return acks

    def _tq_credit(self) -> int:
        credit = self.qos.can_consume_max_estimate()
        return self.fetch_limit if credit is None else max(0, min(credit, self.fetch_limit))

    def _brpop_start(self, timeout: float | None = None) -> None:
        self._tq_refuse_if_fenced()
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        self._tq_touch()
        self._tq_ensure_heartbeat()
        if self._tq_rotate:
            self._tq_rotate_consumer()
        self._tq_inflight = self._tq_inflight + self._tq_drain_acks()
        args = self._tq_fetch_args(queues, max(1, self._tq_credit()), self._tq_inflight)
        connection = self.client.connection
        self._in_poll = connection
        self._brpop_sent_at = monotonic()
        self._tq_cmd = "fetch"
        self._queue_cycle.rotate(queues[0])
        connection.send_command("EVALSHA", FETCH.sha, 0, *args)

    def _tq_wait(self) -> None:
        """Block until a wake-up marker of one of our queues, or the fallback timeout."""
        queues = list(dict.fromkeys(self.active_queues))
        keys = [self.global_keyprefix + WAKE + queue for queue in queues]
        connection = self.client.connection
        self._in_poll = connection
        self._brpop_sent_at = monotonic()
        self._tq_cmd = "wait"
        connection.send_command("BZPOPMIN", *keys, self.brpop_timeout or 1)

    def _brpop_read(self, **options: Any) -> bool:
        self._tq_touch()
        client = self.client
        cmd = self._tq_cmd
        try:
            reply = client.parse_response(client.connection, "EVALSHA" if cmd == "fetch" else "BZPOPMIN")
        except redis.exceptions.NoScriptError:
            # On this very connection: after a failover it may still be on the demoted primary,
            # where the next FETCH then fails READONLY (a connection error under Sentinel).
            self._in_poll = None
            client.execute_command("SCRIPT", "LOAD", FETCH.source)
            raise Empty() from None
        except self.connection_errors:
            self._in_poll = None
            client.connection.disconnect()
            raise
        finally:
            self._tq_cmd = None
        self._in_poll = None
        if cmd != "fetch":
            # Woken by a marker, or the fallback timeout: fetch right away (one round trip)
            # rather than leaving it to the next loop iteration.
            if self._closing or not self.active_queues or not self.qos.can_consume():
                raise Empty()
            self._brpop_start()
            if not self._in_poll:
                raise Empty()
            return self._brpop_read()
        self._tq_inflight = []
        if not reply:
            if not self._tq_acks and not self._closing and self.active_queues:
                self._tq_wait()
            raise Empty()
        for i in range(0, len(reply), 2):
            self._tq_deliver(bytes_to_str(reply[i]), reply[i + 1])
        return True

    def _tq_deliver(self, src: str, raw: bytes) -> None:
        if self._tq_fenced:
            return  # a late fetch reply: the message went back to its queue with our heartbeat
        queue = src.rsplit(self.sep, 1)[0] if self.sep in src else src
        try:
            payload = loads(bytes_to_str(raw))
            properties = payload["properties"]
            tag = properties["delivery_tag"]
        except (TypeError, ValueError, KeyError):
            logger.error("dropping a message that is not a kombu envelope from %r: %r", src, raw[:512])
            self._tq_acks.append((src, raw))
            return
        if payload.pop("redelivered", None):
            properties.setdefault("delivery_info", {})["redelivered"] = True
            headers = payload.get("headers")
            if isinstance(headers, dict):
                headers["redelivered"] = True
        self._tq_held[tag] = (src, raw)
        if queue not in self.connection._callbacks:
            self._tq_restore([tag])
            return
        if queue in self._tq_no_ack:
            del self._tq_held[tag]
            self._tq_acks.append((src, raw))
        self.connection._deliver(payload, queue)

    def _get(self, queue: str) -> dict[str, Any]:
        self._tq_refuse_if_fenced()
        self._tq_ensure_heartbeat()
        with self._tq_lock:
            reply = FETCH(self._tq_client(), self._tq_fetch_args([queue], 1, self._tq_drain_acks()))
        with self.conn_or_acquire() as client:
            self._maybe_update_queues_expire(client, queue)
        if not reply:
            raise Empty()
        src, raw = bytes_to_str(reply[0]), reply[1]
        payload: dict[str, Any] = loads(bytes_to_str(raw))
        if payload.pop("redelivered", None):
            payload["properties"].setdefault("delivery_info", {})["redelivered"] = True
        self._tq_held[payload["properties"]["delivery_tag"]] = (src, raw)
        return payload

    # -- acks, requeues, recovery -------------------------------------------------------------

    def _tq_ack(self, tag: str) -> None:
        entry = self._tq_held.pop(tag, None)
        if entry is not None:
            self._tq_acks.append(entry)

    def _tq_restore(self, tags: Iterable[str]) -> None:
        """Put held messages back at the front of their queues (newest first in ``tags``)."""
        entries = [e for e in (self._tq_held.pop(tag, None) for tag in tags) if e is not None]
        if not entries or os.getpid() != self._tq_pid:
            return
        args: list[Any] = [self.global_keyprefix, self._tq_cid, self.sep]
        for src, raw in entries:
            args += (src, raw)
        with self._tq_lock:
            RESTORE(self._tq_client(), args)

    def _tq_adopt(self, new_cid: str, client: Any = None) -> Any:
        """Move what we still hold to ``new_cid`` ('' = nobody) and requeue everything else."""
        acks = self._tq_inflight + self._tq_drain_acks()
        self._tq_inflight = []
        held = list(self._tq_held.values())[::-1]
        args: list[Any] = [
            self.global_keyprefix,
            self._tq_cid,
            new_cid,
            int(self.heartbeat_ttl * 1000),
            self.sep,
            len(acks),
        ]
        for src, raw in [*acks, *held]:
            args += (src, raw)
        try:
            result = ADOPT(client or self._tq_client(), args)
        except BaseException:
            self._tq_inflight = acks
            raise
        self._tq_cid = new_cid or self._tq_cid
        return result

    def _tq_rotate_consumer(self) -> None:
        """After the fetch connection dropped: a lost fetch reply may have left messages in our
        processing lists that nobody holds. Requeue those under a fresh consumer id."""
        with self._tq_lock:
            _kept, restored = self._tq_adopt(_new_consumer_id())
        self._tq_rotate = False
        if restored:
            logger.warning("requeued %d message(s) whose fetch reply was lost with the connection", restored)

    def _tq_touch(self) -> None:
        self._tq_seen = monotonic()

    def _tq_ensure_heartbeat(self) -> None:
        thread = self._tq_thread
        if (thread is not None and thread.is_alive()) or os.getpid() != self._tq_pid:
            return
        self._tq_stop = threading.Event()
        self._tq_beat_ok_at = monotonic()  # silence counts from the thread's start
        self._tq_thread = threading.Thread(
            target=self._tq_heartbeat_loop,
            args=(self._tq_stop, self._tq_new_pool()),
            name=f"tq-redis-heartbeat-{self._tq_cid}",
            daemon=True,
        )
        self._tq_thread.start()

    def _tq_heartbeat_loop(self, stop: threading.Event, pool: Any) -> None:
        client = redis.Redis(connection_pool=pool)
        next_recover = monotonic()
        warned = False
        missed = 0  # beats missed since the last one that got through
        try:
            while True:
                try:
                    hung = self.max_hold is not None and monotonic() - self._tq_seen > self.max_hold
                    if hung and not warned:
                        logger.warning("consumer loop idle > max_hold=%ss: heartbeat stopped", self.max_hold)
                    warned = hung
                    with self._tq_lock:
                        self._tq_beat(client, alive=not hung and not self._tq_fenced)
                    if missed:
                        logger.warning(
                            "heartbeat of consumer %s reached Redis %s again after %.1f s (%d missed)",
                            self._tq_cid,
                            self._tq_server(),
                            monotonic() - self._tq_beat_ok_at,
                            missed,
                        )
                        missed = 0
                    self._tq_beat_ok_at = monotonic()
                    _frozen_links.pop(self._tq_link, None)
                    if monotonic() >= next_recover:
                        next_recover = monotonic() + self.recover_interval
                        moved = RECOVER(client, [self.global_keyprefix, self.sep, self.recover_limit])
                        if moved:
                            logger.warning("recovered %d message(s) of dead consumers", moved)
                except Exception as exc:  # the loop must outlive broker outages
                    missed += 1
                    silence = monotonic() - self._tq_beat_ok_at
                    # The first miss of an outage is a WARNING (later ones would repeat it every
                    # heartbeat_interval); _tq_watch_link warns again when the link looks frozen
                    # and when the heartbeat has expired.
                    logger.log(
                        logging.WARNING if missed == 1 else logging.DEBUG,
                        "heartbeat of consumer %s missed: Redis %s did not take it (%r); if none gets "
                        "through for heartbeat_ttl=%ss, another worker may recover this worker's "
                        "unacked messages and run them again",
                        self._tq_cid,
                        self._tq_server(),
                        exc,
                        self.heartbeat_ttl,
                    )
                    self._tq_watch_link(silence)
                if stop.wait(self.heartbeat_interval):
                    return
        finally:
            client.close()
            self._tq_drop_pool(pool)

    # -- cut-off links ---------------------------------------------------------------------------

    def _tq_watch_link(self, silence: float) -> None:
        """After ``silence`` s without a beat: sever a frozen link, fence an expired heartbeat."""
        if silence > self.heartbeat_ttl and not self._tq_fenced:
            self._tq_fenced = True
            logger.warning(
                "no heartbeat reached Redis %s for %.0f s (heartbeat_ttl=%ss): consumer %s is "
                "fenced, its unacked messages belong to whoever recovers them",
                self._tq_server(),
                silence,
                self.heartbeat_ttl,
                self._tq_cid,
            )
        if silence > self.heartbeat_ttl / 2 and not self._tq_severed:
            self._tq_severed = True
            logger.warning(
                "no reply from Redis %s for %.0f s: the link looks frozen, dropping the connection",
                self._tq_server(),
                silence,
            )
            _frozen_links[self._tq_link] = monotonic() + self.heartbeat_ttl
            for channel in list(_live_channels):
                if channel._tq_link == self._tq_link and channel._tq_pid == self._tq_pid:
                    channel._tq_sever()

    def _tq_sever(self) -> None:
        """Shut down (not close: the event loop owns them) the sockets of the channel's pool, so
        a read blocked on a frozen link, or an event loop waiting for its reply, gets EOF now.
        (redis-py's pool and socket internals: :mod:`celery_tq.celery_seam`)."""
        connections: list[Any] = []
        client = self.__dict__.get("client")
        if client is not None:
            connections.append(getattr(client, "connection", None))
        for pool in (self._pool, self._async_pool):
            connections += pool_connections(pool)
        for connection in connections:
            sock = connection_socket(connection)
            if sock is not None:
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _tq_frozen(self) -> bool:
        """True while this process's link to the server is marked frozen (lapses on its own)."""
        until = _frozen_links.get(self._tq_link)
        return until is not None and monotonic() < until

    def _tq_refuse_if_frozen(self, error: type[Exception] = redis.exceptions.ConnectionError) -> None:
        if self._tq_frozen():
            where = f"{self._tq_link[1]}:{self._tq_link[2]}"
            raise error(f"the link to Redis {where} looks frozen (no heartbeat reply)")

    def _tq_refuse_if_fenced(self) -> None:
        self._tq_refuse_if_frozen()
        if self._tq_fenced:
            raise redis.exceptions.ConnectionError(
                f"consumer {self._tq_cid} was fenced: its heartbeat expired while Redis was unreachable"
            )

    def _tq_beat(self, client: Any, alive: bool) -> None:
        acks = self._tq_drain_acks()
        prefix = self.global_keyprefix
        with client.pipeline(transaction=False) as pipe:
            if alive:
                pipe.set(f"{prefix}_tq.hb.{self._tq_cid}", 1, px=int(self.heartbeat_ttl * 1000))
            for src, raw in acks:
                pipe.lrem(f"{prefix}_tq.proc.{self._tq_cid}|{src}", 1, raw)
            try:
                pipe.execute()
            except BaseException:
                self._tq_acks.extendleft(reversed(acks))
                raise

    # -- closing -------------------------------------------------------------------------------

    def close(self) -> None:
        if self.closed:
            return
        self._closing = True
        mine = os.getpid() == self._tq_pid
        if mine and self._in_poll:
            with suppress(Exception):
                self.client.parse_response(self.client.connection, "EVALSHA")  # left for ADOPT
            self._in_poll = None
        self._tq_stop.set()
        if mine:
            try:
                self._tq_refuse_if_frozen()
                # On the heartbeat's short timeouts: a link gone silent (no FIN, no RST) must
                # not hold a reconnect or a shutdown for socket_timeout (Celery bounds close()).
                pool = self._tq_new_pool()
                try:
                    with self._tq_lock:
                        self._tq_adopt("", redis.Redis(connection_pool=pool))
                finally:
                    self._tq_drop_pool(pool)
            except Exception as exc:
                logger.warning(
                    "could not requeue the unacked messages of %s (%r); they are recovered "
                    "when its heartbeat expires",
                    self._tq_cid,
                    exc,
                )
        self._tq_held.clear()
        self.qos._delivered.clear()
        self.qos.restore_unacked_once()
        thread = self._tq_thread
        if thread is not None and mine and thread is not threading.current_thread():
            thread.join(5)
        self.connection.cycle.discard(self)
        client = self.__dict__.get("client")
        if client is not None and mine:
            for queue in self._fanout_queues:
                if queue in self.auto_delete_queues:
                    with suppress(Exception):
                        self.queue_delete(queue, client=client)
        cached = self.__dict__.pop("_tq_kombu_client", None)
        for c in (cached[1] if cached else None, self._tq_cached[1] if self._tq_cached else None):
            if c is not None:
                with suppress(Exception):
                    c.close()
        self._tq_cached = None
        self._disconnect_pools()
        self._close_clients()
        virtual.Channel.close(self)


class Transport(kombu_redis.Transport):  # type: ignore[misc]
    """kombu's Redis transport with :class:`Channel`: same event-loop integration."""

    Channel = Channel
    driver_type = "redis"
    driver_name = "redis"
