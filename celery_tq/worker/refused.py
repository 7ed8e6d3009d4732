"""Messages a worker cannot read end in a stated outcome, not in silence.

Celery logs a message whose body cannot be decoded (malformed JSON, a wrong content encoding)
and acks it: its caller then waits on ``PENDING`` forever. :class:`RecordRefusedMessages` (a
consumer bootstep) first gives such a message a terminal ``REJECTED`` record, when its headers
carry a task id a store can hold (readable by ``AsyncResult(id).state``, ``get()`` and the
registry), and counts every refused message in the registry's key ``tq-refused-messages``
(the exporter's ``tq_refused_messages_total``), then lets Celery log and ack it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import bootsteps, signals

from celery_tq.client.limits import MAX_ID
from celery_tq.errors import InvalidInput
from celery_tq.registry import store_for_url
from celery_tq.registry.capture import registry_url

__all__ = ["REFUSED_KEY", "RecordRefusedMessages", "refused_count"]

logger = logging.getLogger("celery_tq")

REFUSED_KEY = "tq-refused-messages"


def refused_count(store: Any) -> int:
    """How many messages workers refused to read, all time (0 if none or unknown)."""
    raw = store.kv_get([REFUSED_KEY])[0]
    return int(raw) if raw else 0


def readable_id(headers: Any) -> str | None:
    """The task id a message's headers carry, if a store can hold it."""
    task_id = headers.get("id") if isinstance(headers, dict) else None
    if isinstance(task_id, str) and 0 < len(task_id) <= MAX_ID and "\x00" not in task_id:
        return task_id
    return None


class RecordRefusedMessages(bootsteps.StartStopStep):
    """Consumer step: an undecodable message gets a REJECTED record (if it names a task id) and
    is counted, before Celery logs and acks it."""

    requires = ("celery.worker.consumer.tasks:Tasks",)
    label = "tq-refused-messages"

    def start(self, c: Any) -> None:
        original: Callable[[Any, BaseException], None] = type(c).on_decode_error.__get__(c)

        def on_decode_error(message: Any, exc: BaseException) -> None:
            try:
                _record(c, message, exc)
            finally:
                original(message, exc)

        c.on_decode_error = on_decode_error  # the task handler looks it up on each message
        if getattr(c, "task_consumer", None) is not None:
            c.task_consumer.on_decode_error = on_decode_error


def _record(c: Any, message: Any, exc: BaseException) -> None:
    headers = getattr(message, "headers", None)
    task_id = readable_id(headers)
    try:
        store_for_url(registry_url(c.app)).kv_incr(REFUSED_KEY, None)
    except Exception as error:  # the count is best effort; the REJECTED record below is not
        logger.warning("celery-tq: cannot count a refused message: %s", error)
    if task_id is None:
        logger.error(
            "celery-tq: refused a message without a readable task id (%s); counted in %s", exc, REFUSED_KEY
        )
        return
    name = headers.get("task") if isinstance(headers, dict) else None
    refusal = InvalidInput(f"the message of task {task_id} ({name or '?'}) cannot be decoded: {exc}")
    signals.task_rejected.send(sender=c, message=message, exc=refusal)
