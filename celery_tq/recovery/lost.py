"""Tasks lost in the broker: recorded ``QUEUED`` for longer than a cut-off, no message left.

A Redis broker that restarts without persistence (or is flushed) drops its queues; the records
of those tasks would stay ``QUEUED`` forever. :func:`find_lost` compares the registry with what
the broker holds (:mod:`celery_tq.recovery.scan`), twice, ``confirm_after`` seconds apart, so a
task a worker is just fetching or starting is not taken for lost. :func:`resend` publishes a lost
task again with the same id, name, queue, priority, tags and call (only when its record kept the
whole call: :mod:`celery_tq.registry.call`); :func:`mark` ends it as ``FAILURE`` with
:class:`~celery_tq.errors.ResourceUnavailable`, so ``AsyncResult.get()`` raises instead of waiting.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from celery import Celery, states
from celery.app.task import Context
from kombu.utils.json import dumps, loads

from celery_tq import error_codec
from celery_tq.errors import ResourceUnavailable
from celery_tq.metadata import HEADER_PRIORITY, HEADER_TAGS
from celery_tq.recovery import scan as broker_scan
from celery_tq.registry import Registry
from celery_tq.registry.call import KeptCall, kept_call
from celery_tq.registry.record import QUEUED, TaskRecord, change, to_record
from celery_tq.registry.writer import flush_all, write_with_retry

__all__ = ["LostTask", "find_lost", "lost_error", "mark", "resend"]

CONFIRM_AFTER = 1.0  # s between the two looks at the broker


@dataclass(frozen=True)
class LostTask:
    """A task recorded ``QUEUED`` whose message the broker no longer holds."""

    record: TaskRecord
    call: KeptCall | None  # None: the record did not keep the whole call (cannot be re-sent)

    def age(self, now: float | None = None) -> float:
        submitted = self.record.submitted_at
        return 0.0 if submitted is None else (now or time.time()) - submitted.timestamp()


def find_lost(
    app: Celery, registry: Registry, older_than: float, limit: int, confirm_after: float = CONFIRM_AFTER
) -> list[LostTask]:
    """The oldest ``limit`` tasks ``QUEUED`` for more than ``older_than`` s with no message left
    (oldest first: each ``--resend``/``--mark`` run works through a backlog larger than ``limit``)."""
    broker_scan.check_readable(app)  # refused before anything else, with the reason
    candidates = registry.query(state=QUEUED, until=time.time() - older_than, limit=limit, oldest_first=True)
    if not candidates:
        return []
    queues = {r.queue for r in candidates if r.queue}
    present = broker_scan.task_ids(app, queues)
    suspects = [r.id for r in candidates if r.id not in present]
    if suspects and confirm_after > 0:
        time.sleep(confirm_after)  # a fetch or a start in flight has landed by now
        present = broker_scan.task_ids(app, queues)
    lost = []
    for row in registry.store.read(suspects):  # again: a run may have started meanwhile
        if row is None or row.get("state") != QUEUED or row["id"] in present:
            continue
        meta = loads(row["meta"]) if row.get("meta") else None
        lost.append(LostTask(to_record(row), kept_call(meta if isinstance(meta, dict) else None)))
    return lost


def resend(app: Celery, task: LostTask) -> None:
    """Publish a lost task again as it was sent: same id, name, queue, priority, tags and call."""
    record, call = task.record, task.call
    if call is None or not record.name:
        raise ValueError(f"task {record.id} cannot be re-sent: its arguments were not kept")
    options: dict[str, Any] = dict(call.options)
    if record.priority is not None:
        options["priority"] = record.priority
    if record.queue:
        options["queue"] = record.queue
    app.send_task(
        record.name,
        call.args,
        call.kwargs,
        task_id=record.id,
        retries=record.retries,
        tq_tags=sorted(record.tags),
        root_id=record.root_id,
        parent_id=record.parent_id,
        group_id=record.group_id,
        add_to_parent=False,
        **options,
    )
    flush_all()  # its QUEUED record, before this process exits


def lost_error(task: LostTask) -> ResourceUnavailable:
    """What ``get()`` raises for a task marked lost."""
    age = timedelta(seconds=round(task.age()))
    return ResourceUnavailable(
        f"broker: task {task.record.name or task.record.id} was lost in the broker (recorded QUEUED "
        f"{age} ago, no message left); marked by celery tq lost --mark"
    )


def mark(app: Celery, registry: Registry, task: LostTask) -> None:
    """End a lost task as ``FAILURE`` (:func:`lost_error`) through the result backend's normal
    write, which is the registry's with the ``tq`` backend (else the registry is written too)."""
    from celery_tq.backend import TqBackend

    record, error = task.record, lost_error(task)
    request = Context(
        id=record.id,
        task=record.name,
        retries=record.retries,
        delivery_info={"routing_key": record.queue},
        root_id=record.root_id,
        parent_id=record.parent_id,
        group=record.group_id,
        **{HEADER_PRIORITY: record.priority, HEADER_TAGS: sorted(record.tags)},
    )
    backend: Any = app.backend
    backend.mark_as_failure(record.id, error, request=request, call_errbacks=False)
    if not (isinstance(backend, TqBackend) and backend.store is registry.store):
        now = time.time()
        row = change(record.id, states.FAILURE, record.retries, submitted_at=now, finished_at=now)
        row["error"] = dumps(error_codec.encode(error))
        write_with_retry(registry.store, [row], f"FAILURE of lost task {record.id}")
