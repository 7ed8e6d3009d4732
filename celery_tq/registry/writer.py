"""Writes that must not be lost.

``QUEUED`` and ``STARTED`` are written off the caller's thread: :func:`enqueue` appends to a
per-process buffer that one daemon thread writes in batches (one pipeline or transaction per
batch), retrying while the store is down. The thread lingers ``LINGER`` s after the first change
of a batch, so a busy process writes few, larger batches, and a task that finishes within that
time takes its own ``STARTED`` back (:func:`retract`) to write it with its outcome, in one
write. Reads in the same process flush the buffer first, and it is flushed at exit.
Every other state goes through :func:`write_with_retry`: backoff for up to 60 s, then an
explicit error in the log; the calling worker never dies of it.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kombu.utils.url import maybe_sanitize_url

from celery_tq.registry.record import Row

if TYPE_CHECKING:
    from celery_tq.registry import Store

__all__ = ["RETRY_FOR", "enqueue", "flush_all", "flush_pending", "retract", "write_with_retry"]

logger = logging.getLogger("celery_tq.registry")

RETRY_FOR = 60.0
MAX_PENDING = 100_000
BATCH = 500
LINGER = 0.02
RETRACT_SCAN = 64


class QueuedWriter:
    """One background thread writing one store's buffered changes, in order, in batches."""

    def __init__(self, store: Store, linger: float = LINGER) -> None:
        self.store = store
        self.linger = linger
        self._pending: deque[Row] = deque()
        self._lock = threading.Lock()
        self._has_work = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)
        self._busy = False
        self._urgent = 0
        self._waiting = False  # in the untimed wait for a first change (not lingering)
        thread = threading.Thread(target=self._run, name="celery-tq-registry", daemon=True)
        thread.start()

    def put(self, row: Row) -> None:
        with self._lock:
            if len(self._pending) >= MAX_PENDING:
                lost = self._pending.popleft()
                logger.error("celery-tq: registry buffer full; QUEUED of task %s not recorded", lost["id"])
            self._pending.append(row)
            if self._waiting or len(self._pending) >= BATCH:
                self._has_work.notify()  # a lingering thread is not woken for each change

    def retract(self, task_id: str, state: str) -> Row | None:
        """Take back a still-buffered change of ``task_id`` to ``state`` (the latest one)."""
        with self._lock:
            for index in range(len(self._pending) - 1, max(-1, len(self._pending) - 1 - RETRACT_SCAN), -1):
                row = self._pending[index]
                if row["id"] == task_id and row["state"] == state:
                    del self._pending[index]
                    if not self._pending and not self._busy:
                        self._idle.notify_all()
                    return row
        return None

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything buffered so far is written; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            if not self._pending and not self._busy:
                return True
            self._urgent += 1  # no lingering while someone waits
            self._has_work.notify()
            try:
                while self._pending or self._busy:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._idle.wait(remaining)
            finally:
                self._urgent -= 1
        return True

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._pending:
                    self._waiting = True
                    self._has_work.wait()
                    self._waiting = False
                until = time.monotonic() + self.linger
                while self._pending and not self._urgent and len(self._pending) < BATCH:
                    remaining = until - time.monotonic()
                    if remaining <= 0:
                        break
                    self._has_work.wait(remaining)
                if not self._pending:
                    continue  # everything was retracted
                batch = [self._pending.popleft() for _ in range(min(BATCH, len(self._pending)))]
                self._busy = True
            _write_until_done(self.store, batch)
            with self._lock:
                self._busy = False
                self._idle.notify_all()


def _write_until_done(store: Store, batch: list[Row]) -> None:
    delay, failing_since = 0.05, 0.0
    while True:
        try:
            store.write(batch)
        except Exception as exc:
            now = time.monotonic()
            if not failing_since or now - failing_since > RETRY_FOR:
                failing_since = now
                logger.error(
                    "celery-tq: cannot record %d queued task(s) in %s (%s); kept in memory, retrying",
                    len(batch),
                    maybe_sanitize_url(store.url),
                    exc,
                )
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
        else:
            if failing_since:
                logger.warning("celery-tq: registry store %s reachable again", maybe_sanitize_url(store.url))
            return


_writers: dict[tuple[int, int], QueuedWriter] = {}
_writers_lock = threading.Lock()


def enqueue(store: Store, row: Row) -> None:
    """Buffer ``row`` for the background writer of ``store`` (in this process)."""
    key = (os.getpid(), id(store))
    writer = _writers.get(key)
    if writer is None:
        with _writers_lock:
            writer = _writers.get(key)
            if writer is None:
                writer = _writers[key] = QueuedWriter(store)
    writer.put(row)


def retract(store: Store, task_id: str, state: str) -> Row | None:
    """Take back ``task_id``'s change to ``state`` if this process has not written it yet."""
    writer = _writers.get((os.getpid(), id(store)))
    return writer.retract(task_id, state) if writer is not None else None


def flush_pending(store: Store, timeout: float = 10.0) -> None:
    """Read-your-writes: what this process buffered for ``store`` is written before a read."""
    writer = _writers.get((os.getpid(), id(store)))
    if writer is not None:
        writer.flush(timeout)


@atexit.register
def flush_all(timeout: float = 10.0) -> None:
    """Flush every writer of this process (at exit, and when a worker process shuts down)."""
    pid = os.getpid()
    for (owner, _), writer in list(_writers.items()):
        if owner == pid and not writer.flush(timeout):
            logger.error("celery-tq: QUEUED records still unwritten at exit (%s)", writer.store.url)


def write_with_retry(store: Store, changes: Sequence[Row], what: str, retry_for: float = RETRY_FOR) -> bool:
    """Write now; while the store fails, back off and retry for ``retry_for`` seconds.

    Returns False (after logging an error naming ``what``) when the store stayed unreachable.
    """
    deadline = time.monotonic() + retry_for
    delay = 0.1
    warned = False
    while True:
        try:
            store.write(changes)
        except Exception as exc:
            remaining = deadline - time.monotonic()
            url = maybe_sanitize_url(store.url)
            if remaining <= 0:
                logger.error(
                    "celery-tq: could not store %s in %s after retrying for %.0f s (%s): this state is lost",
                    what,
                    url,
                    retry_for,
                    exc,
                )
                return False
            if not warned:
                logger.warning(
                    "celery-tq: store %s failed while storing %s (%s); retrying for up to %.0f s",
                    url,
                    what,
                    exc,
                    retry_for,
                )
                warned = True
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 5.0)
        else:
            if warned:
                logger.warning("celery-tq: stored %s after the store came back", what)
            return True
