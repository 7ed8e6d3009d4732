"""``task-sent`` events only while a monitor listens: the publisher's side of
:mod:`celery_tq.worker.watched_events` (Redis).

The presets turn ``task_send_sent_event`` on, so Flower shows tasks while they wait in the queue.
With nobody listening, each ``apply_async`` still builds, serializes and publishes that event (a
tenth of a millisecond of the caller's time, measured with ``benchmarks/registry.py``'s round
trips), and Redis drops it. On Redis (``redis://``, ``sentinel://``, ``tq+redis://``) PUBLISH
answers how many subscribers got a message: at most once every ``PROBE_EVERY`` s, the
publishing thread publishes an empty batch of task events (``[]`` on ``task.multi``: a monitor
processes nothing), as the worker's probe does, and sends ``task-sent`` events until the next
probe only if a monitor got it. A monitor that connects sees them within ``PROBE_EVERY`` s (the
task's other events come from the worker, which resumes at once). On other brokers, with
``task_send_sent_event`` off or ``tq_pause_unwatched_events = False``, nothing changes. A probe
that fails leaves the events on and probing pauses for ``BACKOFF`` s.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import Celery
from celery.events.event import get_exchange

from celery_tq import celery_seam

__all__ = ["SentEvents"]

logger = logging.getLogger("celery_tq")

PROBE_EVERY = 1.0  # seconds between probes
BACKOFF = 60.0  # seconds without probes after one failed


class SentEvents:
    """One app's switch for its ``task-sent`` events, shared by its publishing threads."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.watched = True  # until a probe says otherwise
        self._probe_at = 0.0
        self._lock = threading.Lock()

    def wanted(self, producer: Any) -> bool:
        """Whether the task about to go through ``producer`` should send its ``task-sent`` event."""
        if time.monotonic() < self._probe_at or not self._lock.acquire(blocking=False):
            return self.watched  # (a thread probing now: the last answer stands)
        try:
            now = time.monotonic()
            if now >= self._probe_at:
                self._probe(producer, now)
        finally:
            self._lock.release()
        return self.watched

    def _probe(self, producer: Any, now: float) -> None:
        channel = producer.channel
        if not hasattr(channel, "tq_fanout_receivers") and not celery_seam.count_fanout_receivers(channel):
            self.watched, self._probe_at = True, float("inf")  # not Redis: as Celery sends them
            return
        conf = self.app.conf
        try:
            exchange = get_exchange(producer.connection, name=conf.event_exchange)
            channel.tq_fanout_receivers = None
            producer.publish(
                [],
                exchange=exchange.name,
                routing_key="task.multi",
                declare=[exchange],
                serializer=conf.event_serializer,
                retry=False,
            )
            receivers = channel.tq_fanout_receivers
            if receivers is None:
                raise RuntimeError("the transport did not report the number of receivers")
        except Exception as exc:  # any failure: the events stay on
            logger.debug("task-sent event probe failed (%r); task-sent events stay on", exc)
            self.watched, self._probe_at = True, now + BACKOFF
            return
        self.watched, self._probe_at = int(receivers) > 0, now + PROBE_EVERY
