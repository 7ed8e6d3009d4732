"""Outcomes handed from pool processes to the worker's main process, acked once durable.

``tq_hand_over_outcomes = True`` (the production preset's setting): a task whose ack waits for
its record is still unacked, so a worker cut off from broker and store for longer than its
heartbeat may have run tasks that other workers then run again: at most ``UNRECORDED`` per pool
process and one whose ack was on its way, 3c + 1, where it is c + 1 without the hand-over. A
pool process runs no further task while more of its outcomes than that are unwritten
(:func:`settle_before_run`, on ``task_prerun``, connected by the worker step): the main process
tells it, on a datagram socket of its own, up to which of its outcomes the store has them.

On a SQL registry (PostgreSQL, SQLite) a commit costs far more than the row it writes: an
outcome committed alone costs PostgreSQL about four times the CPU of one in a batch of ten
(``benchmarks/registry_batches.py``); on Redis a pool process that waits for its own write waits
for a server that the worker's main process and the other pool processes keep busy. So in a
prefork worker with an event loop, a pool process does not write a late-acked task's outcome
itself. It sends the outcome's rows (with whatever ``STARTED``/``QUEUED`` it still buffers) to the
main process over a local datagram socket and goes on with its next task. The main process writes
everything that arrived while its previous write ran in one batch (group commit: no lingering, so
``get()`` waits no longer), from its event loop (:class:`Handoff`): on PostgreSQL one transaction,
on Redis one pipeline of the merge script's calls, which the pool processes encoded already
(:mod:`celery_tq.registry.redis_async`); and it acks each of those tasks' messages only
once that batch is durable. Invariant: a
terminal record is durable before its message is acked. A kill -9 of a pool process loses
nothing it handed over (the main process has it); a kill -9 of the worker loses only unacked
work, which the broker redelivers.

A held ack would hold a prefetch slot, and the broker would send the next task only once it is
released; so the prefetch count grows by the number of acks held, up to ``HELD_PER_PROCESS``
times the pool's size (as Celery does for tasks with an ETA), and shrinks again once fewer have
been held for a second (without a ``basic.qos`` per task). A held ack's task has finished, so
while acks are held no more tasks wait in the worker than without the hand-over; within that
second after they were released, up to that many more may.

While the store is down the acks wait, and each pool process stops before its next task; after
``tq_store_retry_timeout`` the batch is given up with an error naming it, as a pool process's own
write would be, and its tasks are acked. Outcomes too large for one datagram (``MAX_DATAGRAM``;
on Redis a datagram carries an outcome twice, as rows and as encoded script calls),
tasks with callbacks, chains or chords (their next step reads or follows the record), early-acked
tasks and tasks whose request class is not celery-tq's keep the pool
process's own write; so does a task that reaches a worker holding no other task: there is no
batch to join, and the hop to the main process would only lengthen its round trip (about
0.4 ms: the main process is busy with that same task's result when the outcome arrives).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pickle
import queue
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from celery import bootsteps, signals, states
from celery.worker import state as worker_state
from celery.worker.request import Request

from celery_tq.registry import Store
from celery_tq.registry.loop_write import NotSent, loop_write_for
from celery_tq.registry.record import Row
from celery_tq.registry.writer import give_back, resolved, take_buffered, write_with_retry
from celery_tq.result_errors import ENDED
from celery_tq.settings import settings_for

__all__ = [
    "ACK_KEY",
    "UNRECORDED",
    "HandOutcomes",
    "HandOutcomesPrefetch",
    "Handoff",
    "HandoffRequest",
    "hand_over",
    "settle_before_run",
]

logger = logging.getLogger("celery_tq.registry")

#: Set in a request's dict by the main process: this task's outcome may be handed over.
ACK_KEY = "tq_ack_after_write"
MAX_DATAGRAM = 64 * 1024
SEND_TIMEOUT = 30.0
SHRINK_EVERY = 1.0
CONNECT_EVERY = 5.0  # seconds between attempts at the event loop's store connection
#: Prefetch slots held acks may add, per pool process (at 1 per process a -c 2 drain on
#: PostgreSQL ran about 30% slower than at 4 or more: its acks wait for the write in flight
#: and the one after it).
HELD_PER_PROCESS = 4
#: Tasks a pool process may have run whose outcomes are not written yet, the one it runs included:
#: before its next task it waits until all but its last UNRECORDED - 1 outcomes are written. So a
#: worker cut off from broker and store has run at most UNRECORDED x c tasks that other workers
#: run again. (In exploratory -c 2 drains on RabbitMQ with PostgreSQL, a bound of 1 was slower
#: than no hand-over at all, and 3 kept about what the unbounded hand-over gave; the benchmark's
#: figures are in the README.)
UNRECORDED = 3
HANDED_STATES = frozenset({states.SUCCESS, states.FAILURE})
_CELERY_REQUEST = "celery.worker.request:Request"

_active: Handoff | None = None  # the worker's, created in its main process before the pool forks
_child: _ChildEnd | None = None  # this pool process's end, created at its first hand-over
_unable = 0  # the pid of a pool process that could not create its end


class _Batch:
    """Outcomes written together: their rows (pickled, one list per outcome) and what the loop
    writer encoded of them in the pool process (or None), their tasks (one entry per outcome), the
    pool processes to tell."""

    def __init__(
        self, parts: list[bytes], encoded: list[bytes | None], outcomes: list[str], replies: dict[str, int]
    ) -> None:
        self.parts, self.encoded, self.outcomes, self.replies = parts, encoded, outcomes, replies
        self.on_loop = False  # sent on the event loop's connection (else: the writer thread's)
        self.finished = False  # the writer thread is done with it
        self.completed = False  # its acks are released

    @functools.cached_property
    def rows(self) -> list[Row]:  # (once: the loop's send and the writer thread may both need them)
        return [row for part in self.parts for row in pickle.loads(part)]


class Handoff:
    """The main process's end: receives outcomes, writes them in batches, releases their acks.

    Everything but the writer thread runs on the worker's event loop: the datagrams are read
    there, and each batch is sent and read there by the store's loop writer
    (:mod:`celery_tq.registry.loop_write`: on PostgreSQL one prepared upsert, on Redis a pipeline
    of merge calls), one batch at a time, the next taking what arrived meanwhile. The writer
    thread writes what the loop cannot (SQLite, PgBouncer, no connection yet, a failed send,
    statement or script call): the store's own write, retried while the store is down, a refused
    record isolated; it (re)connects the loop's connection after.
    """

    def __init__(self, store: Store, retry_for: float, max_extra: int = 1) -> None:
        self.store, self.url, self.retry_for = store, store.url, retry_for
        self.max_extra = max(1, max_extra)  # prefetch slots held acks may add
        self.owner = os.getpid()
        self._recv, self._send = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._recv.setblocking(False)
        self._send.settimeout(SEND_TIMEOUT)
        self._queue: list[bytes] = []  # received, not yet in a batch: each outcome's rows, pickled
        self._encoded: list[bytes | None] = []  # and what the loop writer encoded of them, if anything
        self._arrived: list[str] = []  # the tasks whose outcomes those rows carry, one per outcome
        self._replies: dict[str, int] = {}  # a pool process's address: the number of its latest outcome
        self._reply = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._reply.setblocking(False)
        self._unwritten: dict[str, int] = {}  # task id: outcomes received and not yet committed
        self._waiting: dict[str, list[Callable[[], None]]] = {}  # task id: acks held for it
        self._batch: _Batch | None = None  # the batch being written
        self._hub: Any = None
        self._sync = False  # shutting down: the event loop may not run; acks wait in place
        self._loop_write = loop_write_for(store)  # PostgreSQL, Redis: batches written on the event loop
        self._watched = -1  # the loop connection's socket, while the event loop watches it
        self._jobs: queue.SimpleQueue[_Batch] = queue.SimpleQueue()
        self._connect_after = 0.0  # the writer thread's next attempt at the loop's connection
        self._finished = threading.Condition()
        self._thread: threading.Thread | None = None
        # acks held now, prefetch slots added for them, the most held since the last shrink,
        # and the consumer's prefetch count (per connection).
        self._held = self._allowed = self._peak = 0
        self._qos: Any = None

    # -- a pool process -------------------------------------------------------------------
    def datagram(
        self, task_id: str, rows: Sequence[Row], address: str | None = None, number: int = 0
    ) -> bytes:
        """An outcome as a pool process sends it: ``task_id``'s ``rows`` (pickled apart, so that the
        main process unpickles them only if it needs them), what the loop writer sends for them
        (encoded here, in the pool process), and where to tell that outcome ``number`` is written."""
        encoded = None if self._loop_write is None else self._loop_write.encode(rows)
        pickled = pickle.dumps(list(rows), protocol=pickle.HIGHEST_PROTOCOL)
        return pickle.dumps((task_id, pickled, address, number, encoded), protocol=pickle.HIGHEST_PROTOCOL)

    def send(self, data: bytes) -> bool:
        try:
            self._send.send(data)
        except OSError as exc:  # too large for the socket, or the main process stopped reading
            logger.warning("celery-tq: outcome not handed to the worker's main process (%s)", exc)
            return False
        return True

    # -- the main process -----------------------------------------------------------------
    def start(self, hub: Any) -> None:
        self._hub = hub
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="celery-tq-outcomes", daemon=True)
            self._thread.start()
            hub.call_repeatedly(SHRINK_EVERY, self._shrink)
            hub.add_reader(self._recv, self._on_datagrams)
            on_close = getattr(hub, "on_close", None)
            if isinstance(on_close, set):  # after the pool has stopped, before the broker channel closes
                on_close.add(self._on_hub_close)
            if self._loop_write is not None:  # connect off the loop
                self._jobs.put(_Batch([], [], [], {}))

    def connected(self, qos: Any) -> None:
        """A (new) broker connection's prefetch count: held acks add to it from now on."""
        self._qos, self._allowed, self._peak = qos, 0, self._held

    def _grow(self) -> None:
        self._held += 1
        self._peak = max(self._peak, self._held)
        wanted = min(self._held, self.max_extra)
        if wanted > self._allowed and self._qos is not None and self._qos.value:
            self._qos.increment_eventually(wanted - self._allowed)
            self._allowed = wanted

    def _shrink(self) -> None:
        target = min(max(self._peak, self._held), self.max_extra)
        if self._allowed > target and self._qos is not None:
            self._qos.decrement_eventually(self._allowed - target)
            self._allowed = target
        self._peak = self._held

    def hold(self, task_id: str, ack: Callable[[], None]) -> bool:
        """Whether ``task_id``'s ack must wait for its record (``ack`` is then called later, in
        the event loop). Its outcome was sent before the pool reported the task done, so it is
        either received by now or in the socket's queue."""
        self._drain()
        if task_id not in self._unwritten:
            return False
        if self._sync:  # shutting down: write here, then the caller acks
            self._settle()
            if task_id in self._unwritten:
                logger.error("celery-tq: record of task %s still unwritten at shutdown", task_id)
            return False
        self._waiting.setdefault(task_id, []).append(ack)
        self._grow()
        self._next()
        return True

    def stop(self, timeout: float = 60.0) -> None:
        """Shutdown: write what was received and release its acks here; later acks wait in place."""
        self._sync = True
        self._settle(timeout)

    def _on_hub_close(self, hub: Any) -> None:
        """The worker's event loop closes, its pool stopped: write the outcomes still in the socket.

        Celery's warm shutdown drops from the pool's books a task it gave a pool process a moment
        before, whose start it had not seen yet (``Consumer.on_close`` flushes the pool); the
        pool process runs it anyway and hands its outcome over, but no result reaches the main
        process, so nothing asks for that outcome and the task's message is never acked. Written
        here, before the broker channel closes, it is in the store when the broker delivers the
        message again, and a worker acks it without running it (:class:`HandoffRequest`)."""
        self._sync = True
        self._drain()
        dropped = list(self._arrived)  # the pool has stopped: no result will ask for these
        self._settle()
        if dropped:
            logger.info(
                "celery-tq: wrote the outcome(s) of %d task(s) the pool finished after the shutdown "
                "began (%s); their messages were not acked and come back redelivered, then acked "
                "without running",
                len(dropped),
                ", ".join(dropped[:5]) + (" ..." if len(dropped) > 5 else ""),
            )

    def _on_datagrams(self) -> None:
        if self._drain():
            self._next()

    def _drain(self) -> bool:
        """Move every datagram waiting in the socket to the queue."""
        got = False
        while True:
            try:
                data = self._recv.recv(MAX_DATAGRAM + 1024)
            except (BlockingIOError, InterruptedError):
                return got
            try:
                task_id, rows, address, number, encoded = pickle.loads(data)
                if not isinstance(rows, bytes) or not (encoded is None or isinstance(encoded, bytes)):
                    raise TypeError(f"an outcome of {type(rows).__name__}, {type(encoded).__name__}")
            except Exception:
                logger.exception("celery-tq: unreadable outcome from a pool process; dropped")
                continue
            if isinstance(address, str) and isinstance(number, int):
                self._replies[address] = max(number, self._replies.get(address, 0))
            self._queue.append(rows)
            self._encoded.append(encoded)
            self._arrived.append(task_id)
            self._unwritten[task_id] = self._unwritten.get(task_id, 0) + 1
            got = True

    def _take(self) -> _Batch:
        batch = self._batch = _Batch(self._queue, self._encoded, self._arrived, self._replies)
        self._queue, self._encoded, self._arrived, self._replies = [], [], [], {}
        return batch

    def _next(self) -> None:
        """Start writing what arrived, unless a batch is being written (it is taken after that)."""
        if self._batch is not None or not self._arrived or self._sync:
            return
        batch = self._take()
        loop_write = self._loop_write
        if loop_write is not None and self._watched >= 0:
            encoded = [e for e in batch.encoded if e is not None]
            complete = len(encoded) == len(batch.encoded)
            try:
                loop_write.send(() if complete else batch.rows, encoded if complete else ())
            except NotSent as exc:
                logger.debug("celery-tq: handed-over outcomes go to the writer thread (%s)", exc)
                self._unwatch()
            else:
                batch.on_loop = True
                return
        self._jobs.put(batch)

    def _on_written(self) -> None:
        """The loop connection's socket is readable: the batch's outcome, or a lost connection."""
        loop_write, batch = self._loop_write, self._batch
        assert loop_write is not None
        try:
            if not loop_write.poll():
                return
        except Exception as exc:
            self._unwatch()
            if batch is not None and batch.on_loop:
                logger.debug("celery-tq: handed-over outcomes go to the writer thread (%s)", exc)
                batch.on_loop = False
                self._jobs.put(batch)  # written (again: the merge rule holds) by the store's write
            return
        if batch is not None and batch.on_loop:
            self._complete(batch)

    def _unwatch(self) -> None:
        if self._watched >= 0:
            self._hub.remove_reader(self._watched)
            self._watched = -1
        if self._loop_write is not None:
            self._loop_write.close()

    def _complete(self, batch: _Batch) -> None:
        """``batch`` is written (or given up): release its acks, tell its pool processes, go on."""
        if batch.completed:
            return
        batch.completed = True
        ready: list[Callable[[], None]] = []
        for task_id in batch.outcomes:
            left = self._unwritten.get(task_id, 0) - 1
            if left > 0:
                self._unwritten[task_id] = left
                continue
            self._unwritten.pop(task_id, None)
            ready.extend(self._waiting.pop(task_id, ()))
        if self._batch is batch:
            self._batch = None
        self._report(batch.replies)
        self._held -= len(ready)
        for ack in ready:
            try:
                ack()
            except Exception:
                logger.exception("celery-tq: ack after the record was written failed")
        loop_write = self._loop_write
        if loop_write is not None and self._watched < 0 and loop_write.connected and not self._sync:
            self._watched = loop_write.fileno()
            self._hub.add_reader(self._watched, self._on_written)
        self._next()

    def _settle(self, timeout: float | None = None) -> None:
        """Blocking (shutdown): write everything received, release its acks."""
        limit = self.retry_for + 30 if timeout is None else timeout
        while True:
            self._drain()
            batch = self._batch
            if batch is None:
                if not self._arrived:
                    return
                batch = self._take()
                self._write(batch)
            elif batch.on_loop:
                if not self._wait_on_loop(limit):
                    self._write(batch)
            else:
                with self._finished:
                    if not self._finished.wait_for(lambda b=batch: b.finished, limit):  # type: ignore[misc]
                        logger.error("celery-tq: handed-over outcomes still unwritten at shutdown")
                        return
            self._complete(batch)

    def _wait_on_loop(self, timeout: float) -> bool:
        """Wait here for the loop connection's batch; False if it failed (not known written)."""
        loop_write = self._loop_write
        assert loop_write is not None
        deadline = time.monotonic() + timeout
        try:
            poller = select.poll()  # (select.select cannot watch a descriptor past 1023)
            poller.register(loop_write.fileno(), select.POLLIN)
            while not loop_write.poll():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("no answer from the store")
                poller.poll(remaining * 1000)
        except Exception:
            self._unwatch()
            return False
        return True

    def _write(self, batch: _Batch) -> None:
        named = ", ".join(batch.outcomes[:5])
        if len(batch.outcomes) > 5:
            named += f" and {len(batch.outcomes) - 5} more"
        write_with_retry(self.store, batch.rows, f"the outcomes of task(s) {named}", self.retry_for)

    def _run(self) -> None:
        """The writer thread: batches the loop cannot write, and the loop's connection."""
        while True:
            batch = self._jobs.get()
            try:
                if batch.outcomes:
                    self._write(batch)
                loop_write = self._loop_write
                if loop_write is not None and loop_write.closed and time.monotonic() >= self._connect_after:
                    try:  # (the loop closes a connection that failed)
                        loop_write.connect()
                    except Exception as exc:
                        self._connect_after = time.monotonic() + CONNECT_EVERY  # not once per batch
                        logger.debug("celery-tq: no loop connection to the store yet (%s)", exc)
            except Exception:
                logger.exception("celery-tq: writing handed-over outcomes failed")
            with self._finished:
                batch.finished = True
                self._finished.notify_all()
            if not self._sync:
                self._hub.call_soon(self._complete, batch)  # kombu's Hub: safe from another thread

    def _report(self, replies: dict[str, int]) -> None:
        """Tell each pool process up to which of its outcomes the store has them (or gave them up)."""
        for address, number in replies.items():
            with contextlib.suppress(OSError):  # a pool process that has exited
                self._reply.sendto(number.to_bytes(8, "big"), address)


