"""The terminal view of ``celery tq status``: one snapshot as rich tables."""

from __future__ import annotations

from datetime import datetime

from rich.console import Group, RenderableType
from rich.table import Table

from celery_tq.monitoring.monitor import Snapshot

__all__ = ["render"]


def render(snap: Snapshot) -> RenderableType:
    queues = Table("queue", "priority", "waiting", "oldest waiting", "wait p50 / p95 (ms)", title="Queues")
    for depth in snap.queues:
        if depth.messages == 0 and depth.priority not in snap.oldest_waiting:
            continue
        oldest = snap.oldest_waiting.get(depth.priority) if depth.priority is not None else None
        wait = snap.queue_wait_ms.get(depth.priority) if depth.priority is not None else None
        queues.add_row(
            depth.queue,
            "all" if depth.priority is None else str(depth.priority),
            str(depth.messages),
            f"{oldest['age_s']}s ({oldest['name']})" if oldest else "",
            f"{wait['p50']} / {wait['p95']}" if wait else "",
        )
    running = Table("task", "id", "priority", "tags", "worker", "age (s)", title="Running")
    running.columns[1].no_wrap = True
    for r in snap.running:
        running.add_row(
            r["name"] or "",
            r["id"],
            str(r["priority"]),
            ",".join(r["tags"]),
            r["worker"] or "",
            str(r["age_s"]),
        )
    totals = Table("state", "tasks", title="Tasks")
    for state, n in sorted(snap.counts.items()):
        totals.add_row(state, str(n))
    failures = Table("tag", "failures (last hour)", title="Failures by tag")
    for tag, n in snap.failures_by_tag.items():
        failures.add_row(tag, str(n))
    for table in (queues, running, totals, failures):
        if not table.rows:  # an empty panel says so instead of showing a bare header
            table.add_row("[dim]none[/dim]", *[""] * (len(table.columns) - 1))
    rate = f"{snap.throughput_per_min:.0f} tasks/min"
    header = f"[bold]celery-tq[/bold] on {snap.broker} at {_local(snap.at)}: {rate}"
    return Group(header, queues, running, totals, failures)


def _local(at: str) -> str:
    """The snapshot's ISO time as local time for people: ``2026-12-01 10:02:03 CET``."""
    try:
        moment = datetime.fromisoformat(at).astimezone()
    except ValueError:
        return at
    return moment.strftime("%Y-%m-%d %H:%M:%S %Z").strip()
