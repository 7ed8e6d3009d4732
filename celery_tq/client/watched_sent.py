"""``task-sent`` events only while a monitor listens: the client's half of
:mod:`celery_tq.worker.watched_events`.

With ``task_send_sent_event`` on (the presets turn it on for Flower), every ``apply_async`` builds,
encodes and publishes a ``task-sent`` event. On Redis, batched with its task (:mod:`.batch`), the
event costs no round trip of its own, but it is most of what celery-tq adds to a call, and the
task's message leaves only with it; on RabbitMQ with publisher confirms (the production preset)
it waits for a confirm of its own, a second round trip per call. Nothing keeps an event that
nobody consumes.

So on Redis transports (``redis://``, ``sentinel://``, ``tq+redis://``) and on RabbitMQ with
confirms, a client process asks at most once per :data:`PROBE_EVERY` seconds, in the call that
finds the answer stale, whether a task-event monitor listens: it publishes an empty batch of task
events (``[]`` on ``task.multi``, which a receiver processes as nothing, as the worker's probe
does) and reads how many subscribers got it (Redis PUBLISH answers that) or whether RabbitMQ
returned it as unroutable (a mandatory publish, returned before its confirm). With nobody
listening, its calls send no ``task-sent`` event until a probe finds a monitor, so one that
connects (Flower, ``celery events``) sees ``task-sent`` events from within :data:`PROBE_EVERY`
seconds, and a task sent just before it from the worker's ``task-received`` on. The registry
records every task's ``QUEUED`` either way. On RabbitMQ without confirms (an event costs no round
trip there) and the embedded broker, when a probe fails, and with ``tq_pause_unwatched_events =
False``, every call sends its event, as Celery does.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Celery
from celery.events import get_exchange

from celery_tq import celery_seam
from celery_tq.event_probe import publish_empty_batch, receivers_of_empty_batch

__all__ = ["PROBE_EVERY", "SentEvents"]

logger = logging.getLogger("celery_tq")

PROBE_EVERY = 1.0  # seconds a probe's answer is kept


class SentEvents:
    """Whether this process's calls send their ``task-sent`` event (one per app and process)."""

    def __init__(self, app: Celery, pause_unwatched: bool) -> None:
        self.app = app
        self.pause_unwatched = pause_unwatched
        self._watched = True
        self._probe_at = 0.0  # time.monotonic() of the next probe

    def wanted(self, producer: Any) -> bool:
        """True if a call published on ``producer`` should send its ``task-sent`` event."""
        if not self.pause_unwatched:
            return True
        now = time.monotonic()
        if now < self._probe_at:
            return self._watched
        self._probe_at = now + PROBE_EVERY
        try:
            watched = self._probe(producer)
        except Exception as exc:  # the task's own publish reports a broken connection
            logger.debug("task-sent probe failed (%r); this call sends its event", exc)
            watched = True
        if watched != self._watched:
            logger.debug("task-sent events %s", "resumed: a monitor listens" if watched else "paused")
        self._watched = watched
        return watched

    def _probe(self, producer: Any) -> bool:
        """True unless an empty batch of task events published on ``producer``'s channel reached
        nobody: Redis PUBLISH counts the subscribers; RabbitMQ returns a mandatory message no queue
        took before it confirms it."""
        driver = producer.connection.transport.driver_type
        channel = producer.channel
        conf = self.app.conf
        exchange = get_exchange(producer.connection, name=conf.event_exchange)
        options = {"serializer": conf.event_serializer, "delivery_mode": "transient", "retry": False}
        if driver == "redis":
            counting = hasattr(channel, "tq_fanout_receivers")  # set up by an earlier probe
            if not counting and not celery_seam.count_fanout_receivers(channel):
                return True  # not kombu's Redis channel: nothing to learn from
            receivers = receivers_of_empty_batch(producer, exchange, **options)
            return receivers is None or receivers > 0
        if driver == "amqp" and _waits_for_confirms(channel):
            returned: list[object] = []

            def on_return(*args: Any) -> None:
                returned.append(args)

            channel.events["basic_return"].add(on_return)
            try:
                publish_empty_batch(producer, exchange, mandatory=True, **options)  # returned, then confirmed
            finally:
                channel.events["basic_return"].discard(on_return)
            return not returned
        return True  # an event costs no round trip here (or nothing tells): Celery's way


def _waits_for_confirms(channel: Any) -> bool:
    """Whether a py-amqp channel's publish waits for the broker's confirm (``confirm_publish``)."""
    confirmed = getattr(channel, "basic_publish_confirm", None)
    return confirmed is not None and getattr(channel, "basic_publish", None) == confirmed
