"""Whether a task-event monitor listens: the question a worker and a client ask alike.

Both publish an empty batch of task events (``[]`` on ``task.multi``, which a receiver processes as
nothing; Celery's receivers, Flower and ``celery events``, take it) where monitors subscribe: on
Redis PUBLISH answers how many subscribers got it, on RabbitMQ a mandatory publish comes back when
no queue took it. :mod:`celery_tq.worker.watched_events` pauses a worker's task events on the
answer, :mod:`celery_tq.client.watched_sent` a client's ``task-sent`` events.
"""

from __future__ import annotations

from typing import Any

__all__ = ["publish_empty_batch", "receivers_of_empty_batch"]


def publish_empty_batch(producer: Any, exchange: Any, **options: Any) -> None:
    """Publish ``[]`` on ``task.multi`` to the event ``exchange`` (kombu ``Exchange``)."""
    producer.publish([], routing_key="task.multi", exchange=exchange.name, declare=[exchange], **options)


def receivers_of_empty_batch(producer: Any, exchange: Any, **options: Any) -> int | None:
    """How many subscribers got the empty batch, on a Redis channel that counts them
    (:func:`celery_tq.celery_seam.count_fanout_receivers`); None if the transport did not say."""
    channel = producer.channel
    channel.tq_fanout_receivers = None
    publish_empty_batch(producer, exchange, **options)
    receivers = channel.tq_fanout_receivers
    return None if receivers is None else int(receivers)