def hand_over(store: Store, row: Row, request: Any) -> bool:
    """In a pool process: hand a late-acked task's outcome ``row`` to the main process.

    False when this outcome is written here instead (the caller writes it): not a pool
    process of a worker that hands outcomes over, not a state it takes, a task whose next
    step follows its record, or an outcome too large for one datagram."""
    handoff = _active
    if (
        handoff is None
        or handoff.owner == os.getpid()
        or row.get("state") not in HANDED_STATES
        or not getattr(request, ACK_KEY, False)
        or store.url != handoff.url
        or getattr(request, "chord", None)
        or getattr(request, "callbacks", None)
        or getattr(request, "errbacks", None)
        or getattr(request, "chain", None)
    ):
        return False
    child = _child_end(handoff)
    if child is None:
        return False
    taken = take_buffered(store)
    rows: Sequence[Row] = resolved([*taken, row])
    number = child.number + 1
    data = handoff.datagram(row["id"], rows, child.address, number)
    if len(data) <= MAX_DATAGRAM and handoff.send(data):
        child.number = number
        return True
    give_back(store, taken)  # the caller's write takes them along
    return False


class _ChildEnd:
    """A pool process's end: the socket on which it learns which of its outcomes are written."""

    def __init__(self, owner: int) -> None:
        self.pid = os.getpid()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # Linux's abstract namespace: no file to clean up, the name goes with the process
        self.address = f"\0celery-tq-outcomes-{owner}-{self.pid}-{uuid.uuid4().hex[:12]}"
        try:
            self.sock.bind(self.address)
        except OSError:
            self.sock.close()
            raise
        self.number = 0  # of the last outcome handed over
        self.written = 0  # the main process reported every outcome up to this one written

    def wait(self, number: int, timeout: float) -> bool:
        """Until outcome ``number`` is reported written; False after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.written < number:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(64)
            except TimeoutError:
                return False
            self.written = max(self.written, int.from_bytes(data, "big"))
        return True


def _child_end(handoff: Handoff) -> _ChildEnd | None:
    """This pool process's end; None where it cannot have one (no abstract socket namespace,
    i.e. not Linux): its pool process then writes its outcomes itself."""
    global _child, _unable
    pid = os.getpid()
    if _child is not None and _child.pid == pid:
        return _child
    if _unable == pid:
        return None
    try:
        _child = _ChildEnd(handoff.owner)
    except OSError as exc:
        _unable = pid
        logger.warning("celery-tq: this pool process writes its outcomes itself (%s)", exc)
        return None
    return _child


def settle_before_run(sender: Any = None, task: Any = None, **kwargs: Any) -> None:
    """``task_prerun`` in a pool process: all but its last ``UNRECORDED - 1`` outcomes are
    written before it runs another task (see :data:`UNRECORDED`).

    While the store is down this waits as the pool process's own write would
    (``tq_store_retry_timeout``), but at most half the next task's time limit, so that waiting
    never times out a task that has not run: after that the task runs, with a warning.
    """
    child, handoff = _child, _active
    if child is None or handoff is None or child.pid != os.getpid():
        return  # (a pool process has an end only once it handed an outcome to ``_active``)
    number = child.number - UNRECORDED + 1
    if child.written >= number:
        return
    timeout = handoff.retry_for + 5.0
    limit = _time_limit(task)
    if limit is not None:
        timeout = min(timeout, limit / 2)
    started = time.monotonic()
    if not child.wait(number, timeout):
        child.written = max(child.written, number)
        logger.warning(
            "celery-tq: outcomes this pool process handed over are not written after %.1f s; "
            "running task %s anyway",
            time.monotonic() - started,
            getattr(getattr(task, "request", None), "id", None),
        )


def _time_limit(task: Any) -> float | None:
    """The shortest time limit, soft or hard, of the task about to run, if it has one."""
    request = getattr(task, "request", None)
    conf = getattr(getattr(task, "app", None), "conf", None)
    candidates: list[Any] = [*(getattr(request, "timelimit", None) or ())]
    candidates += [getattr(task, "time_limit", None), getattr(task, "soft_time_limit", None)]
    if conf is not None:
        candidates += [conf.get("task_time_limit"), conf.get("task_soft_time_limit")]
    limits = [float(c) for c in candidates if isinstance(c, (int, float)) and c > 0]
    return min(limits) if limits else None


class HandoffRequest(Request):
    """Celery's request, whose ack waits for the record its pool process handed over.

    A message redelivered by the broker (``delivery_info['redelivered']``) whose task already
    ended (SUCCESS, FAILURE, REVOKED, REJECTED in the result backend) is acked without running
    again: on a worker that hands outcomes over this holds for Celery's own tasks too, not only
    celery-tq's (:class:`celery_tq.worker.request.TqRequest`). Celery's warm shutdown makes such
    messages: a task given to a pool process a moment before the shutdown, whose start the main
    process had not yet seen, is dropped from the pool's books (``Consumer.on_close`` flushes the
    pool), runs anyway, and its message goes back to the queue unacked. Only redelivered messages
    cost the backend read.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        handoff = _active
        if (
            handoff is not None
            and handoff.owner == os.getpid()
            and self.task.acks_late
            and worker_state.reserved_requests  # other tasks in the worker: batches form
        ):
            self.request_dict[ACK_KEY] = True

    def revoked(self) -> bool:
        """Celery's check before a run, plus: a redelivered task that already ended is skipped."""
        return bool(super().revoked()) or self._ended_before()

    def _ended_before(self) -> bool:
        if not (self.delivery_info or {}).get("redelivered"):
            return False
        try:
            state = self.task.backend.get_task_meta(self.id).get("status")
        except Exception:  # unknown: run it again (at least once)
            logger.warning("task %s[%s]: redelivered, and its state cannot be read", self.name, self.id)
            return False
        if state not in ENDED:
            return False
        logger.info(
            "task %s[%s]: redelivered but already %s; acked without running", self.name, self.id, state
        )
        worker_state.task_ready(self)
        self.acknowledge()
        return True

    def acknowledge(self) -> None:
        handoff = _active
        if (
            not self.acknowledged
            and handoff is not None
            and self.request_dict.get(ACK_KEY)
            and handoff.hold(self.id, self._acknowledge_now)
        ):
            return
        super().acknowledge()

    def _acknowledge_now(self) -> None:
        super().acknowledge()


