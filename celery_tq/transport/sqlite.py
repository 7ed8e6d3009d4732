"""Embedded kombu transport storing queues, bindings and messages in one SQLite file.

URL: ``tq+sqlite:////abs/path.db`` or ``tq+sqlite:///relative/path.db`` (as SQLAlchemy reads them).
Transport options: ``polling_interval`` (s, default 0.01), ``consumer_expiry`` (s, 60),
``fanout_ttl`` (s, 300), ``sweep_interval`` (s, 5), ``busy_timeout`` (s, 30),
``batch_size`` (max messages claimed per poll, 32).

Semantics: priority 0..9, higher first, FIFO by autoincrement id within a level and across
all queues a channel consumes. An explicit ``priority=None`` counts as 5; note that kombu's
``Producer.publish`` (hence Celery without a priority) sends 0. A delivered message stays in
the table owned by the consuming channel until acked (at-least-once); it is requeued in
place (same id) on channel close, reject(requeue=True), or when a sweep finds its owner
dead: same host -> its pid is gone (so long tasks are safe), other host -> no heartbeat for
``consumer_expiry`` s. Auto-delete and fanout-bound queues die with their owner.

Members of kombu's virtual transport classes used here (kombu 5.7.0; ``tests/unit/test_seam.py``
checks they exist): overridden in ``kombu.transport.virtual.Channel``: ``_new_queue``,
``_has_queue``, ``_delete``, ``_purge``, ``_size``, ``_put``, ``_get`` (the virtual transport
API); read on it: ``_get_message_priority``, ``_tag_to_queue``; on ``virtual.QoS``:
``_delivered``, ``_dirty``; on ``virtual.Transport`` (``channel.connection``): ``_deliver``.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from queue import Empty
from typing import Any

from kombu.transport import virtual
from kombu.utils.json import dumps, loads
from kombu.utils.uuid import uuid

SCHEMA = """
CREATE TABLE IF NOT EXISTS tq_message (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    priority INTEGER NOT NULL,
    payload TEXT NOT NULL,
    created REAL NOT NULL,
    fanout INTEGER NOT NULL DEFAULT 0,
    redelivered INTEGER NOT NULL DEFAULT 0,
    owner TEXT
);
CREATE INDEX IF NOT EXISTS tq_message_ready
    ON tq_message (queue, priority DESC, id) WHERE owner IS NULL;
CREATE INDEX IF NOT EXISTS tq_message_owner ON tq_message (owner) WHERE owner IS NOT NULL;
CREATE TABLE IF NOT EXISTS tq_binding (
    exchange TEXT NOT NULL, queue TEXT NOT NULL, routing_key TEXT NOT NULL,
    pattern TEXT NOT NULL, PRIMARY KEY (exchange, queue, routing_key)
);
CREATE INDEX IF NOT EXISTS tq_binding_queue ON tq_binding (queue);
CREATE TABLE IF NOT EXISTS tq_queue (
    name TEXT PRIMARY KEY, auto_delete INTEGER NOT NULL, ttl REAL, owner TEXT
);
CREATE TABLE IF NOT EXISTS tq_owner (
    id TEXT PRIMARY KEY, pid INTEGER NOT NULL, host TEXT NOT NULL, seen REAL NOT NULL
);
"""

HOST = socket.gethostname()
TAG_PREFIX = "tq-"
# Connections inherited over fork are never closed in the child: closing would touch
# the parent's WAL locks. Keeping a reference also avoids closing them on GC.
_INHERITED: list[sqlite3.Connection] = []


def db_path(hostname: str) -> Path:
    """Return the database path of a ``sqlite://...`` broker hostname."""
    scheme, sep, rest = hostname.partition("://")
    if scheme != "sqlite" or not sep or not rest.strip("/"):
        raise ValueError(f"expected tq+sqlite:////abs/path.db or tq+sqlite:///relative/path.db: {hostname!r}")
    # SQLAlchemy's form, as for the result backend: the path follows the third slash.
    return Path(rest[1:] if rest.startswith("/") else rest)


