"""One task reserved beyond the pool: a consumer bootstep.

With ``worker_prefetch_multiplier=1`` (the presets) a worker holds exactly as many unacknowledged
tasks as it has pool processes, so a process that finishes a task waits a broker round trip
(ack, delivery) for its next one. :class:`ReserveExtra` raises the prefetch count by
``tq_prefetch_extra`` (default 1) after Celery's ``Tasks`` step set it, again after every
reconnect. The order guarantee stays the one the presets promise: a newly arrived urgent task
starts after at most concurrency + ``tq_prefetch_extra`` lower ones, because at most that many
are in the worker's hands (running, reserved or on their way) when it reaches the broker.

A prefetch count of 0 (no limit, ``worker_prefetch_multiplier=0``) stays unlimited. A worker
without an event loop (a transport that cannot run in one) reserves nothing extra: there Celery
hands a task to a busy prefork pool with a blocking put, so a reserved task would stall the
worker's main thread (control commands, ``celery inspect``, Flower's worker pages) until a pool
process is free. The embedded broker runs in the event loop (it polls from a timer of it).
"""

from __future__ import annotations

from typing import Any

from celery import bootsteps

from celery_tq.settings import settings_for

__all__ = ["ReserveExtra"]


class ReserveExtra(bootsteps.StartStopStep):
    """Consumer step: prefetch count = concurrency x multiplier + ``tq_prefetch_extra``."""

    requires = ("celery.worker.consumer.tasks:Tasks",)
    label = "tq-prefetch-extra"

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.extra = settings_for(c.app).prefetch_extra

    def start(self, c: Any) -> None:
        qos = getattr(c, "qos", None)
        if self.extra and qos is not None and qos.value and c.hub is not None:
            qos.increment_eventually(self.extra)
            qos.update()
