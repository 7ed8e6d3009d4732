"""A task-event monitor for tests: what Flower or ``celery events`` sees."""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery

__all__ = ["EventMonitor"]


class EventMonitor:
    """A task-event monitor in a thread (Celery's ``EventReceiver``, as Flower runs it), as a context
    manager; ``seen[type]`` = task ids, ``events``: every task event it received, in order."""

    def __init__(self, app: Celery, wakeup: bool) -> None:
        self.seen: dict[str, set[str]] = {}
        self.events: list[dict[str, Any]] = []
        self.ready, self.stop = threading.Event(), threading.Event()
        self.app, self.wakeup = app, wakeup
        self.thread = threading.Thread(target=self._capture, daemon=True)

    def _capture(self) -> None:
        def on_event(event: dict[str, Any]) -> None:
            if "uuid" in event:
                self.events.append(event)
                self.seen.setdefault(event["type"], set()).add(event["uuid"])

        with self.app.connection_for_read() as conn:
            receiver = self.app.events.Receiver(conn, handlers={"*": on_event})
            receiver.on_iteration = lambda: (
                self.ready.set(),
                setattr(receiver, "should_stop", self.stop.is_set()),
            )
            receiver.capture(limit=None, timeout=None, wakeup=self.wakeup)  # drains until should_stop

    def __enter__(self) -> EventMonitor:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)

    def saw_all_events_of(self, ids: list[str]) -> bool:
        kinds = ("task-received", "task-started", "task-succeeded")
        return all(set(ids) <= self.seen.get(kind, set()) for kind in kinds)
