"""Outcomes handed from pool processes to the worker's main process, acked once durable.

Opt-in (``tq_hand_over_outcomes = True``): a task whose ack waits for its record is still
unacked, so a worker cut off from broker and store for longer than its heartbeat may have run
tasks that other workers then run again: at most ``UNRECORDED`` per pool process, 3c, where it
is c + 1 without the hand-over. A pool process runs no further task while more of its outcomes
than that are unwritten (:func:`settle_before_run`, on ``task_prerun``, connected by the worker
step): the main process tells it, on a datagram socket of its own, up to which of its outcomes
the store has them.

On a SQL registry (PostgreSQL, SQLite) a commit costs far more than the row it writes: an
outcome committed alone costs PostgreSQL about four times the CPU of one in a batch of ten
(``benchmarks/registry_batches.py``). So in a prefork worker with an event loop, a pool process
does not write a late-acked task's outcome itself. It sends the outcome's rows (with whatever
``STARTED``/``QUEUED`` it still buffers) to the main process over a local datagram socket and
goes on with its next task. One thread of the main process writes everything that arrived while
its previous write ran in one transaction (group commit: no lingering, so ``get()`` waits no
longer), and the main process acks each of those tasks' messages only once that transaction has
committed. Invariant: a
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
write would be, and its tasks are acked. Outcomes too large for one datagram (``MAX_DATAGRAM``),
tasks with callbacks, chains or chords (their next step reads or follows the record), early-acked
tasks and tasks whose request class is not celery-tq's keep the pool
process's own write; so does a task that reaches a worker holding no other task: there is no
batch to join, and the hop to the main process would only lengthen its round trip (about
0.4 ms: the main process is busy with that same task's result when the outcome arrives).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
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
from celery_tq.registry.record import Row
from celery_tq.registry.writer import give_back, resolved, take_buffered, write_with_retry
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


class Handoff:
    """The main process's end: receives outcomes, writes them in batches, releases their acks."""

    def __init__(self, store: Store, retry_for: float, max_extra: int = 1) -> None:
        self.store, self.url, self.retry_for = store, store.url, retry_for
        self.max_extra = max(1, max_extra)  # prefetch slots held acks may add
        self.owner = os.getpid()
        self._recv, self._send = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._recv.setblocking(False)
        self._send.settimeout(SEND_TIMEOUT)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._lock = threading.Lock()
        self._written = threading.Condition(self._lock)
        self._queue: list[Row] = []  # received, not yet taken by the writer thread
        self._arrived: list[str] = []  # the tasks whose outcomes those rows carry, one per outcome
        self._replies: dict[str, int] = {}  # a pool process's address: the number of its latest outcome
        self._reply = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._reply.setblocking(False)
        self._unwritten: dict[str, int] = {}  # task id: outcomes received and not yet committed
        self._waiting: dict[str, list[Callable[[], None]]] = {}  # task id: acks held for it
        self._ready: list[Callable[[], None]] = []  # acks whose records are committed
        self._hub: Any = None
        self._sync = False  # shutting down: the event loop may not run; acks wait in place
        self._thread: threading.Thread | None = None
        # The event loop's thread only: acks held now, prefetch slots added for them, the
        # most held since the last shrink, and the consumer's prefetch count (per connection).
        self._held = self._allowed = self._peak = 0
        self._qos: Any = None

    # -- a pool process -------------------------------------------------------------------
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
        with self._lock:
            drained = self._drain()
            if task_id not in self._unwritten:
                held = False
            elif self._sync:  # shutting down: wait here, then the caller acks
                self._wake()
                while task_id in self._unwritten:
                    if not self._written.wait(self.retry_for + 30):
                        logger.error("celery-tq: record of task %s still unwritten at shutdown", task_id)
                        break
                held = False
            else:
                self._waiting.setdefault(task_id, []).append(ack)
                held = True
        if drained:
            self._wake()
        if held:
            self._grow()
        return held

    def stop(self, timeout: float = 60.0) -> None:
        """Shutdown: write what was received, release its acks here; later acks wait in place."""
        with self._lock:
            self._sync = True
            self._drain()
            self._wake()
            self._written.wait_for(lambda: not self._unwritten, timeout)
        self._release()

    def _drain(self) -> bool:
        """Move every datagram waiting in the socket to the queue (lock held)."""
        got = False
        while True:
            try:
                data = self._recv.recv(MAX_DATAGRAM + 1024)
            except (BlockingIOError, InterruptedError):
                return got
            try:
                task_id, rows, address, number = pickle.loads(data)
            except Exception:
                logger.exception("celery-tq: unreadable outcome from a pool process; dropped")
                continue
            if isinstance(address, str) and isinstance(number, int):
                self._replies[address] = max(number, self._replies.get(address, 0))
            self._queue.extend(rows)
            self._arrived.append(task_id)
            self._unwritten[task_id] = self._unwritten.get(task_id, 0) + 1
            got = True

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # else a wake-up is pending already
            os.write(self._wake_w, b"\0")

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._recv, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            try:
                poller.poll(1000)
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
                with self._lock:
                    self._drain()
                    batch, self._queue = self._queue, []
                    outcomes, self._arrived = self._arrived, []
                    replies, self._replies = self._replies, {}
                try:
                    if outcomes:
                        self._write(batch, outcomes)
                finally:
                    self._report(replies)
            except Exception:
                logger.exception("celery-tq: writing handed-over outcomes failed")

    def _report(self, replies: dict[str, int]) -> None:
        """Tell each pool process up to which of its outcomes the store has them (or gave them up)."""
        for address, number in replies.items():
            with contextlib.suppress(OSError):  # a pool process that has exited
                self._reply.sendto(number.to_bytes(8, "big"), address)

    def _write(self, batch: list[Row], outcomes: list[str]) -> None:
        named = ", ".join(outcomes[:5]) + (f" and {len(outcomes) - 5} more" if len(outcomes) > 5 else "")
        write_with_retry(self.store, batch, f"the outcomes of task(s) {named}", self.retry_for)
        with self._lock:
            for task_id in outcomes:
                left = self._unwritten.get(task_id, 0) - 1
                if left > 0:
                    self._unwritten[task_id] = left
                    continue
                self._unwritten.pop(task_id, None)
                self._ready.extend(self._waiting.pop(task_id, ()))
            self._written.notify_all()
            release = bool(self._ready) and not self._sync
        if release:
            self._hub.call_soon(self._release)  # kombu's Hub: safe from another thread

    def _release(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, []
        self._held -= len(ready)
        for ack in ready:
            try:
                ack()
            except Exception:
                logger.exception("celery-tq: ack after the record was written failed")


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
    data = pickle.dumps((row["id"], list(rows), child.address, number), protocol=pickle.HIGHEST_PROTOCOL)
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
    """Celery's request, whose ack waits for the record its pool process handed over."""

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
    """Worker step: a prefork worker on a SQL registry writes its pool's outcomes in batches."""

    requires = ("celery.worker.components:Pool",)
    label = "tq-hand-outcomes"

    def __init__(self, w: Any, **kwargs: Any) -> None:
        super().__init__(w, **kwargs)
        self.handoff: Handoff | None = None

    def include_if(self, w: Any) -> bool:
        if not settings_for(w.app).hand_over_outcomes:
            return False
        store = _sql_store(w.app)
        pool_cls = getattr(w, "pool_cls", None)
        return (
            store is not None
            and bool(getattr(w, "use_eventloop", False))
            and isinstance(pool_cls, type)
            and pool_cls.__module__.endswith("prefork")
        )

    def create(self, w: Any) -> None:
        global _active
        store = _sql_store(w.app)
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


def _sql_store(app: Any) -> Store | None:
    from celery_tq.backend import TqBackend

    backend = app.backend
    if not isinstance(backend, TqBackend):
        return None
    store = backend.store
    return store if getattr(store, "batches_outcomes", False) else None