class HandOutcomes(bootsteps.StartStopStep):
    """Worker step: a prefork worker writes its pool's outcomes in batches (SQL registries, and
    Redis over plain TCP)."""

    requires = ("celery.worker.components:Pool",)
    label = "tq-hand-outcomes"

    def __init__(self, w: Any, **kwargs: Any) -> None:
        super().__init__(w, **kwargs)
        self.handoff: Handoff | None = None

    def include_if(self, w: Any) -> bool:
        if not settings_for(w.app).hand_over_outcomes:
            return False
        store = _batching_store(w.app)
        pool_cls = getattr(w, "pool_cls", None)
        return (
            store is not None
            and bool(getattr(w, "use_eventloop", False))
            and isinstance(pool_cls, type)
            and pool_cls.__module__.endswith("prefork")
        )

    def create(self, w: Any) -> None:
        global _active
        store = _batching_store(w.app)
        assert store is not None  # include_if
        size = getattr(w, "max_concurrency", None) or getattr(w, "concurrency", None) or 1
        cap = HELD_PER_PROCESS * int(size)
        self.handoff = _active = Handoff(store, settings_for(w.app).store_retry_timeout, cap)
        for task in w.app.tasks.values():  # tasks on Celery's own request class hand over too
            if getattr(task, "Request", None) == _CELERY_REQUEST:
                task.Request = f"{__name__}:HandoffRequest"
        # before the pool forks, and only here: a worker that does not hand over pays nothing per
        # task (Celery's tracer sends task_prerun only while it has receivers)
        signals.task_prerun.connect(settle_before_run, weak=False, dispatch_uid="tq-handoff-settle")

    def start(self, w: Any) -> None:
        if self.handoff is not None:
            self.handoff.start(w.hub)

    def stop(self, w: Any) -> None:
        if self.handoff is not None:
            self.handoff.stop()

    def terminate(self, w: Any) -> None:
        self.stop(w)


class HandOutcomesPrefetch(bootsteps.StartStopStep):
    """Consumer step: each connection's prefetch count grows by the acks the hand-over holds."""

    requires = ("celery.worker.consumer.tasks:Tasks",)
    label = "tq-hand-outcomes-prefetch"

    def start(self, c: Any) -> None:
        handoff = _active
        if handoff is not None and handoff.owner == os.getpid():
            handoff.connected(getattr(c, "qos", None))


def _batching_store(app: Any) -> Store | None:
    from celery_tq.backend import TqBackend

    backend = app.backend
    if not isinstance(backend, TqBackend):
        return None
    store = backend.store
    return store if getattr(store, "batches_outcomes", False) else None
