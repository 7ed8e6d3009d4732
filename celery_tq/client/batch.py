"""One round trip per ``apply_async`` on Redis: the task message and its ``task-sent`` event together.

Celery publishes a task and then, with ``task_send_sent_event`` on (the presets turn it on for
Flower), its ``task-sent`` event on the same producer: two round trips to the broker, and on
kombu's stock Redis transport two Redis client objects. :func:`send_batched` runs Celery's sender
inside kombu's public ``Producer.batch()``, which on Redis transports (stock ``redis://`` and
``tq+redis://``) sends both commands in one pipeline when the context exits; other transports
(RabbitMQ, the embedded broker) publish at once, as before.

Two things the batch changes are put back here:

- Celery retries a publish whose connection failed (``task_publish_retry``) inside
  ``producer.publish``; in a batch the failure comes at the flush, outside that retry. A flush
  that fails on a connection error (kombu's ``BatchPublishError``, "delivery is uncertain") is
  therefore sent again the Celery way (with its retry policy and reconnects) when retrying is on,
  and its connection error raised as Celery raises it when retrying is off. As with Celery's own
  retry, a message whose first send reached the broker before the connection broke may be there
  twice (at least once).
- ``after_task_publish`` fires before the flush. ``on_sent`` callbacks registered during the
  call (:func:`after_send`) run only once the message has left, so a record of a message that
  was never sent is never written.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable
from typing import Any

from kombu.exceptions import BatchPublishError  # type: ignore[attr-defined]  # kombu 5.7; stubs predate it

__all__ = ["after_send", "send_batched"]

logger = logging.getLogger("celery_tq")

_pending: contextvars.ContextVar[list[Callable[[], None]] | None] = contextvars.ContextVar(
    "tq_publish_pending", default=None
)


def after_send(callback: Callable[[], None]) -> None:
    """Run ``callback`` once the message being published has been sent (at once outside a publish)."""
    pending = _pending.get()
    if pending is None:
        callback()
    else:
        pending.append(callback)


def send_batched(
    send: Callable[..., Any], producer: Any, name: str, message: Any, options: dict[str, Any], retry: bool
) -> Any:
    """Celery's ``send_task_message(producer, name, message, **options)`` in one broker round trip;
    ``retry``: whether Celery would retry this publish (``task_publish_retry`` or the call's own)."""
    pending: list[Callable[[], None]] = []
    token = _pending.set(pending)
    try:
        batch = getattr(producer, "batch", None)
        if batch is None:
            result = send(producer, name, message, **options)
        else:
            try:
                with batch():
                    result = send(producer, name, message, **options)
            except BatchPublishError as exc:
                cause: BaseException | None = exc.__cause__
                if cause is None or not isinstance(cause, tuple(producer.connection.connection_errors)):
                    raise
                if not retry:
                    raise cause from None  # as Celery raises it (``OperationalError`` for the caller)
                logger.debug(
                    "batched publish of %s failed (%r); sending it with Celery's retries", name, cause
                )
                del pending[:]  # the same message: its callbacks are registered again
                result = send(producer, name, message, **options)
    finally:
        _pending.reset(token)
    for callback in pending:
        callback()
    return result
