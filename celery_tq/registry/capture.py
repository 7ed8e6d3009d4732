"""What a record says about a task, read from a message's headers or a worker's request."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from celery_tq.metadata import HEADER_PRIORITY, HEADER_TAGS, carried
from celery_tq.settings import settings_for

__all__ = ["RUN_KEY", "from_headers", "from_request", "registry_url", "run_of"]

#: The id the worker's main process gives each run it hands to the pool (``TqRequest``); it
#: reaches the run's request context, so every write of one run names the same run.
RUN_KEY = "tq_run"


def registry_url(app: Celery) -> str:
    """Where ``app`` keeps records: ``tq_registry_url``, else a ``tq+`` result backend, else memory."""
    url = settings_for(app).registry_url
    if url:
        return url
    backend = app.conf.result_backend
    if isinstance(backend, str) and backend.startswith("tq+"):
        return backend
    return "memory://"


def from_headers(headers: dict[str, Any], routing_key: str | None) -> dict[str, Any]:
    """Fields of a published message (the client's ``QUEUED`` write)."""
    metadata = carried(headers)
    return {
        "name": headers.get("task"),
        "args_repr": _text(headers.get("argsrepr")),
        "kwargs_repr": _text(headers.get("kwargsrepr")),
        "queue": routing_key or None,
        "priority": _int(metadata.get(HEADER_PRIORITY)),
        "tags": metadata.get(HEADER_TAGS),
        "parent_id": headers.get("parent_id"),
        "root_id": headers.get("root_id"),
        "group_id": headers.get("group"),
    }


def from_request(request: Any) -> tuple[int, dict[str, Any]]:
    """``(retries, fields)`` of a worker's request context (None allowed)."""
    if request is None:
        return 0, {}
    headers = getattr(request, "headers", None) or {}

    def value(key: str) -> Any:
        found = getattr(request, key, None)
        return found if found is not None else headers.get(key)

    delivery = getattr(request, "delivery_info", None) or {}
    metadata = carried(request)
    fields = {
        "name": getattr(request, "task", None) or getattr(request, "name", None),
        "args_repr": _text(value("argsrepr")),
        "kwargs_repr": _text(value("kwargsrepr")),
        "worker": getattr(request, "hostname", None),
        "queue": delivery.get("routing_key") or None,
        "priority": _int(metadata.get(HEADER_PRIORITY)),
        "tags": metadata.get(HEADER_TAGS),
        "parent_id": getattr(request, "parent_id", None),
        "root_id": getattr(request, "root_id", None),
        "group_id": getattr(request, "group", None),
    }
    return int(getattr(request, "retries", 0) or 0), fields


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _int(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def run_of(request: Any, started: bool) -> dict[str, Any]:
    """The run fields of a worker's write (``run_id``, ``deliveries``), counted once per run.

    A run named by the main process (``tq_run``: tq tasks) is counted by any of its writes, so a
    run whose process died before its buffered ``STARTED`` was written still counts (its
    ``RETRY``/``FAILURE`` from the main process carries it). Other runs count by their ``STARTED``.
    """
    run = getattr(request, RUN_KEY, None)
    if isinstance(run, str) and run:
        return {"run_id": run, "deliveries": 1}
    return {"run_id": os.urandom(8).hex(), "deliveries": 1} if started else {}
