"""Worker task events in batches: a consumer bootstep.

Celery's worker buffers task events (``task-received``, ``task-started``, ``task-succeeded``,
...) and flushes the buffer on the next turn of its event loop: with short tasks that is one
broker message for every one or two events, and on a busy RabbitMQ routing those messages
cost as much as the tasks themselves. With ``confirm_publish`` (the production preset) py-amqp
also makes every flush wait for the broker's confirm, stalling the event loop each time.

:class:`BatchedEvents` runs after Celery's ``Events`` step (again after every reconnect) and
makes the dispatcher flush at most every ``tq_event_flush_interval`` seconds (default 0.1) or
when ``tq_event_batch`` events (default 200) are buffered, whichever comes first, and once more
when the consumer stops. Monitors such as Flower see task events up to that interval later.
The dispatcher's channel publishes without confirms: events are monitoring data, which Celery
never confirms by default; task messages (retries, subtasks) keep theirs, since they go
through the app's producer pool, not the event dispatcher.
"""

from __future__ import annotations

from contextlib import suppress
from typing import Any

from celery import bootsteps

from celery_tq import celery_seam
from celery_tq.settings import settings_for

__all__ = ["BatchedEvents", "unconfirm"]


def unconfirm(producer: Any) -> bool:
    """Make ``producer`` publish without waiting for confirms; True if anything changed."""
    channel = producer.channel
    confirm = getattr(type(channel), "basic_publish_confirm", None)
    if confirm is None or getattr(channel.basic_publish, "__func__", None) is not confirm:
        return False  # not py-amqp, or confirms are off
    if celery_seam.in_confirm_mode(channel):  # confirm mode cannot be left: new channel
        channel = producer.connection.channel()
        producer.revive(channel)
    celery_seam.plain_basic_publish(channel)
    return True


class BatchedEvents(bootsteps.StartStopStep):
    """Consumer step: task events leave in batches, without publisher confirms."""

    requires = ("celery.worker.consumer.events:Events",)
    label = "tq-batched-events"

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        settings = settings_for(c.app)
        self.interval = float(settings.event_flush_interval)
        self.batch = int(settings.event_batch)
        self._scheduled = False

    def start(self, c: Any) -> None:
        dispatcher = getattr(c, "event_dispatcher", None)
        if dispatcher is None or not dispatcher.enabled:
            return
        if dispatcher.producer is not None:
            unconfirm(dispatcher.producer)
        if c.hub is not None and dispatcher.on_send_buffered is not None and self.interval > 0:
            dispatcher.buffer_limit = self.batch
            self._scheduled = False
            dispatcher.on_send_buffered = lambda: self._schedule(c)

    def _schedule(self, c: Any) -> None:
        if not self._scheduled:
            self._scheduled = True
            c.hub.call_later(self.interval, self._flush, c)

    def _flush(self, c: Any) -> None:
        self._scheduled = False
        dispatcher = getattr(c, "event_dispatcher", None)
        if dispatcher is not None:
            dispatcher.flush()

    def stop(self, c: Any) -> None:
        with suppress(Exception):  # the connection may already be gone; Celery keeps the buffer
            self._flush(c)

    shutdown = stop
