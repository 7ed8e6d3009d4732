"""The task registry: one :class:`TaskRecord` per task, in a pluggable store.

Stores (one per module) share the small :class:`Store` protocol: ``memory://`` (one process),
``sqlite:///path`` and ``postgresql://...`` (:mod:`.sql`), ``redis://host:port/db`` (:mod:`.redis`).
:class:`Registry` is the query facade users get from ``tq.registry``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Protocol

from celery_tq.errors import ConfigurationError, StorageError
from celery_tq.registry.record import STATES, Query, Row, TaskRecord, is_state_name, tags_of, to_record

__all__ = ["STATES", "Query", "Registry", "Store", "TaskRecord", "store_for_url"]

logger = logging.getLogger("celery_tq.registry")


class Store(Protocol):
    """Where records live. Every write is merged forward-only and atomically per task."""

    url: str

    def write(self, changes: Sequence[Row]) -> None:
        """Merge each change (see :func:`celery_tq.registry.record.merge`) into its task's row."""

    def read(self, task_ids: Sequence[str]) -> list[Row | None]: ...

    def wait_for_outcome(self, task_id: str, seconds: float, is_ready: Callable[[str], bool]) -> bool:
        """Block until a write may have finished ``task_id``, at most ``seconds``; False if this
        store cannot wake a waiter (the caller then polls). ``is_ready`` is checked after the
        store starts listening, so a write in between is never missed."""

    def notified_row(self, task_id: str) -> Row | None:
        """The merged row that the last wake-up for ``task_id`` carried (taken once), or None:
        the caller then reads it."""

    def published(self, task_id: str) -> None:
        """This process has just sent ``task_id``: a store whose wake-ups reach this process
        already may wait for its outcome without reading its record first."""

    def query(self, query: Query) -> list[Row]:
        """Rows matching ``query``, newest ``submitted_at`` first (oldest first with
        ``query.oldest_first``), at most ``query.limit``."""

    def counts(self, query: Query) -> dict[str, int]: ...

    def delete(self, task_id: str) -> None: ...

    def purge(self, before: float) -> int:
        """Delete records submitted before ``before`` (epoch seconds) and expired keys."""

    # Small key-value space for Celery's group and chord bookkeeping.
    def kv_get(self, keys: Sequence[str]) -> list[bytes | None]: ...

    def kv_set(self, key: str, value: bytes, ttl: float | None) -> None: ...

    def kv_delete(self, key: str) -> None: ...

    def kv_incr(self, key: str, ttl: float | None) -> int: ...

    def kv_expire(self, key: str, ttl: float | None) -> None: ...

    def kv_claim(self, key: str, token: bytes, ttl: float) -> bool:
        """Set ``key`` to ``token`` for ``ttl`` seconds unless it holds a live value (Redis's
        ``SET NX PX``); True if this call set it. Of concurrent claims exactly one wins."""

    def kv_release(
        self, key: str, token: bytes, drop: Sequence[str], value: bytes, ttl: float | None
    ) -> bool:
        """If ``key`` still holds ``token``: delete the keys and lists ``drop`` and set ``key`` to
        ``value`` (for ``ttl`` seconds), in one atomic step; True if it did. A claim dropped
        (``kv_delete``) or taken over meanwhile leaves everything as it is."""

    def kv_push(self, key: str, member: str, score: float, value: bytes, ttl: float | None) -> int:
        """Add ``value`` to the list ``key`` once per ``member``; the number of members it now holds.

        Atomic, so of N concurrent pushes to a list of N exactly one sees N. ``ttl`` (re)sets the
        list's expiry; ``kv_delete(key)`` deletes it.
        """

    def kv_list(self, key: str) -> list[bytes]:
        """The values pushed to the list ``key``, by ascending score, then value (as Redis orders)."""


