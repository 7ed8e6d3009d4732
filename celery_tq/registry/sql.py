"""``sqlite:///path`` and ``postgresql://...``: one SQLAlchemy Core store for both.

Tables: ``tq_tasks`` (one row per task; indexes on state, name, queue, root id, submitted_at),
``tq_task_tags`` (one row per task and tag, carrying the task's state and submitted_at so a
query by tag + state is one index range, newest first), ``tq_kv`` (group/chord bookkeeping) and
``tq_schema`` (the schema version). A batch of writes is one multi-row upsert that merges
forward-only on the server (:mod:`.sql_merge`), over the store's direct connection
(:mod:`.sql_conn`); queries and the key-value space go through SQLAlchemy; ``get()`` is woken
by a listening session (:mod:`.sql_listen`).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    Column,
    Double,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    and_,
    create_engine,
    delete,
    event,
    exists,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.sql import ColumnElement, FromClause

from celery_tq.errors import StorageError
from celery_tq.registry.kvlist import by_score, scored
from celery_tq.registry.record import COLUMNS, FINAL, STATE_MAX, TERMINAL, Query, Row, fold
from celery_tq.registry.sql_conn import DirectConnection, pg_params, sqlite_args
from celery_tq.registry.sql_listen import DoneListener
from celery_tq.registry.sql_merge import (
    NOTIFY_CHANNEL_SQL,
    ends_a_task,
    tag_upsert_sqlite,
    task_upsert,
    task_upsert_libpq,
    task_upsert_numbered,
    task_upsert_params,
)

__all__ = ["SCHEMA_VERSION", "SqlStore"]

_T = TypeVar("_T")

# 2: state names up to 64 characters (custom states); terminal states are final
# 3: deliveries (runs started) and the id of the run counted last
SCHEMA_VERSION = 3
_PREPARED_ONE, _PREPARED_MANY = b"tq_write_one", b"tq_write_many"  # SqlStore.write's, per session
ID = String(155)
RUN_ID_MAX = 64
metadata = MetaData()
tasks = Table(
    "tq_tasks",
    metadata,
    Column("id", ID, primary_key=True),
    Column("name", String(255)),
    Column("state", String(STATE_MAX), nullable=False),
    Column("progress", Integer, nullable=False),
    Column("priority", SmallInteger),
    Column("tags", Text),
    Column("queue", String(255)),
    Column("worker", String(255)),
    Column("args_repr", Text),
    Column("kwargs_repr", Text),
    Column("submitted_at", Double),
    Column("started_at", Double),
    Column("finished_at", Double),
    Column("runtime", Double),
    Column("retries", Integer),
    Column("result", Text),
    Column("error", Text),
    Column("meta", Text),
    Column("parent_id", ID),
    Column("root_id", ID),
    Column("group_id", ID),
    Column("deliveries", Integer),
    Column("run_id", String(RUN_ID_MAX)),
    Index("tq_tasks_state", "state", "submitted_at"),
    Index("tq_tasks_name", "name", "submitted_at"),
    Index("tq_tasks_queue", "queue", "submitted_at"),
    Index("tq_tasks_submitted", "submitted_at"),
    Index("tq_tasks_root", "root_id"),
)
task_tags = Table(
    "tq_task_tags",
    metadata,
    Column("task_id", ID, primary_key=True),
    Column("tag", String(64), primary_key=True),
    Column("state", String(STATE_MAX)),
    Column("submitted_at", Double),
    Index("tq_task_tags_state", "tag", "state", "submitted_at"),
    Index("tq_task_tags_recent", "tag", "submitted_at"),
)
kv = Table(
    "tq_kv",
    metadata,
    Column("key", String(255), primary_key=True),
    Column("value", LargeBinary),
    Column("expires_at", Double),
)
schema = Table("tq_schema", metadata, Column("version", Integer, primary_key=True))


_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()  # engines a forked child must not share
_AT_FORK_REGISTERED = False


def _forget_parents_connections() -> None:
    for engine in list(_ENGINES):
        engine.dispose(close=False)  # SQLAlchemy's recipe: the parent's sockets stay the parent's


def _fork_safe(engine: Engine) -> Engine:
    """A process forked after ``engine`` connected starts with an empty pool: it neither uses
    nor closes (``close()``, ``dispose()``) the pooled connections of its parent."""
    global _AT_FORK_REGISTERED
    if not _AT_FORK_REGISTERED:
        os.register_at_fork(after_in_child=_forget_parents_connections)
        _AT_FORK_REGISTERED = True
    _ENGINES.add(engine)
    return engine


class SqlStore:
    """Records in SQLite or PostgreSQL (psycopg 3); schema created on first use."""

    #: A prefork worker's pool processes hand their outcomes to its main process, which
    #: writes them in batches (:mod:`celery_tq.worker.handoff`): a commit costs more than a row.
    batches_outcomes = True

    def __init__(self, url: str) -> None:
        self.url = url
        parsed = make_url(url)
        if parsed.drivername in {"postgresql", "postgres"}:
            parsed = parsed.set(drivername="postgresql+psycopg")
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        self.through_pgbouncer = False
        if self.is_sqlite:
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = create_engine(parsed, connect_args=sqlite_args())
            _sqlite_locking(self.engine)
        else:
            engine_url, args, self.through_pgbouncer = pg_params(parsed)
            self.engine = _fork_safe(
                create_engine(engine_url, pool_pre_ping=True, pool_size=2, connect_args=args)
            )
        self.direct = DirectConnection(parsed, self.is_sqlite)
        self.dialect = "sqlite" if self.is_sqlite else "postgresql"
        self.listener = DoneListener(self.direct)  # get()'s wake-ups (PostgreSQL)
        self._ready = False
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close this process's connections (the store opens them again when used)."""
        self.direct.close()
        self.engine.dispose()
        self.listener.close()

    def published(self, task_id: str) -> None:
        """PostgreSQL: ``task_id`` was sent while this process listens, so its outcome's notice
        will reach the listener; its first wait then need not read the record first."""
        self.listener.published(task_id)

    def wait_for_outcome(self, task_id: str, seconds: float, is_ready: Callable[[str], bool]) -> bool:
        """PostgreSQL: return when ``task_id``'s terminal write is notified on the registry's
        ``tq_done_*`` channel (or after ``seconds``: :class:`.sql_listen.DoneListener`); False
        where the store cannot wake a waiter (SQLite, PgBouncer): poll."""
        if self.is_sqlite or self.through_pgbouncer:
            return False
        self.listener.wait(task_id, seconds, is_ready)
        return True

    def notified_row(self, task_id: str) -> Row | None:
        """The merged row the wake-up for ``task_id`` carried (once), or None: then read it."""
        return self.listener.notified_row(task_id)

    def ensure_schema(self) -> None:
        """Create the tables, once per process (every call before a read or write does this)."""
        if self._ready:
            return
        with self._lock:
            for attempt in range(10):
                try:
                    metadata.create_all(self.engine)
                    with self._writing() as conn:
                        found = conn.execute(select(schema.c.version)).scalar()
                        if found is None:
                            conn.execute(insert(schema).values(version=SCHEMA_VERSION))
                        elif found in (1, 2):
                            if found == 1:
                                _migrate_from_1(conn, self.is_sqlite)
                            _migrate_from_2(conn, self.is_sqlite)
                            conn.execute(update(schema).values(version=SCHEMA_VERSION))
                        elif found != SCHEMA_VERSION:
                            raise StorageError(
                                f"registry schema version {found} in {self.url}; "
                                f"this celery-tq uses {SCHEMA_VERSION}"
                            )
                    self._ready = True
                    if not self.is_sqlite:  # the pooled connection is for queries: not kept open
                        self.engine.pool.dispose()  # in every process that only writes
                    return
                except DBAPIError:  # another process creating the same tables
                    if attempt == 9:
                        raise
                    time.sleep(0.1 * (attempt + 1))

    @contextmanager
    def _writing(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            conn.execution_options(tq_write=True)
            with conn.begin():
                yield conn

    def write(self, changes: Sequence[Row]) -> None:
        self.ensure_schema()
        folded = fold(changes)
        ids = sorted(folded)  # one lock order for every writer: concurrent batches never deadlock
        statement = task_upsert(self.dialect, len(ids))
        if self.is_sqlite:
            params = [folded[i].get(c) for i in ids for c in COLUMNS]
            tags = tag_upsert_sqlite(ids)

            def work(conn: Any) -> None:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.execute(statement, params)
                    conn.execute(tags, ids)
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
        else:
            # Only a write that ends a task waits for PostgreSQL's WAL flush: QUEUED, STARTED and
            # progress states commit asynchronously (visible at once; a PostgreSQL crash can lose
            # the last fraction of a second of them, never an outcome). Through PgBouncer a
            # session setting would leak to other clients: the server's setting applies there.
            rows = [folded[i] for i in ids]
            durable = ends_a_task(rows)

            def work(conn: Any) -> None:
                channel = self.direct.session_value(conn, NOTIFY_CHANNEL_SQL)
                if not self.through_pgbouncer:  # PgBouncer's transaction mode: nothing prepared
                    self.direct.synchronous_commit(conn, durable)
                    raw = task_upsert_libpq(rows, channel.encode())
                    if raw is not None:
                        name = _PREPARED_ONE if len(rows) == 1 else _PREPARED_MANY
                        self.direct.execute_prepared(conn, name, task_upsert_numbered(len(rows)), raw)
                        return
                conn.execute(statement, [*task_upsert_params(rows), channel if durable else None])

        self.direct.run(work)

    def read(self, task_ids: Sequence[str]) -> list[Row | None]:
        self.ensure_schema()
        if not task_ids:
            return []
        mark = "?" if self.is_sqlite else "%s"
        sql = f"SELECT {', '.join(COLUMNS)} FROM tq_tasks WHERE id IN ({', '.join([mark] * len(task_ids))})"

        def work(conn: Any) -> list[Any]:
            return list(conn.execute(sql, list(task_ids)).fetchall())

        found = {}
        for values in self.direct.run(work):
            row = {c: v for c, v in zip(COLUMNS, values, strict=True) if v is not None}
            found[row["id"]] = row
        return [found.get(i) for i in task_ids]

    def query(self, query: Query) -> list[Row]:
        self.ensure_schema()
        source, conditions, order, _ = _filters(query)
        ordered = order.asc() if query.oldest_first else order.desc()
        stmt = select(tasks).select_from(source).where(*conditions).order_by(ordered).limit(query.limit)
        with self.engine.connect() as conn:
            return [_row(r) for r in conn.execute(stmt)]

    def counts(self, query: Query) -> dict[str, int]:
        self.ensure_schema()
        source, conditions, _, state = _filters(query)
        stmt = select(state, func.count()).select_from(source).where(*conditions).group_by(state)
        with self.engine.connect() as conn:
            return {str(s): int(n) for s, n in conn.execute(stmt)}

    def delete(self, task_id: str) -> None:
        self.ensure_schema()
        with self._writing() as conn:
            conn.execute(delete(task_tags).where(task_tags.c.task_id == task_id))
            conn.execute(delete(tasks).where(tasks.c.id == task_id))

    def purge(self, before: float) -> int:
        self.ensure_schema()
        with self._writing() as conn:
            conn.execute(delete(task_tags).where(task_tags.c.submitted_at < before))
            purged = conn.execute(delete(tasks).where(tasks.c.submitted_at < before)).rowcount
            conn.execute(delete(kv).where(kv.c.expires_at < time.time()))
        return int(purged or 0)

    def kv_get(self, keys: Sequence[str]) -> list[bytes | None]:
        self.ensure_schema()
        with self.engine.connect() as conn:
            found = dict(
                conn.execute(select(kv.c.key, kv.c.value).where(kv.c.key.in_(keys), _live_rows())).all()
            )
        return [found.get(k) for k in keys]

    def kv_set(self, key: str, value: bytes, ttl: float | None) -> None:
        self._kv_update(key, lambda old: value, ttl)

    def kv_delete(self, key: str) -> None:
        self.ensure_schema()
        with self._writing() as conn:
            conn.execute(delete(kv).where((kv.c.key == key) | _members_of(key)))

    def kv_incr(self, key: str, ttl: float | None) -> int:
        return int(self._kv_update(key, lambda old: str(int(old or b"0") + 1).encode(), ttl, keep_ttl=True))

    def kv_expire(self, key: str, ttl: float | None) -> None:
        self.ensure_schema()
        with self._writing() as conn:
            conn.execute(update(kv).where(kv.c.key == key).values(expires_at=_expiry(ttl)))

    def kv_claim(self, key: str, token: bytes, ttl: float) -> bool:
        def claim(conn: Connection) -> bool:
            old = conn.execute(self._locked(select(kv.c.expires_at).where(kv.c.key == key))).first()
            if old is not None and _live(old.expires_at):
                return False
            values = {"value": token, "expires_at": _expiry(ttl)}
            if old is None:
                conn.execute(insert(kv).values(key=key, **values))
            else:
                conn.execute(update(kv).where(kv.c.key == key).values(**values))
            return True

        return self._write_retrying(claim)  # (a concurrent first claim holds the key when retried)

    def kv_release(
        self, key: str, token: bytes, drop: Sequence[str], value: bytes, ttl: float | None
    ) -> bool:
        self.ensure_schema()
        with self._writing() as conn:
            old = conn.execute(
                self._locked(select(kv.c.value, kv.c.expires_at).where(kv.c.key == key))
            ).first()
            if old is None or bytes(old.value) != token or not _live(old.expires_at):
                return False
            for name in drop:
                conn.execute(delete(kv).where((kv.c.key == name) | _members_of(name)))
            conn.execute(update(kv).where(kv.c.key == key).values(value=value, expires_at=_expiry(ttl)))
        return True

    def kv_push(self, key: str, member: str, score: float, value: bytes, ttl: float | None) -> int:
        # The list's size at ``key`` (locked, so pushes serialize) and one row per member.
        expires = _expiry(ttl)

        def push(conn: Connection) -> int:
            size = conn.execute(self._locked(select(kv.c.value).where(kv.c.key == key))).scalar()
            count = int(size or b"0")
            name = f"{key}{_MEMBER}{member}"
            if conn.execute(select(kv.c.key).where(kv.c.key == name)).first() is None:
                entry = {"key": name, "value": scored(score, value), "expires_at": expires}
                conn.execute(insert(kv).values(**entry))
                count += 1
            values = {"value": str(count).encode(), "expires_at": expires}
            if size is None:
                conn.execute(insert(kv).values(key=key, **values))
            else:
                conn.execute(update(kv).where(kv.c.key == key).values(**values))
                conn.execute(update(kv).where(_members_of(key)).values(expires_at=expires))
            return count

        return self._write_retrying(push)  # (a concurrent first push to the same list: count again)

    def kv_list(self, key: str) -> list[bytes]:
        self.ensure_schema()
        with self.engine.connect() as conn:
            return by_score(conn.execute(select(kv.c.value).where(_members_of(key), _live_rows())).scalars())

    def _locked(self, stmt: Any) -> Any:
        """``stmt`` locking the rows it reads until the transaction ends (SQLite: ``BEGIN
        IMMEDIATE`` already serializes writers)."""
        return stmt if self.is_sqlite else stmt.with_for_update()

    def _kv_update(self, key: str, compute: Any, ttl: float | None, keep_ttl: bool = False) -> bytes:
        def update_value(conn: Connection) -> bytes:
            stmt = select(kv.c.value, kv.c.expires_at).where(kv.c.key == key)
            old = conn.execute(self._locked(stmt)).first()
            value: bytes = compute(old.value if old else None)
            expires = old.expires_at if (old and keep_ttl) else _expiry(ttl)
            if old is None:
                conn.execute(insert(kv).values(key=key, value=value, expires_at=expires))
            else:
                conn.execute(update(kv).where(kv.c.key == key).values(value=value, expires_at=expires))
            return value

        return self._write_retrying(update_value)

    def _write_retrying(self, work: Callable[[Connection], _T]) -> _T:
        """``work`` in one write transaction, run again (up to five times) when a concurrent
        transaction inserted the same key first (``IntegrityError``)."""
        self.ensure_schema()
        for attempt in range(5):
            try:
                with self._writing() as conn:
                    return work(conn)
            except IntegrityError:
                if attempt == 4:
                    raise
        raise AssertionError("unreachable")


def _filters(query: Query) -> tuple[FromClause, list[ColumnElement[bool]], Any, Any]:
    """The FROM clause, WHERE conditions, ordering column and state column of a query."""
    source: FromClause = tasks
    order: Any = tasks.c.submitted_at
    state: Any = tasks.c.state
    conditions: list[ColumnElement[bool]] = []
    if query.tags:
        first, *rest = sorted(query.tags)
        tagged = task_tags.alias("tagged")
        source = tasks.join(tagged, and_(tagged.c.task_id == tasks.c.id, tagged.c.tag == first))
        order, state = tagged.c.submitted_at, tagged.c.state
        for tag in rest:
            conditions.append(exists().where(task_tags.c.task_id == tasks.c.id, task_tags.c.tag == tag))
    if query.state is not None:
        conditions.append(state == query.state)
    for key in ("name", "queue", "priority", "root_id"):
        if getattr(query, key) is not None:
            conditions.append(tasks.c[key] == getattr(query, key))
    if query.since is not None:
        conditions.append(order >= query.since)
    if query.until is not None:
        conditions.append(order <= query.until)
    return source, conditions, order, state


_MEMBER = "\x1f"  # list member rows: "<list key>\x1f<member>"


def _members_of(key: str) -> ColumnElement[bool]:
    return kv.c.key.startswith(f"{key}{_MEMBER}", autoescape=True)


def _tag_values(row: Row) -> Row:
    return {"state": row["state"], "submitted_at": row["submitted_at"]}


def _row(result_row: Any) -> Row:
    return {k: v for k, v in result_row._mapping.items() if v is not None}


def _live(expires_at: float | None) -> bool:
    """Whether a key-value row whose expiry is ``expires_at`` has not expired."""
    return expires_at is None or expires_at >= time.time()


def _live_rows() -> ColumnElement[bool]:
    """:func:`_live` as a condition on ``tq_kv``'s rows."""
    return kv.c.expires_at.is_(None) | (kv.c.expires_at >= time.time())


def _expiry(ttl: float | None) -> float | None:
    return time.time() + ttl if ttl else None


def _sqlite_locking(engine: Engine) -> None:
    """WAL so readers never wait; ``BEGIN IMMEDIATE`` so a read-merge-write is one locked step."""

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(conn: Connection) -> None:
        write = conn.get_execution_options().get("tq_write")
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def _migrate_from_1(conn: Connection, is_sqlite: bool) -> None:
    """Version 1 to 2: longer state names (PostgreSQL), terminal states ranked final."""
    if not is_sqlite:
        for table in ("tq_tasks", "tq_task_tags"):
            conn.exec_driver_sql(f"ALTER TABLE {table} ALTER COLUMN state TYPE varchar({STATE_MAX})")
    conn.execute(
        update(tasks)
        .where(tasks.c.state.in_(TERMINAL), tasks.c.progress < FINAL)
        .values(progress=FINAL + func.coalesce(tasks.c.retries, 0) * 10)
    )


def _migrate_from_2(conn: Connection, is_sqlite: bool) -> None:
    """Version 2 to 3: the ``deliveries`` and ``run_id`` columns; a task that started counts one."""
    present = {row[1] for row in conn.exec_driver_sql("PRAGMA table_info(tq_tasks)")} if is_sqlite else set()
    exists_clause = "" if is_sqlite else "IF NOT EXISTS "
    for name, kind in (("deliveries", "INTEGER"), ("run_id", f"VARCHAR({RUN_ID_MAX})")):
        if name not in present:
            conn.exec_driver_sql(f"ALTER TABLE tq_tasks ADD COLUMN {exists_clause}{name} {kind}")
    conn.execute(update(tasks).where(tasks.c.started_at.is_not(None)).values(deliveries=1))
