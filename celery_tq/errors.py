"""The errors of celery-tq: one tree, each error structured and retry-aware.

::

    TaskError                              root; .retryable, .context, .remote_traceback
    ├── ExecutionFailed(task_name, error)  the task raised something the caller cannot rebuild
    ├── TaskTimeout(task_name, duration)   ran past its timeout
    ├── ResourceUnavailable(resource)      a service the task needs is unreachable (retryable)
    ├── IoError(operation, path)           an OSError in the task
    ├── InvalidInput(message)              bad arguments or result (also ValueError; never retried)
    ├── WorkerLost(task_name)              the process running the task died
    ├── Cancelled(task_name)               the task was revoked (also Celery's TaskRevokedError)
    ├── StorageError(message, record_id)   the registry or result store failed
    ├── ConfigurationError(message)        settings that cannot work
    └── MetadataError(message)             priority, timeout or tags out of range (also ValueError)

Every error keeps its fields in ``args`` (so Celery's JSON path and pickle both rebuild it) and
exposes them as attributes. ``context`` lists the lines added by :func:`context` while the error
escaped, innermost first.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

from celery.exceptions import TaskRevokedError

__all__ = [
    "Cancelled",
    "ConfigurationError",
    "ExecutionFailed",
    "InvalidInput",
    "IoError",
    "MetadataError",
    "ResourceUnavailable",
    "StorageError",
    "TaskError",
    "TaskTimeout",
    "WorkerLost",
    "add_context",
    "context",
    "context_of",
]

_CONTEXT_ATTR = "__tq_context__"


class TaskError(Exception):
    """Raised for any failure celery-tq knows how to describe; the root of the tree."""

    retryable: ClassVar[bool] = False
    remote_traceback: str | None = None

    @property
    def context(self) -> list[str]:
        """Lines added by :func:`context` while this error escaped, innermost first."""
        return context_of(self)

    def __str__(self) -> str:
        return self.describe()

    def describe(self) -> str:
        return ", ".join(str(a) for a in self.args)


class ExecutionFailed(TaskError):
    """Raised when a task failed with an error whose own type cannot reach the caller."""

    def __init__(self, task_name: str, error: str, context: list[str] | None = None) -> None:
        super().__init__(task_name, error)
        self.task_name = task_name
        self.error = error
        for line in context or ():
            add_context(self, line)

    def describe(self) -> str:
        return f"task {self.task_name} failed: {self.error}"


class TaskTimeout(TaskError):
    """Raised when a task ran past its timeout."""

    def __init__(self, task_name: str, duration: float) -> None:
        super().__init__(task_name, duration)
        self.task_name = task_name
        self.duration = duration

    def describe(self) -> str:
        return f"task {self.task_name} exceeded its timeout of {self.duration:g}s"


class ResourceUnavailable(TaskError):
    """Raised when a service the task needs cannot be reached; retried with backoff."""

    retryable = True

    def __init__(self, resource: str) -> None:
        super().__init__(resource)
        self.resource = resource

    def describe(self) -> str:
        return f"resource unavailable: {self.resource}"


class IoError(TaskError):
    """Raised when a task's file or device operation failed (converted from ``OSError``)."""

    def __init__(self, operation: str, path: str = "") -> None:
        super().__init__(operation, path)
        self.operation = operation
        self.path = path

    def describe(self) -> str:
        return f"I/O error: {self.operation}" + (f" ({self.path})" if self.path else "")


class InvalidInput(TaskError, ValueError):
    """Raised when a task's arguments or result cannot be used; never retried."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class WorkerLost(TaskError):
    """Raised when the worker process running the task died before it finished."""

    def __init__(self, task_name: str, detail: str = "") -> None:
        super().__init__(task_name, detail)
        self.task_name = task_name
        self.detail = detail

    def describe(self) -> str:
        return f"worker running {self.task_name} was lost" + (f": {self.detail}" if self.detail else "")


class Cancelled(TaskError, TaskRevokedError):
    """Raised when the task was revoked before or while it ran.

    Also a :class:`celery.exceptions.TaskRevokedError`, so ``except TaskRevokedError`` written for
    plain Celery keeps catching it.
    """

    def __init__(self, task_name: str) -> None:
        super().__init__(task_name)
        self.task_name = task_name

    def describe(self) -> str:
        return f"task {self.task_name} was cancelled"


class StorageError(TaskError):
    """Raised when the registry or result store cannot read or write a record."""

    def __init__(self, message: str, record_id: str = "") -> None:
        super().__init__(message, record_id)
        self.message = message
        self.record_id = record_id

    def describe(self) -> str:
        return self.message + (f" (record {self.record_id})" if self.record_id else "")


class ConfigurationError(TaskError):
    """Raised when settings cannot work together (e.g. a timeout on a pool that cannot enforce it)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class MetadataError(TaskError, ValueError):
    """Raised when a priority, timeout or tag is out of range, at decoration or call time."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def context_of(exc: BaseException) -> list[str]:
    """The context lines attached to any exception (empty when none)."""
    lines: list[str] = exc.__dict__.setdefault(_CONTEXT_ATTR, [])
    return lines


def add_context(exc: BaseException, line: str) -> None:
    """Attach one context line to ``exc`` (also as a note, so worker logs show it)."""
    context_of(exc).append(line)
    exc.add_note(f"context: {line}")


@contextmanager
def context(message: str, *args: Any) -> Iterator[None]:
    """Add a line to whatever error escapes the block: ``with context("loading invoice %s", n):``."""
    try:
        yield
    except Exception as exc:
        add_context(exc, message % args if args else message)
        raise
