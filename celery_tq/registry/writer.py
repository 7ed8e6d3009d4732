"""The registry's write path in one process: a buffer, a background writer, durable writes.

``QUEUED`` and ``STARTED`` are written off the caller's thread: :func:`enqueue` appends to a
per-process buffer that one daemon thread writes in batches (one store call per batch: a Redis
pipeline, one multi-row upsert), retrying while the store is down. The thread looks for changes
every ``LINGER`` s (every ``IDLE_TICK`` s once idle for a while) rather than being woken for each
one, and lingers ``LINGER`` s after the first change of a batch, so a busy process writes few,
larger batches.
Every other state goes through :func:`write_with_retry`, which takes whatever this process
still has buffered for the store along in the same batch (so a short task's ``STARTED`` and
the records of what it published travel with its outcome in one round trip), and returns once
the batch is durable: backoff for up to ``tq_store_retry_timeout``, then an explicit error in
the log; the calling worker never dies of it. A row the store refuses outright (a
``StorageError``: a value it cannot hold) is logged with its task id and dropped, alone: it
never blocks the rows around it. Reads through ``Registry`` flush the buffer first.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from kombu.utils.url import maybe_sanitize_url

from celery_tq.errors import StorageError
from celery_tq.registry.record import Row

if TYPE_CHECKING:
    from celery_tq.registry import Store

__all__ = [
    "RETRY_FOR",
    "Deferred",
    "enqueue",
    "flush_all",
    "flush_pending",
    "give_back",
    "take_buffered",
    "write_with_retry",
]

logger = logging.getLogger("celery_tq.registry")

RETRY_FOR = 60.0
MAX_PENDING = 100_000
BATCH = 500
LINGER = 0.02
IDLE_TICK = 0.25


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
        self._failing = False
        self._urgent = 0
        thread = threading.Thread(target=self._run, name="celery-tq-registry", daemon=True)
        thread.start()

    def put(self, row: Row) -> None:
        with self._lock:
            if len(self._pending) >= MAX_PENDING:
                lost = self._pending.popleft()
                logger.error("celery-tq: registry buffer full; QUEUED of task %s not recorded", lost["id"])
            self._pending.append(row)
            if len(self._pending) >= BATCH:
                self._has_work.notify()  # else the thread finds it on its next tick: no wake-up per change

    def _set_failing(self, failing: bool) -> None:
        with self._lock:
            self._failing = failing
            if failing:
                self._idle.notify_all()  # a waiting flush() gives up: the store is down

    def take(self) -> list[Row]:
        """Take every change still buffered (the caller writes them with its own, in order)."""
        with self._lock:
            taken = list(self._pending)
            self._pending.clear()
            if not self._busy:
                self._idle.notify_all()
        return taken

    def put_back(self, rows: list[Row]) -> None:
        """Give back changes a caller took but could not write: the thread keeps retrying them."""
        with self._lock:
            self._pending.extendleft(reversed(rows))
            self._has_work.notify()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything buffered so far is written; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            if not self._pending and not self._busy:
                return True
            if self._failing:  # the store is down: the thread keeps retrying; nobody waits on it
                return False
            self._urgent += 1  # no lingering while someone waits
            self._has_work.notify()
            try:
                while self._pending or self._busy:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self._failing:
                        return False
                    self._idle.wait(remaining)
            finally:
                self._urgent -= 1
        return True

    def _run(self) -> None:
        while True:
            with self._lock:
                idle_since = time.monotonic()
                while not self._pending:
                    # ticks of one linger; slower after a while idle (a change waits at most IDLE_TICK)
                    idle = time.monotonic() - idle_since > 5.0
                    self._has_work.wait(IDLE_TICK if idle else self.linger)
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
            _write_until_done(self.store, batch, self._set_failing)
            with self._lock:
                self._busy = False
                self._idle.notify_all()


class Deferred:
    """A row's ``meta`` computed only if it is written (``TqBackend``'s buffered ``STARTED``: a
    short run's outcome supersedes it in the same batch, and its meta is never needed)."""

    __slots__ = ("compute",)

    def __init__(self, compute: Callable[[], str]) -> None:
        self.compute = compute


