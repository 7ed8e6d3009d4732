"""The one place a message gets its metadata: headers, broker priority, time limits, kwargsrepr.

Every path that sends a task (``apply_async``, ``delay``, signatures and canvas, ``send_task`` by
name, retries) ends in ``app.amqp.send_task_message``; the app's sender is wrapped once
(:func:`celery_tq.celery_seam.wrap_task_sender`) by the hook here, which computes the message's
metadata once, stamps it into the headers (:func:`celery_tq.metadata.stamp`), marks the publish
as this app's for the registry's ``after_task_publish`` handler and sends the task with its
``task-sent`` event in one batch (:mod:`celery_tq.client.batch`), so all of them mean the same
thing on every broker. On Redis, and on RabbitMQ with publisher confirms, the event is left out
while no monitor listens (:mod:`celery_tq.client.watched_sent`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Celery
from kombu.exceptions import EncodeError

from celery_tq import celery_seam
from celery_tq.client.batch import send_batched
from celery_tq.client.limits import check_message
from celery_tq.client.watched_sent import SentEvents
from celery_tq.errors import InvalidInput
from celery_tq.metadata import CALL_METADATA, MAX_PRIORITY, TaskMetadata, stamp
from celery_tq.routing import to_broker_priority
from celery_tq.settings import TqSettings, refuse_pickle, settings_for
from celery_tq.signals import publishing

__all__ = ["wire_publisher"]

Sender = Callable[..., Any]
_MARK = "[tq "
HEADER_LOST = "tq_lost"  # celery_tq.worker.request counts re-sends after a lost process in it


def _defaults_for(app: Celery, name: str) -> TaskMetadata:
    task = app.tasks.get(name)
    metadata = getattr(task, "tq_metadata", None)
    return metadata if isinstance(metadata, TaskMetadata) else TaskMetadata()


def _with_metadata(app: Celery, settings: TqSettings, send: Sender) -> Sender:
    sent_events = SentEvents(app, settings.pause_unwatched_events)

    def send_task_message(producer: Any, name: str, message: Any, **options: Any) -> Any:
        headers, properties, body, sent_event = message
        check_message(
            name,
            {**headers, **(options.get("headers") or {})},
            body,
            options.get("queue") or options.get("routing_key"),
            options.get("serializer") or app.conf.task_serializer,
            settings.max_message_bytes,
        )
        metadata = options.pop(CALL_METADATA, None)  # computed by TqTask.apply_async
        if not isinstance(metadata, TaskMetadata):  # send_task by name, a plain task, a retry
            metadata = _defaults_for(app, name).merged_with_call(options)
        if "publish_timeout" in options:
            options["timeout"] = options.pop("publish_timeout")
        stamp(headers, metadata)
        if metadata.timeout is not None and not any(headers.get("timelimit") or ()):
            headers["timelimit"] = [metadata.timeout + settings.timeout_grace, metadata.timeout]
        kwargsrepr = str(headers.get("kwargsrepr") or "{}")
        if _MARK not in kwargsrepr:
            kwargsrepr = f"{kwargsrepr} {_MARK}{metadata.describe()}]"
            headers["kwargsrepr"] = kwargsrepr
            if sent_event:
                sent_event["kwargs"] = kwargsrepr
        if sent_event and not sent_events.wanted(producer):
            message = (headers, properties, body, None)  # nobody listens: no task-sent event
        driver = producer.connection.transport.driver_type
        # A run whose process died is re-sent one level up, so it does not queue behind its peers
        # (the task's own priority, in its headers and record, stays as it was).
        lost = bool((options.get("headers") or {}).get(HEADER_LOST) or headers.get(HEADER_LOST))
        broker_level = min(metadata.priority + 1, MAX_PRIORITY) if lost else metadata.priority
        options["priority"] = to_broker_priority(driver, broker_level)
        retry = options.get("retry")
        resend = bool(app.conf.task_publish_retry if retry is None else retry)
        try:
            with publishing(app):  # the task and its task-sent event: one round trip on Redis
                return send_batched(send, producer, name, message, options, resend)
        except EncodeError as exc:
            raise InvalidInput(f"arguments of {name} cannot be serialized ({exc}); nothing was sent") from exc

    return send_task_message


def wire_publisher(app: Celery) -> None:
    """Give ``app`` a task sender that adds tq metadata to every message (once per app)."""

    def wrap(send: Sender) -> Sender:
        refuse_pickle(app.conf)
        return _with_metadata(app, settings_for(app), send)

    celery_seam.wrap_task_sender(app, wrap)
