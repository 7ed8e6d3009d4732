"""Signal handlers that record every task of one app in its registry.

``QUEUED`` comes from the client (``after_task_publish``, buffered off the caller's thread),
``STARTED``/``RETRY``/terminal states from the worker. When the result backend is the ``tq``
backend on the registry's store, the backend is the one writer of the states it stores, so
only what it never sees is written here: ``QUEUED``, ``REJECTED``, unknown tasks, and the
states of tasks whose results are ignored. Handlers are connected with
``weak=False`` and a ``dispatch_uid`` of the app's own, and ignore other apps.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

from celery import Celery, signals
from kombu.exceptions import EncodeError
from kombu.utils.json import dumps

from celery_tq import error_codec
from celery_tq.client.batch import after_send
from celery_tq.errors import InvalidInput
from celery_tq.registry import Store, store_for_url
from celery_tq.registry.call import published_call
from celery_tq.registry.capture import from_headers, from_request, registry_url, run_of
from celery_tq.registry.record import QUEUED, change
from celery_tq.registry.writer import enqueue, flush_all, write_with_retry
from celery_tq.settings import settings_for

__all__ = ["connect", "publishing"]

_publishing: contextvars.ContextVar[Celery | None] = contextvars.ContextVar("tq_publishing", default=None)
_pool_child = False  # set in prefork pool processes (``worker_process_init``)
PURGE_EVERY = 3600.0


# The handlers of one task's run and its publishes: in a prefork pool process, the ones that
# can only return at once there are disconnected (a Celery signal without receivers costs nothing).
_RUN_SIGNALS = {
    "on_published": signals.after_task_publish,
    "on_started": signals.task_prerun,
    "on_retry": signals.task_retry,
    "on_success": signals.task_success,
    "on_failure": signals.task_failure,
    "on_revoked": signals.task_revoked,
    "on_rejected": signals.task_rejected,
    "on_unknown": signals.task_unknown,
    "on_postrun": signals.task_postrun,
}
# Those that write nothing when the result backend is the tq backend on the registry's store
# (the outcome handlers stay: they write the states of tasks that ignore their results).
_BACKEND_WRITES = ("on_unknown",)


def connect(app: Celery) -> None:
    """Connect the registry's handlers for ``app`` (``weak=False``, one ``dispatch_uid`` each)."""
    uid = app.__dict__.setdefault("_tq_registry_uid", uuid.uuid4().hex)
    recorder = _Recorder(weakref.ref(app), uid)
    for name, signal in _RUN_SIGNALS.items():
        signal.connect(getattr(recorder, name), weak=False, dispatch_uid=_dispatch_uid(name, uid))
    for signal, handler in (
        (signals.worker_process_init, recorder.on_process_init),
        (signals.worker_process_shutdown, recorder.on_process_shutdown),
        (signals.worker_ready, recorder.on_worker_ready),
    ):
        signal.connect(handler, weak=False, dispatch_uid=_dispatch_uid(handler.__name__, uid))


def _dispatch_uid(handler: str, uid: str) -> str:
    return f"tq-registry-{handler}-{uid}"


@contextlib.contextmanager
def publishing(app: Celery) -> Iterator[None]:
    """``after_task_publish`` names no app: the app's sender (:mod:`celery_tq.client.publish`) sends
    inside this block, so the handler knows whose publish it sees."""
    token = _publishing.set(app)
    try:
        yield
    finally:
        _publishing.reset(token)


