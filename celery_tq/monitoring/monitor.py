"""A snapshot of the system for ``celery tq status`` and the exporter: queues, running, waits.

Queue depth comes from the broker (per priority where the broker keeps priorities apart: Redis
priority lists, the embedded broker's rows; RabbitMQ gives one count per queue). Everything
else comes from the registry.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from celery import Celery

from celery_tq.routing import broker_kind, to_broker_priority
from celery_tq.settings import settings_for

__all__ = ["QueueDepth", "Snapshot", "oldest_waiting", "queue_depths", "queue_waits", "snapshot"]

WINDOW = 3600.0  # failures by tag, throughput and waits look at the last hour
RECENT_LIMIT = 2000


@dataclass(frozen=True)
class QueueDepth:
    queue: str
    priority: int | None  # None: the broker counts the queue as a whole (RabbitMQ)
    messages: int


@dataclass
class Snapshot:
    """One look at the system; ``as_dict()`` is what ``tq status --once --json`` prints."""

    at: str
    broker: str
    queues: list[QueueDepth]
    running: list[dict[str, Any]]
    counts: dict[str, int]
    throughput_per_min: float
    failures_by_tag: dict[str, int]
    queue_wait_ms: dict[int, dict[str, float]] = field(default_factory=dict)
    oldest_waiting: dict[int, dict[str, Any]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def queue_depths(app: Celery) -> list[QueueDepth]:
    """Messages waiting in each tq queue, per priority where the broker can tell."""
    settings = settings_for(app)
    kind = broker_kind(app.conf.broker_url)
    names = settings.queues()
    if kind == "redis":
        return _redis_depths(app, names)
    if kind == "embedded":
        return _embedded_depths(app, names)
    from amqp.exceptions import NotFound

    depths = []
    with app.connection_for_read() as conn:
        for name in names:
            # A channel per queue: a 404 closes the channel it happened on (and kombu would hand
            # that closed channel back as the default one, so every later queue would read 0).
            channel: Any = conn.channel()
            try:
                _, count, _ = channel.queue_declare(queue=name, passive=True)
            except NotFound:  # not declared yet: nothing waits in it
                count = 0
            finally:
                with contextlib.suppress(Exception):  # already closed by the broker after a 404
                    channel.close()
            depths.append(QueueDepth(name, None, int(count)))
    return depths


def _redis_depths(app: Celery, names: list[str]) -> list[QueueDepth]:
    steps = (app.conf.broker_transport_options or {}).get("priority_steps") or list(range(10))
    with app.connection_for_read() as conn:
        channel: Any = conn.default_channel
        client = channel.client
        depths = []
        for name in names:
            for step in steps:
                key = name if step == 0 else f"{name}{channel.sep}{step}"  # kombu's priority lists
                priority = to_broker_priority("redis", int(step))  # the inversion is its own inverse
                depths.append(QueueDepth(name, priority, int(client.llen(key))))
    return depths


def _embedded_depths(app: Celery, names: list[str]) -> list[QueueDepth]:
    from celery_tq.transport.sqlite import db_path, waiting_counts

    counts = waiting_counts(db_path(str(app.conf.broker_url).removeprefix("tq+")))
    return [QueueDepth(q, p, counts.get((q, p), 0)) for q in names for p in range(9, -1, -1)]


def snapshot(app: Celery, registry: Any) -> Snapshot:
    """Queues from the broker, the rest from ``registry`` (a :class:`celery_tq.registry.Registry`)."""
    now = time.time()
    since = now - WINDOW
    running = [
        {
            "id": r.id,
            "name": r.name,
            "priority": r.priority,
            "tags": sorted(r.tags),
            "worker": r.worker,
            "age_s": round(now - _epoch(r.started_at), 1) if r.started_at else None,
        }
        for r in registry.query(state="STARTED", limit=200)
    ]
    finished = registry.query(since=since, limit=RECENT_LIMIT)
    done_last_min = [
        r for r in finished if r.finished_at and _epoch(r.finished_at) >= now - 60 and r.state != "QUEUED"
    ]
    failures: dict[str, int] = {}
    for r in finished:
        if r.state == "FAILURE":
            for tag in r.tags:
                failures[tag] = failures.get(tag, 0) + 1
    waits = queue_waits(finished)
    return Snapshot(
        at=datetime.fromtimestamp(now, UTC).isoformat(),
        broker=broker_kind(app.conf.broker_url),
        queues=queue_depths(app),
        running=running,
        counts=registry.counts(),
        throughput_per_min=float(len(done_last_min)),
        failures_by_tag=dict(sorted(failures.items(), key=lambda kv: -kv[1])),
        queue_wait_ms={
            p: _percentiles([1000 * s for s in seconds]) for p, seconds in sorted(waits.items(), reverse=True)
        },
        oldest_waiting=oldest_waiting(registry, now),
    )


def oldest_waiting(registry: Any, now: float) -> dict[int, dict[str, Any]]:
    """The ``QUEUED`` task waiting longest at each priority (highest priority first): one
    oldest-first query per priority, so a backlog of any size names its real oldest task."""
    oldest: dict[int, dict[str, Any]] = {}
    for priority in range(9, -1, -1):
        for r in registry.query(state="QUEUED", priority=priority, limit=1, oldest_first=True):
            age = now - _epoch(r.submitted_at) if r.submitted_at else 0.0
            oldest[priority] = {"id": r.id, "name": r.name, "age_s": round(age, 1)}
    return oldest


def queue_waits(records: Iterable[Any]) -> dict[int, list[float]]:
    """Seconds from publish to start of each started record, by priority."""
    waits: dict[int, list[float]] = {}
    for r in records:
        if r.started_at and r.submitted_at:
            waits.setdefault(r.priority, []).append(_epoch(r.started_at) - _epoch(r.submitted_at))
    return waits


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"p50": round(statistics.median(ordered), 1), "p95": round(p95, 1), "n": len(ordered)}


def _epoch(value: datetime | float) -> float:
    return value.timestamp() if isinstance(value, datetime) else float(value)
