"""``TqBackend``: the Celery result backend that is the registry.

``result_backend = "tq+sqlite:///path"`` (or ``tq+postgresql://...``, ``tq+redis://host:port/db``,
``tq+memory://``): each state change is ONE write of the task's record, which also carries
Celery's result meta, so ``AsyncResult.get()``/``.state``/``.traceback`` read the record.
Groups and chords keep Celery's key-value bookkeeping, in the store's small key-value space
(chords as Celery's Redis backend runs them: :mod:`celery_tq.chords`).
"""

from __future__ import annotations

import time
from typing import Any, cast

from celery import Celery, states
from celery.backends.base import KeyValueStoreBackend
from celery.exceptions import TimeoutError as CeleryTimeoutError
from kombu.exceptions import EncodeError
from kombu.utils.encoding import bytes_to_str, ensure_bytes
from kombu.utils.json import dumps, loads
from kombu.utils.url import maybe_sanitize_url

from celery_tq import celery_seam
from celery_tq.chords import ChordsMixin
from celery_tq.errors import ConfigurationError, StorageError
from celery_tq.registry import Store, store_for_url
from celery_tq.registry.call import bound_call
from celery_tq.registry.capture import from_request, run_of
from celery_tq.registry.record import QUEUED, STATE_MAX, Row, change, is_state_name, to_record
from celery_tq.registry.writer import Deferred, enqueue, flush_pending, write_with_retry
from celery_tq.result_errors import ENDED, StructuredErrorsMixin, raise_if_rejected
from celery_tq.settings import settings_for
from celery_tq.worker.handoff import hand_over

__all__ = ["TqBackend"]


def _traced_start(task_id: str, result: Any, request: Any) -> bool:
    """Whether a ``STARTED`` is the one Celery's tracer stores as a run begins: with the request
    of that task's own run, as ``{"pid": <pool process>, "hostname": <worker>}`` (celery/app/trace.py,
    Celery 5.7; the hostname is not always the request's: Celery's test worker and the in-process
    one differ). Any other ``STARTED`` (``update_state`` of another shape, ``mark_as_started``,
    a client's ``store_result`` or ``update_state``) is written before the call returns."""
    return (
        request is not None
        and getattr(request, "id", None) == task_id
        and isinstance(result, dict)
        and result.keys() == {"pid", "hostname"}
        and isinstance(result["pid"], int)
        and isinstance(result["hostname"], str)
    )


