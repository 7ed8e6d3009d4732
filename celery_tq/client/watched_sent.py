"""``task-sent`` events only while a monitor listens (Redis): the client's half of
:mod:`celery_tq.worker.watched_events`.

With ``task_send_sent_event`` on (the presets turn it on for Flower), every ``apply_async`` builds,
encodes and publishes a ``task-sent`` event. Batched with its task (:mod:`.batch`) the event costs
no round trip of its own, but it is most of what celery-tq adds to a call, and it delays the task's
message, which leaves with it (``benchmarks/registry.py``: the call's overhead against plain
Celery dropped from about +0.09 ms to zero, and the round trips with it). On Redis nothing keeps
an event that nobody subscribes to.

So on Redis transports (``redis://``, ``sentinel://``, ``tq+redis://``) a client process asks at
most once per :data:`PROBE_EVERY` seconds, in the call that finds the answer stale, whether a task
event monitor listens: it publishes an empty batch of task events (``[]`` on ``task.multi``, which
a receiver processes as nothing, as the worker's probe does) and reads how many subscribers got it
(Redis PUBLISH answers that). With none, its calls send no ``task-sent`` event until a probe finds
one, so a monitor that connects (Flower, ``celery events``) sees ``task-sent`` events from within
:data:`PROBE_EVERY` seconds, and a task sent just before it from the worker's ``task-received`` on.
The registry records every task's ``QUEUED`` either way. On other transports (RabbitMQ publishes an
event without waiting for the broker; the embedded broker), when a probe fails, and with
``tq_pause_unwatched_events = False``, every call sends its event, as Celery does.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Celery
from celery.events import get_exchange
from kombu.connection import maybe_channel

from celery_tq import celery_seam

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
        """True unless an empty task-event batch on ``producer``'s Redis channel reached nobody."""
        if producer.connection.transport.driver_type != "redis":
            return True
        channel: Any = maybe_channel(producer.channel)
        if not hasattr(channel, "tq_fanout_receivers") and not celery_seam.count_fanout_receivers(channel):
            return True  # not kombu's Redis channel: nothing to learn from
        channel.tq_fanout_receivers = None
        conf = self.app.conf
        exchange = get_exchange(producer.connection, name=conf.event_exchange)
        producer.publish(
            [],
            routing_key="task.multi",
            exchange=exchange.name,
            declare=[exchange],
            serializer=conf.event_serializer,
            delivery_mode="transient",
            retry=False,
        )
        receivers = channel.tq_fanout_receivers
        return receivers is None or int(receivers) > 0