class Registry:
    """Query the records of every task: ``tq.registry.get(id)``, ``.query(...)``, ``.counts(...)``."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def get(self, task_id: str) -> TaskRecord | None:
        """The record of ``task_id``; None for an id never sent; ``StorageError`` if corrupt."""
        self._flush()
        row = self.store.read([task_id])[0]
        return None if row is None else to_record(row)

    def query(
        self,
        state: str | None = None,
        tags: Iterable[str] | str | None = None,
        name: str | None = None,
        queue: str | None = None,
        priority: int | None = None,
        since: datetime | float | None = None,
        until: datetime | float | None = None,
        root_id: str | None = None,
        limit: int = 100,
        oldest_first: bool = False,
    ) -> list[TaskRecord]:
        """Records matching every given filter (``tags``: all of them), newest first (by
        ``submitted_at``; oldest first with ``oldest_first=True``, e.g. the longest waiting
        ``QUEUED`` task of a backlog).

        A corrupt record is skipped and logged as a ``StorageError`` naming its id.
        """
        self._flush()
        q = replace(
            _query(state, tags, name, queue, priority, since, until, root_id, limit),
            oldest_first=oldest_first,
        )
        records = []
        for row in self.store.query(q):
            try:
                records.append(to_record(row))
            except StorageError as exc:
                logger.error("celery-tq registry: skipped %s", exc)
        return records

    def counts(
        self,
        state: str | None = None,
        tags: Iterable[str] | str | None = None,
        name: str | None = None,
        queue: str | None = None,
        priority: int | None = None,
        since: datetime | float | None = None,
        until: datetime | float | None = None,
        root_id: str | None = None,
    ) -> dict[str, int]:
        """``{state: number of records}`` matching the filters (states with none are left out)."""
        self._flush()
        q = _query(state, tags, name, queue, priority, since, until, root_id, 0)
        return {s: n for s, n in self.store.counts(q).items() if n}

    def purge(self, older_than: timedelta | float) -> int:
        """Delete records submitted more than ``older_than`` (seconds or a timedelta) ago."""
        seconds = older_than.total_seconds() if isinstance(older_than, timedelta) else float(older_than)
        return self.store.purge(datetime.now().timestamp() - seconds)

    def _flush(self) -> None:
        from celery_tq.registry.writer import flush_pending

        flush_pending(self.store)


def _query(
    state: str | None,
    tags: Iterable[str] | str | None,
    name: str | None,
    queue: str | None,
    priority: int | None,
    since: datetime | float | None,
    until: datetime | float | None,
    root_id: str | None,
    limit: int,
) -> Query:
    if state is not None and not is_state_name(state):
        raise ValueError(f"invalid state {state!r}: Celery's states ({', '.join(STATES)}) or a custom one")
    return Query(
        state=state,
        tags=tags_of(tags),
        name=name,
        queue=queue,
        priority=priority,
        since=_epoch(since),
        until=_epoch(until),
        root_id=root_id,
        limit=limit,
    )


def _epoch(value: datetime | float | None) -> float | None:
    if value is None:
        return None
    return value.timestamp() if isinstance(value, datetime) else float(value)


_stores: dict[tuple[int, str], Store] = {}
_lock = threading.Lock()


def store_for_url(url: str) -> Store:
    """The store named by ``url`` (``tq+`` prefix allowed), one per URL and process."""
    url = url.removeprefix("tq+")
    key = (os.getpid(), url)  # connections never cross a fork
    store = _stores.get(key)  # the common case, without the lock (a dict read is atomic)
    if store is not None:
        return store
    with _lock:
        store = _stores.get(key)
        if store is None:
            store = _stores[key] = _open(url)
    return store


def _open(url: str) -> Store:
    scheme = url.partition("://")[0].split("+")[0]
    if scheme == "memory":
        from celery_tq.registry.memory import MemoryStore

        return MemoryStore.named(url)
    if scheme in {"sqlite", "postgresql", "postgres"}:
        from celery_tq.registry.sql import SqlStore

        return SqlStore(url)
    if scheme in {"redis", "rediss"}:
        from celery_tq.registry.redis import RedisStore

        return RedisStore(url)
    raise ConfigurationError(
        f"no registry store for {url!r}: use memory://, sqlite:///path, postgresql://... or redis://..."
    )
