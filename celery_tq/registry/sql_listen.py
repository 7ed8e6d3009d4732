"""How ``get()`` on a PostgreSQL registry is woken: one listening session per store and process.

A terminal write notifies the registry's ``tq_done_*`` channel at commit (:mod:`.sql_merge`), with
the merged row when it fits. A process that waits in ``get()`` opens one session that ``LISTEN``\\s
on that channel and keeps it while it keeps waiting, so a task it sends while listening needs no
read before its wait (:meth:`DoneListener.published`).

Every listening session receives every outcome of its registry, and PostgreSQL cannot drop a
notification for a session that does not read: it keeps the database's whole notification queue
from that session's position on. A session whose process stopped waiting (a web worker that
called ``get()`` once, then idles) would fill its socket, then hold the queue until it reaches
PostgreSQL's limit, when every notifying commit fails: every outcome write of the registry. So a
listening session is closed once its process has not waited for ``LISTEN_IDLE`` seconds (a
daemon thread per store and process, awake once per period while a session is open), and
opened again by the next wait.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from celery_tq.registry.record import FIRST_WAIT, Row
from celery_tq.registry.sql_conn import DirectConnection
from celery_tq.registry.sql_merge import NOTIFY_CHANNEL_SQL, notice_id, parse_notice

__all__ = ["LISTEN_IDLE", "DoneListener"]

LISTEN_IDLE = 10.0  # seconds without a wait after which the listening session is closed
_KEEP = 4_096  # ids remembered: sent and not waited for yet, or noticed and not taken yet


class DoneListener:
    """The listening session of one PostgreSQL store in this process (opened by the first wait)."""

    def __init__(self, direct: DirectConnection, idle: float = LISTEN_IDLE) -> None:
        self.direct = direct
        self.idle = idle
        self._conn: Any = None
        self._seen_done: dict[str, str] = {}  # task id: its tq_done_* payload
        self._generation = 0  # sessions opened so far in this process
        self._expected: dict[str, int] = {}  # task id sent while listening: the session's generation
        self._lock = threading.Lock()  # held by a wait, and by whoever opens or closes the session
        self._last_wait = 0.0  # time.monotonic() when the last wait ended
        self._closer: threading.Thread | None = None  # running while a session is open
        self._pid = 0  # the process that opened the session (one made before a fork is not ours)

    @property
    def listening(self) -> bool:
        conn = self._conn
        return conn is not None and not conn.closed and self._pid == os.getpid()

    def published(self, task_id: str) -> None:
        """``task_id`` was sent while listening: its notice will reach this session, so its first
        wait need not read the record first."""
        if self.listening:
            self._expected[task_id] = self._generation
            if len(self._expected) > _KEEP:  # published, never waited for
                with contextlib.suppress(StopIteration, RuntimeError, KeyError):
                    del self._expected[next(iter(self._expected))]

    def wait(self, task_id: str, seconds: float, is_ready: Callable[[str], bool]) -> None:
        """Return when ``task_id``'s terminal write is notified (or after ``seconds``).

        A task sent while this session already listened (:meth:`published`) is first waited for
        up to ``FIRST_WAIT`` s without a read: a short task's notice carries its record, so
        ``get()`` reads nothing. Only then, as for any other task, is the record read once
        listening (the outcome may have been written before)."""
        with self._lock:
            try:
                if not self.listening:
                    self._open()
                if self._expected.pop(task_id, None) == self._generation:
                    if task_id in self._seen_done or self._take(task_id, min(seconds, FIRST_WAIT)):
                        return
                else:
                    self._seen_done.pop(task_id, None)  # noticed before this wait: a read is fresher
                if is_ready(task_id):
                    return
                self._take(task_id, seconds)
            except Exception:  # a lost session: the caller polls again; a new one next time
                self._close()
                time.sleep(min(seconds, 0.1))
            finally:
                self._last_wait = time.monotonic()

    def notified_row(self, task_id: str) -> Row | None:
        """The merged row the notice of ``task_id`` carried (once), or None: then read it."""
        with self._lock:
            payload = self._seen_done.pop(task_id, None)
        return None if payload is None else parse_notice(payload)[1]

    def close(self) -> None:
        with self._lock:
            self._close()

    def _open(self) -> None:
        if self._pid != os.getpid():  # a session and closer of the parent process: not closed here
            self._conn, self._closer = None, None
        self._close()
        self._conn, self._pid = self.direct.open_listener(NOTIFY_CHANNEL_SQL), os.getpid()
        self._generation += 1  # a new session: notices sent before it are not here
        if self._closer is None:
            closer = threading.Thread(target=self._close_when_idle, name="celery-tq-listen", daemon=True)
            self._closer = closer
            closer.start()

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and self._pid == os.getpid():  # a parent's session is the parent's
            with contextlib.suppress(Exception):
                conn.close()

    def _take(self, task_id: str, seconds: float) -> bool:
        """Keep the session's notices until one is ``task_id``'s (True) or ``seconds`` pass."""
        for notice in self._conn.notifies(timeout=seconds):
            self._seen_done[notice_id(notice.payload)] = notice.payload  # row parsed if asked
            if len(self._seen_done) > _KEEP:  # done ids another waiter of this process may want
                del self._seen_done[next(iter(self._seen_done))]
            if task_id in self._seen_done:
                return True
        return False

    def _close_when_idle(self) -> None:
        """The closer thread: ends the session ``idle`` s after the last wait, then itself."""
        delay = self.idle
        while True:
            time.sleep(delay)
            with self._lock:  # a wait in progress holds it: the session is in use
                quiet = time.monotonic() - self._last_wait
                if not self.listening or quiet >= self.idle:
                    self._close()
                    self._closer = None  # the next session starts a closer of its own
                    return
                delay = self.idle - quiet
