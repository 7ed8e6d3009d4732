"""Make any Celery result backend carry structured errors (see :mod:`celery_tq.error_codec`)."""

from __future__ import annotations

import time
from typing import Any

from celery import Celery, states
from celery.backends.base import Backend
from celery.exceptions import TimeoutError as CeleryTimeoutError
from kombu.exceptions import DecodeError

from celery_tq import celery_seam, error_codec
from celery_tq.errors import ExecutionFailed, InvalidInput, StorageError

__all__ = ["ENDED", "StructuredErrorsMixin", "raise_if_rejected", "wire_backend"]


class StructuredErrorsMixin:
    """Backend mixin: failures are stored with the ``tq`` envelope and rebuilt from it."""

    def store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: Any = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        # Hard time limits, lost workers and revokes are stored by the worker's main process
        # with Celery's own exceptions; the caller gets ours.
        if isinstance(result, BaseException):
            task_name = str(getattr(request, "task", None) or getattr(request, "name", "") or "")
            converted = error_codec.convert(result, task_name, self._declared_limit(task_name, request))
            if converted is not result and isinstance(traceback, str):
                converted.remote_traceback = traceback  # type: ignore[attr-defined]
            result = converted
            result.__dict__.setdefault(error_codec.TASK_ATTR, task_name)
        return super().store_result(  # type: ignore[misc]
            task_id, result, state, traceback, request, **kwargs
        )

    def _declared_limit(self, task_name: str, request: Any) -> float | None:
        """The run's soft limit (the declared timeout): the message's, else the task's own."""
        hard, soft = getattr(request, "timelimit", None) or (None, None)
        task = getattr(self, "app", None) and self.app.tasks.get(task_name)  # type: ignore[attr-defined]
        limit = soft or getattr(task, "soft_time_limit", None) or hard or getattr(task, "time_limit", None)
        return float(limit) if limit else None

    def prepare_exception(self, exc: BaseException, serializer: str | None = None) -> Any:
        prepared = super().prepare_exception(exc, serializer)  # type: ignore[misc]
        if isinstance(prepared, dict):
            prepared["tq"] = error_codec.encode(exc)
        return prepared

    def exception_to_python(self, exc: Any) -> Any:
        if isinstance(exc, dict) and isinstance(exc.get("tq"), dict):
            return error_codec.decode(exc["tq"])
        rebuilt = super().exception_to_python(exc)  # type: ignore[misc]
        if rebuilt is None or isinstance(rebuilt, Exception):
            return rebuilt
        # A stored SystemExit/KeyboardInterrupt would stop the caller's process in get().
        name = f"{type(rebuilt).__module__}.{type(rebuilt).__qualname__}"
        return ExecutionFailed("?", f"{name}: {rebuilt}")

    def wait_for(
        self,
        task_id: str,
        timeout: float | None = None,
        interval: float = 0.5,
        no_ack: bool = True,
        on_interval: Any = None,
    ) -> Any:
        """Celery's polling ``wait_for``, which also ends on ``REJECTED`` (a message no worker could
        read, see :mod:`celery_tq.worker.refused`): Celery would wait on it forever."""
        if getattr(self.app.conf, "task_always_eager", False):  # type: ignore[attr-defined]
            return super().wait_for(task_id, timeout, interval, no_ack, on_interval)  # type: ignore[misc]
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            meta = self.get_task_meta(task_id)  # type: ignore[attr-defined]
            if meta["status"] in states.READY_STATES:
                return meta
            raise_if_rejected(task_id, meta)
            if on_interval:
                on_interval()
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise CeleryTimeoutError("The operation timed out.")
            time.sleep(interval if left is None else min(interval, left))

    def _get_task_meta_for(self, task_id: str) -> Any:
        try:
            return celery_seam.base_task_meta_for(super(), task_id)
        except (RecursionError, DecodeError) as exc:  # e.g. a forged value nested past JSON's depth
            raise StorageError(f"stored result of {task_id} cannot be read: {exc}", task_id) from exc


#: States a task never leaves: Celery's ready states and REJECTED (a message no worker could read).
ENDED = frozenset({*states.READY_STATES, states.REJECTED})


def raise_if_rejected(task_id: str, meta: Any) -> None:
    """``get()`` on a ``REJECTED`` task raises ``InvalidInput``: Celery would wait on it forever."""
    if meta.get("status") == states.REJECTED:
        raise InvalidInput(f"task {task_id} was rejected: a worker could not read its message")


_classes: dict[type[Backend], type[Backend]] = {}


def with_structured_errors(backend: Backend) -> Backend:
    """Give one backend instance the mixin (its class is swapped for a cached subclass)."""
    cls = type(backend)
    if issubclass(cls, StructuredErrorsMixin):
        return backend
    if cls not in _classes:
        _classes[cls] = type(cls.__name__, (StructuredErrorsMixin, cls), {})
    celery_seam.retype(backend, _classes[cls])
    return backend


def wire_backend(app: Celery) -> None:
    """Every backend this app creates (one per thread) gets structured errors."""
    celery_seam.wrap_backends(app, with_structured_errors)
