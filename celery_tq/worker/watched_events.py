"""Task events only while a monitor listens: a consumer bootstep (RabbitMQ, Redis).

With task events on (the presets turn them on for Flower), Celery's worker builds, serializes
and publishes three events per task whether or not anything consumes them; with no monitor
connected, RabbitMQ drops them at the exchange. On a busy worker that work costs throughput
(``benchmarks/priority.py``: "no monitor connected" against "a monitor listening").

:class:`WatchedEvents` publishes the worker's own events (``worker-online``, the
``worker-heartbeat`` every 2 s, ``worker-offline``) with the ``mandatory`` flag, on a channel of
the event connection that waits for the broker's confirm. When RabbitMQ returns one as
unroutable, no queue is bound to the event exchange, so nobody is listening: the worker pauses
its task events with Celery's own switch (the ``task`` event group, as ``celery control
disable_events`` does). The first worker event that is routed resumes them. A monitor that
connects (Flower, ``celery events``, an ``EventReceiver`` capturing with ``wakeup=True``)
broadcasts ``heartbeat`` to the workers at once, so it sees task events from within a round trip
of connecting; any other consumer of the event exchange within one heartbeat interval.

On Redis (``tq+redis://``, ``redis://``, ``sentinel://``) events go out by PUBLISH, which
answers how many subscribers got the message. When the step starts (Celery has sent
``worker-online`` by then) and after each worker event the probe publishes an empty batch of task
events (``[]`` on the ``task.multi`` routing key: a receiver processes
nothing) and reads that number: only task event monitors subscribe to it (other workers' gossip
subscribes to ``worker.*`` alone, when kombu's ``fanout_patterns`` is on, its default; with it
off every worker counts and events stay on).

Nothing changes for a worker whose task events are off, on other transports, or with
``tq_pause_unwatched_events = False``. If a probe fails or times out (a broker under a memory
alarm blocks publishers, a cut-off link), task events stay on (the log says the probe failed,
not that a monitor listens) and probing pauses for a minute; the next probe uses a new
channel, so a late confirm cannot answer it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import bootsteps
from kombu import Producer

from celery_tq import celery_seam
from celery_tq.event_probe import receivers_of_empty_batch
from celery_tq.settings import settings_for

__all__ = ["WatchedEvents"]

logger = logging.getLogger("celery_tq")

CONFIRM_TIMEOUT = 1.0  # seconds a probe waits for the broker's confirm
BACKOFF = 60.0  # seconds without probes after one failed


class _Probe:
    """Publishes worker events as probes and switches the dispatcher's task events (it becomes the
    dispatcher's publish when made)."""

    def __init__(self, dispatcher: Any) -> None:
        self.dispatcher = dispatcher
        self.watched = True  # until a probe says otherwise
        self.paused_task_group = False
        self.producer: Any = None  # a kombu Producer on the probe channel
        self.returned = False
        self.resume_probing_at = 0.0
        self.publish_plain = celery_seam.wrap_event_publish(dispatcher, self.publish)  # Celery's own

    def publish(self, event: Any, producer: Any, routing_key: str, *args: Any, **kwargs: Any) -> Any:
        """The dispatcher's publish: worker events are probes, task events go as before."""
        if not routing_key.startswith("worker.") or time.monotonic() < self.resume_probing_at:
            return self.publish_plain(event, producer, routing_key, *args, **kwargs)
        try:
            routed = self._probe(event, producer, routing_key, args, kwargs)
        except Exception as exc:  # any failure: stay on, publish as Celery would
            self._failed(exc)
            return self.publish_plain(event, producer, routing_key, *args, **kwargs)
        self._set_watched(routed)
        return None

    def check(self) -> None:
        """Probe at start, without a worker event (RabbitMQ: nothing; its probe is the heartbeat)."""

    def _failed(self, exc: BaseException) -> None:
        logger.debug("task event probe failed (%r); task events stay on", exc)
        self.producer = None  # a late confirm must not answer the next probe: a new channel
        self.resume_probing_at = time.monotonic() + BACKOFF
        self._set_watched(True, failed=exc)

    def _probe(self, event: Any, producer: Any, routing_key: str, args: Any, kwargs: Any) -> bool:
        """Publish ``event`` mandatory and confirmed; True if a queue took it (RabbitMQ)."""
        dispatcher = self.dispatcher
        if self.producer is None:
            channel = dispatcher.producer.connection.channel()
            channel.events["basic_return"].add(lambda *args: self._on_return(channel))
            channel.basic_publish = channel.basic_publish_confirm
            self.producer = Producer(channel, exchange=dispatcher.exchange, serializer=dispatcher.serializer)
        self.returned = False
        self.producer.publish(
            event,
            routing_key=routing_key,
            exchange=dispatcher.exchange.name,
            declare=[dispatcher.exchange],
            headers=dispatcher.headers,
            delivery_mode=dispatcher.delivery_mode,
            mandatory=True,
            confirm_timeout=CONFIRM_TIMEOUT,
        )
        return not self.returned  # RabbitMQ sends basic.return before the confirm

    def _on_return(self, channel: Any) -> None:
        if self.producer is not None and self.producer.channel is channel:  # not a dropped channel's
            self.returned = True

    def _set_watched(self, watched: bool, failed: BaseException | None = None) -> None:
        """Pause or resume task events; ``failed``: resumed because a probe failed, not a monitor."""
        if watched == self.watched:
            return
        self.watched = watched
        groups = self.dispatcher.groups
        if not watched:
            self.paused_task_group = not groups or "task" in groups
            if self.paused_task_group:
                groups.discard("task")
                groups.add("worker")
                logger.info("Task events paused: no monitor is listening (they resume when one connects)")
        elif self.paused_task_group:
            self.paused_task_group = False
            groups.add("task")
            if failed is None:
                logger.info("Task events resumed: a monitor is listening")
            else:  # e.g. a probe timed out while the broker was unreachable: nobody was seen
                logger.info(
                    "Task events back on: the event probe failed (%r), so whether a monitor "
                    "listens is unknown; probing again in %.0f s",
                    failed,
                    BACKOFF,
                )


