"""Prometheus metrics (``celery -A mod tq exporter --port N``), collected fresh at each scrape.

Label cardinality stays bounded: task names and priorities come from the app, and tags only
from the ``tq_metric_tags`` allowlist. The task metrics describe the records the registry
holds now, which it forgets again: ``tq_tasks`` and ``tq_recent_task_failures_by_tag`` are gauges.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from celery import Celery
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from celery_tq.monitoring.monitor import RECENT_LIMIT, WINDOW, queue_depths, queue_waits
from celery_tq.settings import settings_for
from celery_tq.worker.refused import refused_count

__all__ = ["TqCollector"]

logger = logging.getLogger("celery_tq")

WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0)


class TqCollector(Collector):
    """Queue depth and queue-wait histograms by priority, tasks by state and name, tagged failures."""

    def __init__(self, app: Celery, registry: Any) -> None:
        self.app = app
        self.registry = registry
        self.allowed_tags = settings_for(app).metric_tags

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily("tq_up", "1 when the broker and the registry answered this scrape")
        try:
            families = list(self._families())
        except Exception as exc:  # broker or store down: say so, and try again next scrape
            logger.warning("celery-tq exporter: %s (retrying at the next scrape)", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self) -> Iterator[Any]:
        depth = GaugeMetricFamily(
            "tq_queue_depth", "Messages waiting in a tq queue", labels=["queue", "priority"]
        )
        for d in queue_depths(self.app):
            depth.add_metric([d.queue, "" if d.priority is None else str(d.priority)], d.messages)
        yield depth

        records = self.registry.query(limit=RECENT_LIMIT)
        by_state_name: dict[tuple[str, str], int] = {}
        for r in records:
            key = (r.state, r.name or "")
            by_state_name[key] = by_state_name.get(key, 0) + 1
        tasks = GaugeMetricFamily(
            "tq_tasks", f"Recent tasks (last {RECENT_LIMIT}) by state and name", labels=["state", "name"]
        )
        for (state, name), n in sorted(by_state_name.items()):
            tasks.add_metric([state, name], n)
        yield tasks

        histogram = HistogramMetricFamily(
            "tq_queue_wait_seconds", "Time from publish to start, recent tasks", labels=["priority"]
        )
        for priority, values in sorted(queue_waits(records).items()):
            buckets = [(str(b), sum(1 for v in values if v <= b)) for b in WAIT_BUCKETS]
            buckets.append(("+Inf", len(values)))
            histogram.add_metric([str(priority)], buckets, sum(values))
        yield histogram

        refused = CounterMetricFamily(
            "tq_refused_messages", "Messages workers could not read (refused, acked), all time"
        )
        refused.add_metric([], refused_count(self.registry.store))
        yield refused

        yield self._recent_failures_by_tag()

    def _recent_failures_by_tag(self) -> GaugeMetricFamily:
        """A gauge, not a counter: failures leave the window (and expire from the registry), so
        the number goes down; counted by the store (no record cap), one count per allowed tag."""
        tagged = GaugeMetricFamily(
            "tq_recent_task_failures_by_tag",
            f"Tasks submitted in the last {WINDOW:.0f} s that ended in FAILURE, "
            "per tag allowed by tq_metric_tags",
            labels=["tag"],
        )
        since = time.time() - WINDOW
        for tag in sorted(self.allowed_tags):
            tagged.add_metric(
                [tag], self.registry.counts(state="FAILURE", tags={tag}, since=since).get("FAILURE", 0)
            )
        return tagged
