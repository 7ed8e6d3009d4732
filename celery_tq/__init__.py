"""celery-tq: Celery as a task queue you can trust.

Tasks carry metadata (priority, timeout, tags), fail with structured errors that reach the caller
intact, and mean the same priority on every broker. ``install(app)`` wires it all; importing this
package has no side effects.
"""

from __future__ import annotations

from celery_tq import errors, presets
from celery_tq.errors import context
from celery_tq.metadata import Priority, TaskMetadata
from celery_tq.system import TaskQueueSystem, install, system_for
from celery_tq.task import TqTask

__version__ = "0.1.0"

__all__ = [
    "Priority",
    "TaskMetadata",
    "TaskQueueSystem",
    "TqTask",
    "context",
    "errors",
    "install",
    "presets",
    "system_for",
]