class TqBackend(StructuredErrorsMixin, ChordsMixin, KeyValueStoreBackend):
    """Results and registry records in one store; errors arrive structured; chords as on Redis."""

    supports_native_join = True
    supports_autoexpire = False  # Celery's backend_cleanup calls cleanup(): purge by tq_result_expires
    implements_incr = False  # True would make Celery replace apply_chord with its waiting join
    persistent = True

    def __init__(self, app: Any = None, url: str | None = None, **kwargs: Any) -> None:
        super().__init__(app=app, url=url, **kwargs)
        if not url:
            raise ConfigurationError(
                'the tq result backend needs a store: result_backend = "tq+sqlite:///path"'
            )
        self.url = url
        store_for_url(url)  # a bad URL fails here, when the backend is created
        self.retry_for = settings_for(self._app).store_retry_timeout
        self._task_prefix = bytes_to_str(self.task_keyprefix)

    def wait_for(
        self,
        task_id: str,
        timeout: float | None = None,
        interval: float = 0.5,
        no_ack: bool = True,
        on_interval: Any = None,
    ) -> Any:
        """Celery's polling loop, woken by the store where it can (Redis pub/sub, PostgreSQL NOTIFY).

        The store starts listening before it reads the task's state, so a result that is not
        ready yet costs two reads: one once listening, one when woken (on PostgreSQL the wake-up
        carries the record when it fits in a notification: one read). Without a wake-up the poll
        starts at 0.5 ms and doubles up to ``tq_result_poll_interval`` (default 20 ms), so a short
        task's result is seen within about its own run time.
        """
        cap = min(interval, settings_for(self._app).result_poll_interval)
        deadline = None if timeout is None else time.monotonic() + timeout
        wait = self.store.wait_for_outcome
        delay = 0.0005
        read: dict[str, dict[str, Any]] = {}

        def ended(tid: str) -> bool:  # the store's read once it listens: kept if it is the outcome
            read[tid] = meta = self._meta_before(tid, deadline)
            return meta["status"] in ENDED

        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            woken = (remaining is None or remaining > 0) and wait(
                task_id, 1.0 if remaining is None else min(remaining, 1.0), ended
            )
            meta = read.pop(task_id, None)
            if meta is None or meta["status"] not in ENDED:  # not read since the outcome was written
                row = self.store.notified_row(task_id) if woken else None  # PostgreSQL: in the notice
                meta = self._meta_before(task_id, deadline) if row is None else self._meta_from_row(row)
            if meta["status"] in states.READY_STATES:
                if on_interval:
                    # ``get()`` checks the parents here: a failed parent's own error comes first,
                    # also when this result was stored at once (a chord body failed by its
                    # header), as on Redis.
                    on_interval()
                return meta
            raise_if_rejected(task_id, meta)  # no worker could read it: it never gets READY
            if on_interval:
                on_interval()
            if deadline is not None and deadline - time.monotonic() <= 0:
                raise CeleryTimeoutError("The operation timed out.")
            if not woken:
                time.sleep(delay if deadline is None else min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, cap)

    def _meta_before(self, task_id: str, deadline: float | None) -> dict[str, Any]:
        """The task's meta; with a deadline, a store that is down is retried only until then
        (Celery's own retry policy, up to ``result_backend_max_retries``, ignores ``timeout``)."""
        if deadline is None:
            return dict(self.get_task_meta(task_id))
        delay = 0.05
        while True:
            try:
                return self._get_task_meta_for(task_id)
            except Exception as exc:
                remaining = deadline - time.monotonic()
                if not self.exception_safe_to_retry(exc):
                    raise
                if remaining <= 0:
                    raise CeleryTimeoutError(
                        f"The operation timed out (the result store is unreachable: {exc})"
                    ) from exc
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, 1.0)

    @property
    def store(self) -> Store:
        """This process's store (a backend created before a fork must not share its connections)."""
        return store_for_url(self.url)

    def iter_native(
        self,
        result: Any,
        timeout: float | None = None,
        interval: float = 0.5,
        no_ack: bool = True,
        on_message: Any = None,
        on_interval: Any = None,
    ) -> Any:
        # A chain that fails before its closing group stores the failure under the group's id
        # (Celery's ``_fail_chain``): the group's join raises it, as it does on Redis, instead
        # of waiting for members that will never run.
        group_id = getattr(result, "id", None)

        def check_group() -> None:
            if group_id:
                meta = self.get_task_meta(group_id)
                if meta["status"] in states.PROPAGATE_STATES:
                    raise self.exception_to_python(meta["result"])
            if on_interval is not None:
                on_interval()

        base: Any = super()
        return base.iter_native(
            result,
            timeout=timeout,
            interval=interval,
            no_ack=no_ack,
            on_message=on_message,
            on_interval=check_group,
        )

    def as_uri(self, include_password: bool = False) -> str:
        uri = f"tq+{self.url}"
        return uri if include_password else str(maybe_sanitize_url(uri))

    def _store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: Any = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        """One record write per state, durable when this returns (as on Celery's backends: a
        client's ``store_result``/``mark_as_started``, a task's ``update_state``), so a late-acked
        task's outcome is stored before its message is acked. The one exception is the
        ``STARTED`` Celery's tracer stores as a run begins (``task_track_started``): buffered,
        it travels with the run's outcome when the task is short, else within ``LINGER``."""
        if not is_state_name(state):
            raise ValueError(f"invalid task state {state!r}: 1 to {STATE_MAX} printable characters")
        now = time.time()
        retries, fields = from_request(request)
        base = super()
        if state == states.STARTED and _traced_start(task_id, result, request):
            # Buffered, written with the run's outcome: its meta is built only if this row is
            # written on its own (a run still going when the background writer's turn comes).
            fields.update(run_of(request, started=True), started_at=now, worker=result["hostname"] or None)

            def started_meta() -> str:
                return str(dumps(self._result_meta(base, task_id, result, state, traceback, request)))

            enqueue(
                self.store,
                change(task_id, state, retries, submitted_at=now, meta=Deferred(started_meta), **fields),
            )
            return result
        meta = self._result_meta(base, task_id, result, state, traceback, request)
        if state == states.SUCCESS:
            meta.pop("result", None)
            try:
                fields["result"] = dumps(result)
            except (TypeError, ValueError) as exc:
                raise EncodeError(f"{type(result).__name__} is not JSON serializable: {exc}") from exc
        elif (
            state in states.EXCEPTION_STATES
            and isinstance(result, dict)
            and isinstance(result.get("tq"), dict)
        ):
            envelope = result["tq"]  # stored once, in the record's error; Celery's meta is rebuilt from it
            fields["error"] = dumps(envelope)
            meta["result"] = {k: v for k, v in result.items() if k != "tq"}
            if envelope.get("traceback"):
                meta.pop("traceback", None)
        if request is not None:  # a worker's run: counted once, however often its writes are retried
            fields.update(run_of(request, started=state == states.STARTED))
        if state == states.RETRY:
            retries += 1  # the record counts retries already scheduled
        if state in states.READY_STATES:
            fields["finished_at"] = now
        if state == states.STARTED:
            fields["started_at"] = now
            if isinstance(result, dict) and result.get("hostname"):
                fields["worker"] = result["hostname"]
        row = change(task_id, state, retries, submitted_at=now, meta=dumps(meta), **fields)
        if hand_over(self.store, row, request):  # a pool process: the main process writes it, then acks
            return result
        write_with_retry(self.store, [row], f"{state} of task {task_id}", self.retry_for)
        return result

    @staticmethod
    def _result_meta(
        base: Any, task_id: str, result: Any, state: str, traceback: Any, request: Any
    ) -> dict[str, Any]:
        """Celery's meta of a state (``base``: the backend's ``super()``), its call bounded."""
        meta = celery_seam.base_result_meta(
            base, result=result, state=state, traceback=traceback, request=request
        )
        meta["task_id"] = task_id
        bound_call(meta)
        return meta

    def _get_task_meta_for(self, task_id: str) -> dict[str, Any]:
        row = self.store.read([task_id])[0]
        if row is None:
            return {"status": states.PENDING, "result": None}
        return self._meta_from_row(row)

    def _meta_from_row(self, row: Row) -> dict[str, Any]:
        return dict(self.meta_from_decoded(self._meta_of(row)))

    def _meta_of(self, row: Row) -> dict[str, Any]:
        record = to_record(row)
        try:
            meta = loads(row["meta"]) if row.get("meta") else {}
        except (ValueError, RecursionError) as exc:  # RecursionError: nested past JSON's depth
            raise StorageError(f"corrupt result meta: {exc}", record.id) from exc
        if not isinstance(meta, dict):
            raise StorageError("corrupt result meta: not an object", record.id)
        if record.state == QUEUED or (not row.get("meta") and record.state != states.REJECTED):
            # Celery has no QUEUED: a task not started yet is PENDING to its clients, and so is a
            # task Celery stored nothing for (``ignore_result`` runs: records without meta). A
            # message no worker could read stays REJECTED, so ``get()`` ends instead of waiting.
            return {
                "status": states.PENDING,
                "result": None,
                "traceback": None,
                "children": [],
                "task_id": record.id,
            }
        meta.update(status=record.state, task_id=record.id)
        if record.state == states.SUCCESS:
            meta["result"] = record.result
        elif record.error is not None and record.state in states.EXCEPTION_STATES:
            stored = meta.get("result")
            meta["result"] = {**(stored if isinstance(stored, dict) else {}), "tq": record.error}
            if not meta.get("traceback"):
                meta["traceback"] = record.error.get("traceback")
        meta.setdefault("result", None)
        meta.setdefault("traceback", None)
        meta.setdefault("children", [])
        if record.finished_at and not meta.get("date_done"):
            meta["date_done"] = record.finished_at.isoformat()
        return meta

    # Celery's key-value interface: task keys map to records, the rest to the store's kv space.
    def get(self, key: Any) -> Any:
        return self.mget([key])[0]

    def mget(self, keys: Any) -> list[Any]:
        names = [bytes_to_str(k) for k in keys]
        task_ids = [n[len(self._task_prefix) :] for n in names if n.startswith(self._task_prefix)]
        others = [n for n in names if not n.startswith(self._task_prefix)]
        found: dict[str, Any] = {}
        if task_ids:
            for task_id, row in zip(task_ids, self.store.read(task_ids), strict=True):
                if row is not None:
                    found[self._task_prefix + task_id] = self.encode(self._meta_of(row))
        if others:
            found.update(zip(others, self.store.kv_get(others), strict=True))
        return [found.get(n) for n in names]

    def set(self, key: Any, value: Any) -> None:
        self.store.kv_set(bytes_to_str(key), ensure_bytes(value), self._ttl(getattr(self, "expires", None)))

    def delete(self, key: Any) -> None:
        name = bytes_to_str(key)
        if name.startswith(self._task_prefix):  # forget(): the record goes, result and all
            flush_pending(self.store)  # a QUEUED this process still buffers must not bring it back
            self.store.delete(name[len(self._task_prefix) :])
        else:
            self.store.kv_delete(name)

    def incr(self, key: Any) -> int:
        return self.store.kv_incr(bytes_to_str(key), None)

    def expire(self, key: Any, value: Any) -> None:
        name = bytes_to_str(key)
        if not name.startswith(self._task_prefix):  # records follow tq_result_expires
            self.store.kv_expire(name, self._ttl(value))

    def cleanup(self) -> None:
        """Celery's ``celery.backend_cleanup``: purge records older than ``tq_result_expires``."""
        self.store.purge(time.time() - settings_for(self._app).result_expires)

    def exception_safe_to_retry(self, exc: BaseException) -> bool:
        module = type(exc).__module__.split(".", 1)[0]
        return isinstance(exc, ConnectionError | TimeoutError) or module in {"redis", "sqlalchemy", "psycopg"}

    @property
    def _app(self) -> Celery:
        return cast(Celery, getattr(self, "app"))  # noqa: B009 - celery-types does not declare it

    @staticmethod
    def _ttl(value: Any) -> float | None:
        if value is None:
            return None
        seconds = value.total_seconds() if hasattr(value, "total_seconds") else float(value)
        return seconds or None
