"""What a worker refuses to start with: a worker bootstep that raises ``ConfigurationError``.

- pickle allowed without ``tq_allow_pickle`` (Celery logs and swallows errors raised in
  ``on_after_configure``, where celery-tq reads the configuration, so it is refused again here);
- a plain Celery task with ``soft_time_limit``/``time_limit`` on a pool that cannot enforce them
  (threads, solo, eventlet, gevent), where Celery silently ignores them. A ``TqTask``'s Celery
  limits are enforced there like ``timeout=`` (see :mod:`celery_tq.worker.timeouts`).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps

from celery_tq.checks.broker import redis_persistence_findings
from celery_tq.errors import ConfigurationError
from celery_tq.settings import refuse_pickle
from celery_tq.task import TqTask

__all__ = ["RefuseUnsafeConfig"]

logger = logging.getLogger("celery_tq")


class RefuseUnsafeConfig(bootsteps.Step):
    """Worker step: the worker does not start on a configuration celery-tq refuses."""

    label = "tq-refuse-unsafe-config"

    def __init__(self, w: Any, **kwargs: Any) -> None:
        super().__init__(w, **kwargs)
        refuse_pickle(w.app.conf)
        for finding in redis_persistence_findings(w.app):  # said where operators look: the log
            logger.warning("celery-tq: %s; %s", finding.message, finding.fix)
        if not w.pool_cls.__module__.endswith("prefork"):
            _refuse_unenforced_limits(w.app, w.pool_cls.__module__.rsplit(".", 1)[-1])


def _refuse_unenforced_limits(app: Any, pool: str) -> None:
    limited = sorted(
        name
        for name, task in app.tasks.items()
        if not isinstance(task, TqTask)
        and not name.startswith("celery.")  # Celery's own tasks: never long-running
        and (task.soft_time_limit or task.time_limit)
    )
    if limited:
        raise ConfigurationError(
            f"the {pool} pool cannot enforce Celery's soft_time_limit/time_limit of "
            f"{', '.join(limited[:5])}{' ...' if len(limited) > 5 else ''}: Celery would ignore them. "
            "Run them on prefork, or make them tq tasks (base=TqTask / @tq.task), whose limits "
            "every pool but eventlet and gevent enforces"
        )