class _CountingProbe(_Probe):
    """Redis: the worker event goes as Celery sends it; then an empty task-event batch
    is published and the number of subscribers that got it decides."""

    def check(self) -> None:
        """Probe once now, with the empty batch alone: a worker that starts while nobody listens
        pauses its task events at once instead of at its first heartbeat, 2 s later (Celery sends
        ``worker-online`` before this step starts)."""
        try:
            watched = self._probe_empty()
        except Exception as exc:
            self._failed(exc)
            return
        self._set_watched(watched)

    def _probe(self, event: Any, producer: Any, routing_key: str, args: Any, kwargs: Any) -> bool:
        watched = self._probe_empty()
        self.publish_plain(event, producer, routing_key, *args, **kwargs)
        return watched

    def _probe_empty(self) -> bool:
        dispatcher = self.dispatcher
        receivers = receivers_of_empty_batch(
            dispatcher.producer,
            dispatcher.exchange,
            serializer=dispatcher.serializer,
            headers=dispatcher.headers,
            delivery_mode=dispatcher.delivery_mode,
        )
        if receivers is None:
            raise RuntimeError("the transport did not report the number of receivers")
        return receivers > 0


class WatchedEvents(bootsteps.StartStopStep):
    """Consumer step: task events pause while no monitor listens (py-amqp, Redis)."""

    requires = ("celery.worker.consumer.events:Events",)
    label = "tq-watched-events"

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.on = bool(settings_for(c.app).pause_unwatched_events)
        self.probe: _Probe | None = None

    def start(self, c: Any) -> None:
        dispatcher = getattr(c, "event_dispatcher", None)
        if not self.on or dispatcher is None or not dispatcher.enabled or dispatcher.groups:
            return  # task events off, or filtered by the user: Celery's choice stands
        producer = dispatcher.producer
        channel = getattr(producer, "channel", None)
        if channel is not None and celery_seam.count_fanout_receivers(channel):
            self.probe = _CountingProbe(dispatcher)  # Redis: PUBLISH counts the receivers
        elif channel is not None and hasattr(type(channel), "basic_publish_confirm"):
            self.probe = _Probe(dispatcher)  # py-amqp: a mandatory, confirmed publish
        else:
            return  # nothing to learn from: events stay on
        self.probe.check()

    def stop(self, c: Any) -> None:
        # The probe channel closes with the dispatcher's connection (Celery's Events step closes
        # it); closing it here would wait for the broker's reply, and a blocked broker never sends one.
        probe, self.probe = self.probe, None
        if probe is not None:
            celery_seam.restore_event_publish(probe.dispatcher)  # worker-offline goes as Celery sends it

    shutdown = stop