class _Recorder:
    """The handlers of one app; every handler returns at once for another app's tasks."""

    def __init__(self, app_ref: weakref.ref[Celery], uid: str) -> None:
        self.app_ref = app_ref
        self.uid = uid
        self._run = threading.local()  # (task id, target) of the task running in this thread
        self._frozen: tuple[Store, bool] | bool | None = False  # a pool process's answer, once known

    def _target(self, sender_app: Any, task_id: str | None = None) -> tuple[Store, bool] | None:
        """(store, whether the tq backend already writes results) for this app, else None.

        Within one run (``task_id`` given) the answer of ``task_prerun`` is reused; in a prefork
        pool process, whose configuration is fixed (Celery builds its tracers from it once), the
        first answer is.
        """
        if _pool_child and self._frozen is not False and sender_app is self.app_ref():
            return self._frozen  # type: ignore[return-value]
        if task_id is not None:
            run = getattr(self._run, "value", None)
            if run is not None and run[0] == task_id and run[1] is sender_app:
                return run[2]  # type: ignore[no-any-return]
        app = self.app_ref()
        if app is None or sender_app is not app:
            return None
        url = registry_url(app)
        target: tuple[Store, bool] | None = None
        if not (_pool_child and url == "memory://"):  # else records nobody could read (check() warns)
            from celery_tq.backend import TqBackend

            store, backend = store_for_url(url), app.backend
            target = store, isinstance(backend, TqBackend) and backend.store is store
        if _pool_child:
            self._frozen = target
        return target

    def on_published(
        self, sender: Any = None, headers: Any = None, routing_key: Any = None, body: Any = None, **kw: Any
    ) -> None:
        app = _publishing.get()
        if app is None or not headers or "id" not in headers:
            return
        target = self._target(app)
        if target is None:
            return
        retries = int(headers.get("retries") or 0)
        fields = from_headers(headers, routing_key)
        if app.conf.result_extended:  # the call, if small: ``celery tq lost --resend`` can send it again
            fields["meta"] = published_call(headers, body)
        row = change(headers["id"], QUEUED, retries, submitted_at=time.time(), **fields)
        store = target[0]
        if not headers.get("ignore_result"):  # nobody waits for it: nothing to listen for
            store.published(row["id"])
        after_send(lambda: enqueue(store, row))  # once the message has left (a batched publish)

    def on_started(self, sender: Any = None, task_id: str = "", task: Any = None, **kw: Any) -> None:
        app = getattr(task, "app", None)
        target = self._target(app)
        self._run.value = (task_id, app, target)
        if target is None:
            return
        store, backend_writes = target
        if backend_writes and getattr(task, "track_started", False) and not _ignores_result(task):
            return  # the backend stores STARTED
        retries, fields = from_request(task.request)
        fields["tags"] = fields["tags"] or _task_tags(task)
        now = time.time()
        fields.update(run_of(task.request, started=True))  # counted once, however often it is retried
        enqueue(store, change(task_id, "STARTED", retries, submitted_at=now, started_at=now, **fields))

    def on_retry(self, sender: Any = None, request: Any = None, reason: Any = None, **kw: Any) -> None:
        self._finish(sender, "RETRY", request, error=reason, retry=True)

    def on_success(self, sender: Any = None, result: Any = None, **kw: Any) -> None:
        self._finish(sender, "SUCCESS", getattr(sender, "request", None), result=result)

    def on_failure(self, sender: Any = None, task_id: str = "", exception: Any = None, **kw: Any) -> None:
        request = getattr(sender, "request", None)
        if getattr(request, "id", None) != task_id:
            request = None
        if isinstance(exception, EncodeError):
            invalid = InvalidInput(f"the result of {getattr(sender, 'name', 'task')} cannot be serialized")
            invalid.__cause__ = exception
            exception = invalid
        self._finish(sender, "FAILURE", request, error=exception, task_id=task_id)

    def on_revoked(self, sender: Any = None, request: Any = None, **kw: Any) -> None:
        from celery_tq.errors import Cancelled

        error = Cancelled(str(getattr(request, "task", None) or getattr(sender, "name", "")))
        self._finish(sender, "REVOKED", request, error=error)

    def on_unknown(
        self, sender: Any = None, name: str = "", id: str = "", exc: Any = None, **kw: Any
    ) -> None:
        target = self._target(getattr(sender, "app", None))
        if target is None or target[1] or not id:
            return
        from celery.exceptions import NotRegistered

        row = change(id, "FAILURE", 0, name=name, submitted_at=time.time(), finished_at=time.time())
        row["error"] = dumps(error_codec.encode(NotRegistered(name)))
        write_with_retry(target[0], [row], f"FAILURE of unknown task {id}")

    def on_rejected(self, sender: Any = None, message: Any = None, exc: Any = None, **kw: Any) -> None:
        target = self._target(getattr(sender, "app", None))
        headers = getattr(message, "headers", None) or {}
        if target is None or "id" not in headers:
            return  # Celery itself never stores REJECTED: always ours to write
        now = time.time()
        fields = from_headers(headers, None)
        row = change(headers["id"], "REJECTED", int(headers.get("retries") or 0), **fields)
        row.update(submitted_at=now, finished_at=now)
        if exc is not None:
            row["error"] = dumps(error_codec.encode(exc))
        write_with_retry(target[0], [row], f"REJECTED of task {headers['id']}")

    def _finish(
        self,
        sender: Any,
        state: str,
        request: Any,
        result: Any = None,
        error: Any = None,
        retry: bool = False,
        task_id: str | None = None,
    ) -> None:
        task_id = task_id or str(getattr(request, "id", "") or "")
        target = self._target(getattr(sender, "app", None), task_id)
        if target is None or not task_id or (target[1] and not _ignores_result(sender)):
            return
        retries, fields = from_request(request)
        fields.update(run_of(request, started=False))
        now = time.time()
        fields["name"] = fields["name"] or getattr(sender, "name", None)
        if retry:
            retries += 1
        else:
            fields["finished_at"] = now
        if isinstance(error, BaseException):
            limits = getattr(request, "timelimit", None) or (None, None)
            converted = error_codec.convert(error, str(fields["name"] or ""), limits[1])
            fields["error"] = dumps(error_codec.encode(converted))
        elif state == "SUCCESS":
            fields["result"] = _json_or_repr(result)
        row = change(task_id, state, retries, submitted_at=now, **fields)
        write_with_retry(target[0], [row], f"{state} of task {task_id}")  # with the buffered STARTED

    def on_postrun(self, sender: Any = None, task_id: str = "", **kw: Any) -> None:
        if self._target(getattr(sender, "app", None), task_id) is not None:
            flush_all()  # what the task published is recorded before the next one runs
        self._run.value = None

    def on_process_init(self, **kw: Any) -> None:
        """A prefork pool process: its configuration is fixed, so is what each handler does."""
        global _pool_child
        _pool_child = True
        app = self.app_ref()
        if app is None:
            return
        try:
            target = self._target(app)
        except Exception as exc:  # the first task's handlers meet it again and report it
            logging.getLogger("celery_tq.registry").warning(
                "celery-tq: the registry of this pool process is not reachable yet: %s", exc
            )
            return
        if target is None:
            idle: Iterable[str] = _RUN_SIGNALS  # records nobody could read: none are kept
        elif target[1]:
            idle = _BACKEND_WRITES  # the tq backend's own write is the record
        else:
            return
        for name in idle:
            _RUN_SIGNALS[name].disconnect(dispatch_uid=_dispatch_uid(name, self.uid))

    def on_process_shutdown(self, **kw: Any) -> None:
        flush_all()

    def on_worker_ready(self, sender: Any = None, **kw: Any) -> None:
        app = self.app_ref()
        if app is None or getattr(sender, "app", None) is not app:
            return
        timer = getattr(sender, "timer", None)
        if timer is not None:
            self._purge(app)
            timer.call_repeatedly(PURGE_EVERY, self._purge, (self.app_ref(),))

    @staticmethod
    def _purge(app: Celery | None) -> None:
        """The periodic retention job: records older than ``tq_result_expires`` go."""
        if app is None:
            return
        try:
            expires = settings_for(app).result_expires
            store_for_url(registry_url(app)).purge(time.time() - expires)
        except Exception as exc:  # never takes the worker down
            logging.getLogger("celery_tq.registry").error("celery-tq: registry purge failed: %s", exc)


def _ignores_result(task: Any) -> bool:
    """Whether Celery stores nothing for this run (``ignore_result`` on the call or the task)."""
    request = getattr(task, "request", None)
    ignore = getattr(request, "ignore_result", None)
    return bool(getattr(task, "ignore_result", False) if ignore is None else ignore)


def _task_tags(task: Any) -> list[str] | None:
    metadata = getattr(task, "metadata", None)
    tags = getattr(metadata, "tags", None)
    return sorted(tags) if tags else None


def _json_or_repr(value: Any) -> str:
    try:
        return str(dumps(value))
    except (TypeError, ValueError):
        return str(dumps(repr(value)))
