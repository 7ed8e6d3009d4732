"""Priority routing: which queue a priority goes to, and what number each broker needs."""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Queue

from celery_tq.metadata import MAX_PRIORITY, Priority, validate_priority
from celery_tq.settings import TqSettings, settings_for

__all__ = ["PriorityRouter", "broker_kind", "queues_for", "to_broker_priority"]


def broker_kind(url: str | None) -> str:
    """``amqp``, ``redis``, ``embedded``, ``memory`` or the scheme of any other broker."""
    scheme = (url or "amqp://").split("://", 1)[0].lower()
    if scheme in {"amqp", "amqps", "pyamqp", "librabbitmq"}:
        return "amqp"
    if scheme in {"redis", "rediss", "sentinel", "redis+socket", "tq+redis", "tq+rediss", "tq+sentinel"}:
        return "redis"
    if scheme == "tq+sqlite":
        return "embedded"
    return scheme


def to_broker_priority(driver_type: str, priority: int) -> int:
    """Translate 0..9 (higher is more urgent) to what the transport orders by.

    Redis pops step 0 first, so the number is inverted; AMQP (``x-max-priority``) and the
    embedded broker already take higher as more urgent.
    """
    if driver_type == "redis":
        return MAX_PRIORITY - priority
    return priority


def queues_for(names: list[str], kind: str, max_priority: int) -> list[Queue]:
    """Queues declared with ``x-max-priority`` so RabbitMQ honours priorities."""
    arguments = {"x-max-priority": max_priority} if kind == "amqp" else None
    return [Queue(name, routing_key=name, queue_arguments=arguments) for name in names]


class PriorityRouter:
    """A ``task_routes`` callable sending each task to the queue of its priority band."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    @property
    def settings(self) -> TqSettings:
        return settings_for(self.app)  # read once, at install

    def __call__(
        self,
        name: str,
        args: Any,
        kwargs: Any,
        options: dict[str, Any],
        task: Any = None,
        **kw: Any,
    ) -> dict[str, Any] | None:
        priority = options.get("priority")
        if priority is None:
            metadata = getattr(task, "tq_metadata", None)
            priority = metadata.priority if metadata is not None else Priority.NORMAL
        return {"queue": self.settings.queue_for(validate_priority(priority))}