def pid_alive(pid: int) -> bool:
    """Return whether a local process exists (zombies count as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return True


def _marks(n: int) -> str:
    return ",".join("?" * n)


class QoS(virtual.QoS):
    """QoS whose acks, rejects and restores act on the rows in the database."""

    channel: Channel

    def ack(self, delivery_tag: str) -> None:
        self.channel._settle([delivery_tag], requeue=False)
        super().ack(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        self.channel._settle([delivery_tag], requeue=requeue)
        super().reject(delivery_tag, requeue=False)  # the row is settled; just forget it

    def restore_unacked(self) -> None:
        # Every unacked row is owned by this channel, including claimed rows that never
        # reached the QoS because a callback raised; requeue them all, in place.
        self.channel._requeue_owned()
        for pending in (self._delivered, self._dirty):
            if pending is not None:
                pending.clear()


class Channel(virtual.Channel):
    """SQLite channel: one sqlite3 connection per channel per process."""

    QoS = QoS
    supports_fanout = True
    default_priority = 5
    _conn: sqlite3.Connection | None = None
    _pid = 0

    def __init__(self, connection: Any, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        opts: dict[str, Any] = connection.client.transport_options
        self.path = db_path(connection.client.hostname or "")
        self.consumer_expiry = float(opts.get("consumer_expiry", 60.0))
        self.fanout_ttl = float(opts.get("fanout_ttl", 300.0))
        self.sweep_interval = float(opts.get("sweep_interval", 5.0))
        self.busy_timeout = float(opts.get("busy_timeout", 30.0))
        self.batch_size = int(opts.get("batch_size", 32))
        self._no_ack: set[str] = set()
        self._swept = self._beat = 0.0

    # -- connection ---------------------------------------------------------------------

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        if self._pid != os.getpid():
            self._connect()
        with self._lock:
            assert self._conn is not None
            yield self._conn

    def _connect(self) -> None:
        if self._conn is not None:
            _INHERITED.append(self._conn)
        self._pid, self._lock, self.owner = os.getpid(), threading.Lock(), uuid()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
        )
        for attempt in range(100):  # switching to WAL may fail with "locked" on first use
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError:
                if attempt == 99:
                    conn.close()
                    raise
                time.sleep(0.05)
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(SCHEMA)
        conn.execute(
            "INSERT OR REPLACE INTO tq_owner VALUES (?,?,?,?)", (self.owner, self._pid, HOST, time.time())
        )
        self._conn = conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """Write transaction taken up front, so a read-then-write cannot deadlock."""
        with self._db() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def close(self) -> None:
        closed, mine = self.closed, self._conn is not None and self._pid == os.getpid()
        super().close()
        if closed or not mine:
            return
        with self._tx() as conn:
            self._forget_owners(conn, [self.owner])
        with self._lock:
            assert self._conn is not None
            self._conn.close()
            self._conn = None

    # -- kombu hooks ----------------------------------------------------------------------

    def prepare_message(
        self, body: Any, priority: int | None = None, *args: Any, **kwargs: Any
    ) -> dict[str, Any]:
        # The base class turns priority 0 into the default; only None means "unset".
        message: dict[str, Any] = super().prepare_message(body, priority, *args, **kwargs)
        message["properties"]["priority"] = self.default_priority if priority is None else priority
        return message

    def _new_queue(self, queue: str, auto_delete: bool = False, **kwargs: Any) -> None:
        args = kwargs.get("arguments") or {}
        ttl = args.get("x-message-ttl")
        with self._db() as conn:
            conn.execute(
                "INSERT INTO tq_queue VALUES (?,?,?,?) ON CONFLICT (name) DO UPDATE SET "
                "auto_delete=excluded.auto_delete, ttl=excluded.ttl",
                (queue, int(auto_delete), ttl / 1000 if ttl else None, None),
            )

    def _has_queue(self, queue: str, **kwargs: Any) -> bool:
        with self._db() as conn:
            sql = "SELECT EXISTS (SELECT 1 FROM tq_queue WHERE name=?)"
            return bool(conn.execute(sql, (queue,)).fetchone()[0])

    def get_table(self, exchange: str) -> list[tuple[str, str, str]]:
        with self._db() as conn:
            sql = "SELECT routing_key, pattern, queue FROM tq_binding WHERE exchange=?"
            return [(r[0], r[1], r[2]) for r in conn.execute(sql, (exchange,))]

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO tq_binding VALUES (?,?,?,?)",
                (exchange, queue, routing_key or "", pattern or ""),
            )
            if self.typeof(exchange).type == "fanout":
                # A fanout queue only makes sense while its binder (its consumer) lives.
                conn.execute("INSERT OR IGNORE INTO tq_queue VALUES (?,1,NULL,NULL)", (queue,))
                conn.execute("UPDATE tq_queue SET owner=? WHERE name=?", (self.owner, queue))

    def queue_unbind(
        self,
        queue: str,
        exchange: str | None = None,
        routing_key: str = "",
        arguments: Any = None,
        **kwargs: Any,
    ) -> None:
        super().queue_unbind(queue, exchange, routing_key, arguments, **kwargs)
        with self._db() as conn:
            conn.execute(
                "DELETE FROM tq_binding WHERE exchange=? AND queue=? AND routing_key=?",
                (exchange, queue, routing_key or ""),
            )

    def queue_delete(
        self, queue: str, if_unused: bool = False, if_empty: bool = False, **kwargs: Any
    ) -> None:
        # The base class only deletes bindings this process declared; ours are shared.
        if if_empty and self._size(queue):
            return
        self.state.queue_bindings_delete(queue)
        self._delete(queue)

    def _delete(self, queue: str, *args: Any, **kwargs: Any) -> None:
        with self._tx() as conn:
            self._drop_queues(conn, [queue])

    def _purge(self, queue: str) -> int:
        with self._db() as conn:
            sql = "DELETE FROM tq_message WHERE queue=? AND owner IS NULL"
            return conn.execute(sql, (queue,)).rowcount

    def _size(self, queue: str) -> int:
        with self._db() as conn:
            sql = "SELECT count(*) FROM tq_message WHERE queue=? AND owner IS NULL"
            return int(conn.execute(sql, (queue,)).fetchone()[0])

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        self._insert([queue], message, fanout=False)

    def _put_fanout(self, exchange: str, message: dict[str, Any], routing_key: str, **kwargs: Any) -> None:
        self._insert([q for _, _, q in self.get_table(exchange)], message, fanout=True)

    def _insert(self, queues: Sequence[str], message: dict[str, Any], fanout: bool) -> None:
        row = (self._get_message_priority(message), dumps(message), time.time(), int(fanout))
        with self._db() as conn:
            conn.executemany(
                "INSERT INTO tq_message (queue, priority, payload, created, fanout) VALUES (?,?,?,?,?)",
                [(q, *row) for q in queues],
            )
        self._housekeep()

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        if no_ack:
            self._no_ack.add(queue)
        with self._db() as conn:  # the consumer of an auto_delete queue owns it
            sql = "UPDATE tq_queue SET owner=? WHERE name=? AND auto_delete"
            conn.execute(sql, (self.owner, queue))
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def basic_cancel(self, consumer_tag: str) -> Any:
        self._no_ack.discard(self._tag_to_queue.get(consumer_tag, ""))
        return super().basic_cancel(consumer_tag)

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        message = super().basic_get(queue, no_ack, **kwargs)
        if message is not None and no_ack:
            self._settle([str(message.delivery_tag)], requeue=False)
        return message

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        for _, payload in self._claim([queue], 1):
            return payload
        raise Empty()

    def _get_many(self, queues: Iterable[str], timeout: float | None = None) -> None:
        """Claim up to the prefetch window in one transaction and deliver it."""
        limit = min(self.qos.can_consume_max_estimate() or self.batch_size, self.batch_size)
        rows = self._claim(list(dict.fromkeys(queues)), max(limit, 1))
        if not rows:
            raise Empty()
        for queue, payload in rows:
            self.connection._deliver(payload, queue)

    # -- storage --------------------------------------------------------------------------

    def _claim(self, queues: list[str], limit: int) -> list[tuple[str, dict[str, Any]]]:
        """Take the most urgent ready rows of ``queues``; no other channel can get them."""
        peek = "SELECT EXISTS (SELECT 1 FROM tq_message WHERE queue=? AND owner IS NULL)"
        pick = (
            "SELECT id, queue, priority, payload, redelivered FROM tq_message "
            "WHERE queue=? AND owner IS NULL ORDER BY priority DESC, id LIMIT ?"
        )
        with self._db() as conn:
            # Read first: an idle poll must not take the write lock.
            if not any(conn.execute(peek, (q,)).fetchone()[0] for q in queues):
                return []
            conn.execute("BEGIN IMMEDIATE")
            try:
                found = [r for q in queues for r in conn.execute(pick, (q, limit)).fetchall()]
                rows = sorted(found, key=lambda r: (-r[2], r[0]))[:limit]
                noack = [r[0] for r in rows if r[1] in self._no_ack]
                ack = [r[0] for r in rows if r[1] not in self._no_ack]
                if noack:
                    conn.execute(f"DELETE FROM tq_message WHERE id IN ({_marks(len(noack))})", noack)
                if ack:
                    sql = f"UPDATE tq_message SET owner=? WHERE id IN ({_marks(len(ack))})"
                    conn.execute(sql, [self.owner, *ack])
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        out = []
        for row_id, queue, _, payload, redelivered in rows:
            message: dict[str, Any] = loads(payload)
            props = message["properties"]
            props["delivery_tag"] = f"{TAG_PREFIX}{row_id}"  # unique even for fanout copies
            if redelivered:
                message["redelivered"] = True
                props.setdefault("delivery_info", {})["redelivered"] = True
            out.append((queue, message))
        return out

    def _settle(self, tags: list[str], requeue: bool) -> None:
        ids = [int(t[len(TAG_PREFIX) :]) for t in tags if str(t).startswith(TAG_PREFIX)]
        if not ids:
            return
        where = f"WHERE id IN ({_marks(len(ids))}) AND owner=?"
        with self._db() as conn:
            if requeue:
                conn.execute(f"UPDATE tq_message SET owner=NULL, redelivered=1 {where}", [*ids, self.owner])
            else:
                conn.execute(f"DELETE FROM tq_message {where}", [*ids, self.owner])

    def _requeue_owned(self) -> None:
        if self._conn is None or self._pid != os.getpid():
            return  # nothing was ever claimed by this process
        with self._db() as conn:
            sql = "UPDATE tq_message SET owner=NULL, redelivered=1 WHERE owner=?"
            conn.execute(sql, (self.owner,))

    def _drop_queues(self, conn: sqlite3.Connection, queues: list[str]) -> None:
        for table, col in (("tq_binding", "queue"), ("tq_message", "queue"), ("tq_queue", "name")):
            conn.execute(f"DELETE FROM {table} WHERE {col} IN ({_marks(len(queues))})", queues)

    def _forget_owners(self, conn: sqlite3.Connection, owners: list[str]) -> None:
        """Requeue the unacked rows of ``owners`` and drop the queues they own."""
        m = _marks(len(owners))
        queues = [r[0] for r in conn.execute(f"SELECT name FROM tq_queue WHERE owner IN ({m})", owners)]
        self._drop_queues(conn, queues)
        conn.execute(f"UPDATE tq_message SET owner=NULL, redelivered=1 WHERE owner IN ({m})", owners)
        conn.execute(f"DELETE FROM tq_owner WHERE id IN ({m})", owners)

    def _housekeep(self) -> None:
        """Refresh our liveness row; now and then reap dead owners and stale messages."""
        now, mono = time.time(), time.monotonic()
        if mono - self._beat >= min(5.0, self.consumer_expiry / 4):
            self._beat = mono
            with self._db() as conn:
                conn.execute(
                    "INSERT OR REPLACE INTO tq_owner VALUES (?,?,?,?)", (self.owner, os.getpid(), HOST, now)
                )
        if mono - self._swept < self.sweep_interval:
            return
        self._swept = mono
        with self._db() as conn:
            owners = conn.execute("SELECT id, pid, host, seen FROM tq_owner").fetchall()
        # Same host: the pid tells (a long task must not look dead); else the heartbeat.
        dead = [
            o
            for o, pid, host, seen in owners
            if (not pid_alive(pid) if host == HOST else seen < now - self.consumer_expiry)
        ]
        with self._tx() as conn:
            if dead:
                self._forget_owners(conn, dead)
            conn.execute(
                "DELETE FROM tq_message WHERE owner IS NULL AND fanout AND created < ?",
                (now - self.fanout_ttl,),
            )
            conn.execute(
                "DELETE FROM tq_message WHERE id IN (SELECT m.id FROM tq_queue q JOIN tq_message"
                " m ON m.queue = q.name WHERE q.ttl IS NOT NULL AND m.owner IS NULL"
                " AND m.created < ? - q.ttl)",
                (now,),
            )

    def drain_events(self, timeout: float | None = None, callback: Any = None) -> Any:
        # Beat even when the prefetch window is full and kombu would not call _get_many.
        self._housekeep()
        return super().drain_events(timeout=timeout, callback=callback)


class Transport(virtual.Transport):
    """The ``tq+sqlite://`` transport."""

    Channel = Channel
    polling_interval = 0.01
    default_port = 0
    driver_type = "sqlite"
    driver_name = "sqlite3"
    connection_errors = (*virtual.Transport.connection_errors, sqlite3.OperationalError)
    # A worker runs its event loop on this transport (Celery's ``should_use_eventloop`` reads
    # ``asynchronous``), polling from a timer of the loop: Celery's event-loop prefork pool then
    # gives each pool process its own pipes. Without it Celery falls back to billiard's pool with
    # one shared job queue and its lock, which a pool process killed while waiting for a job
    # (kill -9, the OOM killer) takes with it: the worker then never runs another task.
    implements = virtual.Transport.implements.extend(
        asynchronous=True, exchange_type=frozenset(["direct", "topic", "fanout"])
    )
    #: Most batches one turn of the event loop delivers before it lets the loop run again.
    batches_per_turn = 8

    def driver_version(self) -> str:
        return sqlite3.sqlite_version

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        """Poll from ``loop``: again on its next turn after a delivery, else after
        ``polling_interval``; stops once the connection is closed (a reconnect registers anew)."""

        def poll() -> None:
            if not self.channels:  # closed: close_connection took its channels
                return
            delivered = False
            try:
                for _ in range(self.batches_per_turn):
                    self.drain_events(connection, timeout=0)
                    delivered = True
            except (TimeoutError, Empty):  # socket.timeout: nothing to deliver
                pass
            finally:
                if self.channels:
                    if delivered:
                        loop.call_soon(poll)
                    else:
                        loop.call_later(self.polling_interval or 0.01, poll)

        loop.call_soon(poll)


def waiting_counts(path: Path) -> dict[tuple[str, int], int]:
    """Messages waiting (not reserved by a consumer) per ``(queue, priority)``, read-only."""
    if not path.exists():
        return {}
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
        rows = db.execute(
            "SELECT queue, priority, count(*) FROM tq_message WHERE owner IS NULL GROUP BY 1, 2"
        ).fetchall()
    return {(str(q), int(p)): int(n) for q, p, n in rows}
