"""What a worker's main process does with a tq task's message (:class:`TqRequest`).

A task whose pool process died (OOM kill, segfault, ``os._exit``) runs again soon, a bounded
number of times, then ends as ``FAILURE`` with :class:`~celery_tq.errors.WorkerLost`.

Celery's own ``task_retry_on_worker_lost`` waits ``default_retry_delay`` (180 s) before the re-run,
and ``task_reject_on_worker_lost`` requeues a task that kills its process forever. For
:class:`~celery_tq.task.TqTask` the worker's main process uses :class:`TqRequest` (Celery's
documented custom-request hook, ``Task.Request``) instead: re-send after ``tq_worker_lost_delay``
seconds (doubling up to ``tq_worker_lost_delay_max``) at most ``tq_worker_lost_retries`` times
(a task may set ``tq_worker_lost_retries`` itself), counted in the message header ``tq_lost``;
the publisher sends it one broker priority level up, so it does not wait behind its peers.
The message is acked only after the re-send (or the terminal failure) is stored.

A message redelivered by the broker (``delivery_info['redelivered']``: a connection dropped before
its ack arrived, a dead worker's messages recovered, a warm shutdown's last tasks) whose task
already ended (SUCCESS, FAILURE, REVOKED, REJECTED in the result backend) is acked without running
again (:class:`~celery_tq.worker.handoff.HandoffRequest`, which this request extends). Only
redelivered messages cost the backend read.

A prefork worker notices a dead pool process in its 5 s pool maintenance (the exit sentinel is not
always seen); :class:`WatchPoolProcesses` runs that maintenance every half second, so the re-run
starts about ``tq_worker_lost_delay`` + 0.5 s after the process died.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from billiard.einfo import ExceptionInfo
from billiard.exceptions import WorkerLostError
from celery import bootsteps, signals, states
from celery.exceptions import Retry
from celery.worker.state import task_ready

from celery_tq import celery_seam
from celery_tq.client.publish import HEADER_LOST
from celery_tq.errors import WorkerLost
from celery_tq.registry.capture import RUN_KEY
from celery_tq.settings import settings_for
from celery_tq.worker.handoff import HandoffRequest

__all__ = ["HEADER_LOST", "TqRequest", "WatchPoolProcesses", "lost_count"]

logger = logging.getLogger("celery_tq")

POOL_CHECK_INTERVAL = 0.5


def lost_count(context: Any) -> int:
    """How many times this task's process already died under it (the ``tq_lost`` header)."""
    value = getattr(context, HEADER_LOST, None)
    if value is None:
        value = (getattr(context, "headers", None) or {}).get(HEADER_LOST)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


class TqRequest(HandoffRequest):
    """Celery's request (acked once its handed-over record is written), with celery-tq's
    bounded, quick re-run after a lost pool process."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Names this run in its request context: every registry write of the run (the pool's
        # STARTED, this process's RETRY/FAILURE after a lost process) counts it once.
        self.request_dict[RUN_KEY] = os.urandom(8).hex()

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> Any:
        exc = getattr(exc_info, "exception", None)
        exc = getattr(exc, "exc", exc)  # billiard's ExceptionWithTraceback
        if not isinstance(exc, WorkerLostError) or self._succeeded():
            return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
        task: Any = self.task
        settings = settings_for(task.app)
        limit = getattr(task, "tq_worker_lost_retries", None)
        limit = settings.worker_lost_retries if limit is None else int(limit)
        attempt = lost_count(self._run_context)
        if attempt < limit and self._retry(
            exc, exc_info, settings.worker_lost_countdown(attempt), attempt, limit
        ):
            return None
        if attempt >= limit:
            logger.error(
                "task %s[%s]: its process died %d times; failing it", self.name, self.id, attempt + 1
            )
        # Terminal: stored as FAILURE(WorkerLost) and acked, never requeued again.
        try:
            raise WorkerLost(self.name, f"{exc} (process lost {attempt + 1} times)") from exc
        except WorkerLost:
            terminal = ExceptionInfo()
        return super().on_failure(terminal, send_failed_event=send_failed_event, return_ok=False)

    @property
    def _run_context(self) -> Any:
        """The run's Context, as Celery's own ``on_failure`` re-sends it."""
        return celery_seam.request_context(self)

    def _succeeded(self) -> bool:
        """The process stored SUCCESS and died afterwards: Celery's own path acks it."""
        if self.ignore_result:
            return False
        try:
            return bool(self.task.backend.get_task_meta(self.id).get("status") == states.SUCCESS)
        except Exception:  # an unreachable store must not turn a lost process into a lost task
            logger.warning("task %s[%s]: cannot read its state after its process died", self.name, self.id)
            return False

    def _retry(self, exc: BaseException, exc_info: Any, countdown: float, attempt: int, limit: int) -> bool:
        """Re-send the task ``countdown`` seconds from now; False if the re-send failed."""
        task: Any = self.task
        context = self._run_context
        headers = {**(getattr(context, "headers", None) or {}), HEADER_LOST: attempt + 1}
        try:
            task.signature_from_request(
                context, countdown=countdown, retries=context.retries + 1, headers=headers
            ).apply_async()
        except Exception:
            logger.exception("task %s[%s]: cannot re-send it after its process died", self.name, self.id)
            return False
        task_ready(self)
        if self.store_errors:
            task.backend.mark_as_retry(self.id, exc, exc_info.traceback, request=context)
        if task.acks_late:
            self.acknowledge()
        self.send_event("task-retried", exception=repr(exc), traceback=str(exc_info.traceback))
        task.request_stack.push(context)
        try:
            signals.task_retry.send(
                sender=task,
                request=context,
                reason=Retry(exc=exc, when=countdown),  # type: ignore[arg-type]
                einfo=exc_info,
            )
        finally:
            task.request_stack.pop()
        logger.warning(
            "task %s[%s]: its process died (%s); running it again in %gs (%d/%d)",
            self.name,
            self.id,
            exc,
            countdown,
            attempt + 1,
            limit,
        )
        return True


class WatchPoolProcesses(bootsteps.StartStopStep):
    """Worker step: check the pool for dead processes every ``POOL_CHECK_INTERVAL`` seconds."""

    requires = ("celery.worker.components:Pool",)
    label = "tq-watch-pool"

    def start(self, w: Any) -> None:
        maintain = getattr(w.pool, "maintain_pool", None)
        if (
            getattr(w, "hub", None) is not None
            and callable(maintain)
            and w.pool_cls.__module__.endswith("prefork")
        ):
            w.hub.call_repeatedly(POOL_CHECK_INTERVAL, maintain)
