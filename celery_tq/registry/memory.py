"""``memory://``: records in this process only (tests and the in-process worker)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import ClassVar

from celery_tq.registry.record import Query, Row, merge

__all__ = ["MemoryStore"]


class MemoryStore:
    """A dict of rows behind one lock; the same rule as every other store."""

    _named: ClassVar[dict[str, MemoryStore]] = {}

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._rows: dict[str, Row] = {}
        self._kv: dict[str, tuple[bytes, float | None]] = {}
        self._lists: dict[str, tuple[dict[str, tuple[float, bytes]], float | None]] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition()

    @classmethod
    def named(cls, url: str) -> MemoryStore:
        """One store per URL in this process, shared by the backend and the registry."""
        store = cls._named.get(url)
        if store is None:
            store = cls._named[url] = cls(url)
        return store

    def write(self, changes: Sequence[Row]) -> None:
        with self._lock:
            for new in changes:
                self._rows[new["id"]] = merge(self._rows.get(new["id"]), new)
        with self._changed:
            self._changed.notify_all()

    def notified_row(self, task_id: str) -> Row | None:
        return None  # a wake-up here carries no row: the caller reads it

    def published(self, task_id: str) -> None:
        """Nothing to note: a wait here starts listening for the one task, then reads it."""

    def wait_for_outcome(self, task_id: str, seconds: float, is_ready: Callable[[str], bool]) -> bool:
        """Return when a write may have finished ``task_id`` (or after ``seconds``)."""
        with self._changed:
            if not is_ready(task_id):
                self._changed.wait(seconds)
        return True

    def read(self, task_ids: Sequence[str]) -> list[Row | None]:
        with self._lock:
            return [dict(self._rows[i]) if i in self._rows else None for i in task_ids]

    def query(self, query: Query) -> list[Row]:
        rows = self._matching(query)
        rows.sort(key=lambda r: r.get("submitted_at") or 0.0, reverse=not query.oldest_first)
        return rows[: query.limit]

    def counts(self, query: Query) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self._matching(query):
            counts[row["state"]] = counts.get(row["state"], 0) + 1
        return counts

    def _matching(self, query: Query) -> list[Row]:
        with self._lock:
            return [dict(r) for r in self._rows.values() if query.matches(r)]

    def delete(self, task_id: str) -> None:
        with self._lock:
            self._rows.pop(task_id, None)

    def purge(self, before: float) -> int:
        now = time.time()
        with self._lock:
            old = [i for i, r in self._rows.items() if (r.get("submitted_at") or 0.0) < before]
            for task_id in old:
                del self._rows[task_id]
            for key in [k for k, (_, exp) in self._kv.items() if not _live(exp, now)]:
                del self._kv[key]
            for key in [k for k, (_, exp) in self._lists.items() if not _live(exp, now)]:
                del self._lists[key]
        return len(old)

    def kv_get(self, keys: Sequence[str]) -> list[bytes | None]:
        now = time.time()
        with self._lock:
            found = [self._kv.get(k) for k in keys]
        return [v[0] if v and _live(v[1], now) else None for v in found]

    def kv_set(self, key: str, value: bytes, ttl: float | None) -> None:
        with self._lock:
            self._kv[key] = (value, time.time() + ttl if ttl else None)

    def kv_delete(self, key: str) -> None:
        with self._lock:
            self._kv.pop(key, None)
            self._lists.pop(key, None)

    def kv_incr(self, key: str, ttl: float | None) -> int:
        with self._lock:
            value, expires = self._kv.get(key, (b"0", None))
            number = int(value) + 1
            self._kv[key] = (str(number).encode(), time.time() + ttl if ttl else expires)
        return number

    def kv_expire(self, key: str, ttl: float | None) -> None:
        with self._lock:
            if key in self._kv:
                self._kv[key] = (self._kv[key][0], time.time() + ttl if ttl else None)

    def kv_claim(self, key: str, token: bytes, ttl: float) -> bool:
        now = time.time()
        with self._lock:
            old = self._kv.get(key)
            if old is not None and _live(old[1], now):
                return False
            self._kv[key] = (token, now + ttl if ttl else None)
            return True

    def kv_release(
        self, key: str, token: bytes, drop: Sequence[str], value: bytes, ttl: float | None
    ) -> bool:
        now = time.time()
        with self._lock:
            old = self._kv.get(key)
            if old is None or old[0] != token or not _live(old[1], now):
                return False
            for name in drop:
                self._kv.pop(name, None)
                self._lists.pop(name, None)
            self._kv[key] = (value, now + ttl if ttl else None)
            return True

    def kv_push(self, key: str, member: str, score: float, value: bytes, ttl: float | None) -> int:
        now = time.time()
        with self._lock:
            members, expires = self._lists.get(key, ({}, None))
            if not _live(expires, now):
                members = {}
            members.setdefault(member, (score, value))
            self._lists[key] = (members, now + ttl if ttl else expires)
            return len(members)

    def kv_list(self, key: str) -> list[bytes]:
        with self._lock:
            members, expires = self._lists.get(key, ({}, None))
            if not _live(expires, time.time()):
                return []
            return [value for _, value in sorted(members.values())]  # by score, then value


def _live(expires: float | None, now: float) -> bool:
    """Whether a key or list whose expiry is ``expires`` has not expired at ``now``."""
    return expires is None or expires >= now