def resolved(batch: Sequence[Row]) -> Sequence[Row]:
    """``batch`` with every deferred meta computed, or left out where a later change of the
    same task in the batch supersedes the row (its outcome columns never reach the store).
    Rows are copied, never changed: a batch that fails may be given back to the buffer."""
    if not any(type(row.get("meta")) is Deferred for row in batch):
        return batch
    out: list[Row] = []
    later: dict[str, int] = {}  # per task, the highest progress of the changes after this one
    for row in reversed(batch):
        deferred, progress = row.get("meta"), int(row["progress"])
        if type(deferred) is Deferred:
            row = {k: v for k, v in row.items() if k != "meta"}
            # a later change of equal or higher progress supersedes (record.supersedes; a
            # deferred row is never terminal)
            if later.get(row["id"], -1) < progress:
                try:
                    row["meta"] = deferred.compute()
                except Exception:
                    logger.exception("celery-tq: result meta of task %s not recorded", row["id"])
        later[row["id"]] = max(later.get(row["id"], -1), progress)
        out.append(row)
    out.reverse()
    return out


def write_isolating(store: Store, batch: Sequence[Row]) -> None:
    """Write ``batch``; if the store refuses it outright, write its rows one by one and drop
    (with an error naming the task) each row it refuses. Other errors propagate (transient)."""
    batch = resolved(batch)
    try:
        store.write(batch)
        return
    except StorageError as exc:
        if len(batch) == 1:
            _refused(batch[0], exc)
            return
    for row in batch:
        try:
            store.write([row])
        except StorageError as exc:
            _refused(row, exc)


def _refused(row: Row, exc: StorageError) -> None:
    logger.error(
        "celery-tq: the registry store refused the %s record of task %r; dropped (%s)",
        row.get("state"),
        str(row.get("id"))[:200],
        exc,
    )


def _write_until_done(store: Store, batch: list[Row], failing: Callable[[bool], None]) -> None:
    delay, failing_since = 0.05, 0.0
    while True:
        try:
            write_isolating(store, batch)
        except Exception as exc:
            failing(True)
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
                failing(False)
                logger.warning("celery-tq: registry store %s reachable again", maybe_sanitize_url(store.url))
            return


_writers: dict[tuple[int, int], QueuedWriter] = {}
_writers_lock = threading.Lock()


_exit_hook = False


def enqueue(store: Store, row: Row) -> None:
    """Buffer ``row`` for the background writer of ``store`` (in this process)."""
    global _exit_hook
    key = (os.getpid(), id(store))
    writer = _writers.get(key)
    if writer is None:
        with _writers_lock:
            writer = _writers.get(key)
            if writer is None:
                writer = _writers[key] = QueuedWriter(store)
                if not _exit_hook:  # registered with the first writer, never at import
                    atexit.register(flush_all)
                    _exit_hook = True
    writer.put(row)


def _own_writer(store: Store) -> QueuedWriter | None:
    """This process's background writer of ``store``, if it has one."""
    return _writers.get((os.getpid(), id(store)))


def flush_pending(store: Store, timeout: float = 10.0) -> None:
    """Read-your-writes: what this process buffered for ``store`` is written before a read."""
    writer = _own_writer(store)
    if writer is not None:
        writer.flush(timeout)


def take_buffered(store: Store) -> list[Row]:
    """Take what this process still buffers for ``store`` (the caller writes it with its own)."""
    writer = _own_writer(store)
    return writer.take() if writer is not None else []


def give_back(store: Store, rows: list[Row]) -> None:
    """Give back rows :func:`take_buffered` took and the caller did not write: the background
    writer keeps trying them."""
    writer = _own_writer(store)
    if writer is not None and rows:
        writer.put_back(rows)


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
    buffered = take_buffered(store)
    batch = [*buffered, *changes]
    deadline = time.monotonic() + retry_for
    delay = 0.1
    warned = False
    while True:
        try:
            write_isolating(store, batch)
        except Exception as exc:
            remaining = deadline - time.monotonic()
            url = maybe_sanitize_url(store.url)
            if remaining <= 0:
                give_back(store, buffered)  # not lost: the background writer keeps trying
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
