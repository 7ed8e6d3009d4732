"""A PostgreSQL write an event loop drives: send a batch, read its outcome when the socket is readable.

The worker's main process writes the outcomes its pool processes hand over
(:mod:`celery_tq.worker.handoff`) on its event loop, with no thread: a thread of its own shares the
main process's GIL with the loop, and each batch would wake it, then the loop (measured: about
0.2 ms of main-process CPU per task). The statement is the store's own upsert
(:func:`celery_tq.registry.sql_merge.task_upsert`), prepared once per connection, its parameters
sent as text. Anything out of the ordinary (no connection yet, a lost one, a value libpq cannot
send as text, an error from PostgreSQL) is the caller's to hand to the store's own blocking write,
which retries while the store is down and isolates a record the store refuses.

Connecting is blocking (:meth:`LoopWrite.connect`): the caller does it off the loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from celery_tq.registry.loop_write import NotSent
from celery_tq.registry.record import Row, fold
from celery_tq.registry.sql_merge import NOTIFY_CHANNEL_SQL, task_upsert_libpq, task_upsert_numbered

if TYPE_CHECKING:
    from celery_tq.registry.sql import SqlStore

__all__ = ["LoopWrite", "NotSent", "sql_loop_write"]

_ONE, _MANY = b"tq_loop_one", b"tq_loop_many"


class LoopWrite:
    """One PostgreSQL connection of a store's, for writes an event loop drives (one at a time)."""

    def __init__(
        self, conninfo: str, connect_args: dict[str, Any], before: Callable[[], None] | None = None
    ) -> None:
        self.conninfo, self.connect_args = conninfo, connect_args
        self._before = before  # run before connecting: the store creates its tables
        self._conn: Any = None
        self._channel = b""
        self._busy = False
        self._error: str | None = None

    @property
    def closed(self) -> bool:
        return self._conn is None

    @property
    def connected(self) -> bool:
        conn = self._conn
        return conn is not None and not conn.closed and not conn.broken

    def fileno(self) -> int:
        return int(self._conn.pgconn.socket)

    def connect(self) -> None:
        """Open the connection and prepare the statements (blocking: not on the loop)."""
        import psycopg

        if self._before is not None:
            self._before()
        conn = psycopg.connect(self.conninfo, autocommit=True, **self.connect_args)
        try:
            conn.execute("SET synchronous_commit = on")  # every batch holds outcomes
            row = conn.execute(f"SELECT {NOTIFY_CHANNEL_SQL}").fetchone()
            channel = str(row[0]) if row else ""
            pgconn = conn.pgconn
            for name, rows in ((_ONE, 1), (_MANY, 2)):
                result = pgconn.prepare(name, task_upsert_numbered(rows))
                if result.status != psycopg.pq.ExecStatus.COMMAND_OK:
                    raise psycopg.OperationalError(result.error_message.decode(errors="replace"))
        except BaseException:
            conn.close()
            raise
        self.close()
        self._conn, self._channel, self._busy = conn, channel.encode(), False

    def encode(self, rows: Sequence[Row]) -> bytes | None:
        return None  # the parameters are built from every row of the batch at once

    def send(self, rows: Sequence[Row], encoded: Sequence[bytes] = ()) -> None:
        """Send the upsert of ``rows``; :meth:`poll` tells when it is done. ``NotSent`` when it
        cannot go this way (nothing was sent)."""
        if self._busy or not self.connected:
            raise NotSent("no idle connection")
        folded = fold(rows)
        ordered = [folded[i] for i in sorted(folded)]  # the store's lock order (SqlStore.write)
        params = task_upsert_libpq(ordered, self._channel)
        if params is None:  # libpq sends text parameters as C strings
            raise NotSent("a value holds a NUL character")
        try:
            self._conn.pgconn.send_query_prepared(_ONE if len(ordered) == 1 else _MANY, params)
        except Exception as exc:
            self.close()
            raise NotSent(f"the connection failed ({exc})") from exc
        self._busy, self._error = True, None

    def poll(self) -> bool:
        """Read what arrived (on the loop, when the socket is readable): True once the batch is
        committed, False while it is still running. Raises when it failed; the connection is
        closed if it broke (nothing of the batch is then known to be written)."""
        import psycopg

        pgconn = self._conn.pgconn
        try:
            pgconn.consume_input()
            while not pgconn.is_busy():
                result = pgconn.get_result()
                if result is None:
                    self._busy = False
                    if self._error is not None:
                        raise psycopg.Error(self._error)
                    return True
                if result.status not in (psycopg.pq.ExecStatus.TUPLES_OK, psycopg.pq.ExecStatus.COMMAND_OK):
                    self._error = result.error_message.decode(errors="replace").strip() or "failed"
        except psycopg.OperationalError:
            self.close()
            raise
        return False

    def close(self) -> None:
        conn, self._conn, self._busy = self._conn, None, False
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()


def sql_loop_write(store: SqlStore) -> LoopWrite | None:
    """A loop connection for a PostgreSQL ``SqlStore`` (not connected yet); None for a store whose
    outcomes it cannot write (SQLite; PgBouncer in transaction mode, which has no prepared
    statements)."""
    if store.is_sqlite or store.through_pgbouncer:
        return None
    from celery_tq.registry.sql_conn import pg_params

    url, args, _ = pg_params(store.direct.url)
    conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
    return LoopWrite(conninfo, args, before=store.ensure_schema)
