"""``TqTask``: a Celery task that carries metadata, fails with structured errors and retries."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from celery import Task
from celery.exceptions import TaskPredicate
from celery.utils.time import get_exponential_backoff_interval

from celery_tq import celery_seam, error_codec
from celery_tq.errors import TaskTimeout
from celery_tq.metadata import (
    CALL_METADATA,
    HEADER_PRIORITY,
    HEADER_TAGS,
    HEADER_TIMEOUT,
    TaskMetadata,
    carried,
    stamp,
)
from celery_tq.settings import TqSettings, settings_for
from celery_tq.worker import timeouts

__all__ = ["TqTask", "call_options"]


def call_options(metadata: TaskMetadata, options: dict[str, Any]) -> dict[str, Any]:
    """Validate a call's ``priority``/``timeout``/``tags`` against ``metadata``, at call time.

    ``timeout`` and ``tags`` are taken out (Celery would read ``timeout`` as its publish timeout);
    the effective metadata travels to the publisher in the ``CALL_METADATA`` option, which stamps
    it into the headers without computing it again.
    """
    options = dict(options)
    effective = metadata.merged_with_call(options)
    options["priority"] = effective.priority  # the router reads it
    options[CALL_METADATA] = effective
    return options


def _tq_values(request: Any) -> dict[str, Any] | None:
    """A run's ``tq_*`` values (:func:`celery_tq.metadata.carried`); None if it has none."""
    return carried(request) or None


class TqTask(Task):  # type: ignore[type-arg]
    """Base class of celery-tq tasks: ``@app.task(base=TqTask, tq_priority=7, tq_timeout=30)``.

    ``tq_priority`` (0..9, higher is more urgent), ``tq_timeout`` (seconds) and ``tq_tags`` are
    the task's defaults; a call may pass ``priority=``, ``timeout=`` and ``tags=``.
    """

    tq_priority: ClassVar[int | None] = None
    tq_timeout: ClassVar[float | None] = None
    tq_tags: ClassVar[Iterable[str]] = ()
    tq_metadata: ClassVar[TaskMetadata] = TaskMetadata()
    #: Re-runs after the task's process died; None = the ``tq_worker_lost_retries`` setting.
    tq_worker_lost_retries: ClassVar[int | None] = None
    #: The worker's main process handles a lost process with celery-tq's bounded, quick re-run.
    Request = "celery_tq.worker.request:TqRequest"
    _tq_direct_run: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Celery builds a subclass per decorated function: validate its metadata right here.
        priority = cls.tq_priority if cls.tq_priority is not None else cls.tq_metadata.priority
        timeout = cls.tq_timeout if cls.tq_timeout is not None else cls.tq_metadata.timeout
        cls.tq_metadata = TaskMetadata(
            priority=priority, timeout=timeout, tags=cls.tq_metadata.tags | frozenset(cls.tq_tags)
        )
        cls._tq_direct_run = celery_seam.tracer_pushes_request(super().__call__)

    @property
    def metadata(self) -> TaskMetadata:
        """The effective metadata of the current run (or the task's defaults outside a run)."""
        request = self.request
        cached: TaskMetadata | None = vars(request).get("_tq_metadata")
        return cached if cached is not None else self._metadata_of(request, _tq_values(request))

    def _run_timeout(self, request: Any) -> float | None:
        """The run's timeout; only a set one costs building (and validating) the metadata."""
        values = _tq_values(request)
        timeout = self.tq_metadata.timeout if values is None else values.get(HEADER_TIMEOUT)
        return None if timeout is None else self._metadata_of(request, values).timeout

    def _metadata_of(self, request: Any, values: dict[str, Any] | None) -> TaskMetadata:
        """The metadata of ``request``'s run, from its ``tq_*`` values; kept on a run's context
        (one with an id) until the run ends."""
        if values is None:
            metadata = self.tq_metadata
        else:
            metadata = TaskMetadata(
                priority=values.get(HEADER_PRIORITY, self.tq_metadata.priority),
                timeout=values.get(HEADER_TIMEOUT),
                tags=frozenset(values.get(HEADER_TAGS) or ()),
            )
        if getattr(request, "id", None):
            vars(request)["_tq_metadata"] = metadata
        return metadata

    def apply_async(  # type: ignore[override]
        self, args: Any = None, kwargs: Any = None, task_id: str | None = None, **options: Any
    ) -> Any:
        options = call_options(self.tq_metadata, options)
        return super().apply_async(args, kwargs, task_id, **options)

    def apply(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:  # type: ignore[override]
        """Run here and now (also ``apply_async`` with ``task_always_eager``), with the call's
        metadata in the run's headers, where a worker finds it in a message."""
        options = dict(options)
        metadata = options.pop(CALL_METADATA, None)  # from apply_async with task_always_eager
        if not isinstance(metadata, TaskMetadata):
            metadata = self.tq_metadata.merged_with_call(options)
        options["priority"] = metadata.priority
        headers = dict(options.get("headers") or {})
        stamp(headers, metadata)
        options["headers"] = headers
        return super().apply(args, kwargs, **options)

    def signature_from_request(self, request: Any = None, *args: Any, **kwargs: Any) -> Any:
        # A retry re-sends with the broker's (translated) priority; put ours back.
        signature = super().signature_from_request(request, *args, **kwargs)
        # The worker's main process re-sends a lost run with its request, not the task's own.
        metadata = self.metadata if request is None else self._metadata_of(request, _tq_values(request))
        signature.options.update(
            priority=metadata.priority, tq_timeout=metadata.timeout, tq_tags=sorted(metadata.tags)
        )
        return signature

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.called_directly:
            return self.run(*args, **kwargs)
        timeout = self._run_timeout(request)
        try:
            if timeout is not None:
                return self._invoke_timed(request, timeout, args, kwargs)
            limits = self._celery_limits_to_enforce(request)
            if limits is None:
                return self._invoke(args, kwargs)
            return self._invoke_timed(request, limits[0], args, kwargs, grace=limits[1])
        except TaskPredicate:
            raise  # Retry, Ignore, Reject: Celery's control flow
        except Exception as exc:
            limit = timeout if timeout is not None else self._celery_time_limit(request)
            error = error_codec.convert(exc, self.name, limit)
            assert isinstance(error, Exception)
            if getattr(error, "retryable", False) and self._may_retry():
                raise self.retry(exc=error, countdown=self._backoff(settings_for(self.app))) from None
            if error is exc:
                raise
            raise error from exc

    def _celery_limits_to_enforce(self, request: Any) -> tuple[float, float] | None:
        """Celery's own soft/hard limits as (timeout, grace), on a pool that does not enforce them
        (threads, solo, the in-process worker); None on prefork or without limits."""
        if timeouts.current_pool() == "prefork":
            return None
        limits: Any = getattr(request, "timelimit", None) or (None, None)
        hard: Any = limits[0] or self.time_limit
        soft: Any = limits[1] or self.soft_time_limit
        if not soft and not hard:
            return None
        if not soft:
            return float(hard), 0.0
        grace = float(hard) - float(soft) if hard and hard > soft else settings_for(self.app).timeout_grace
        return float(soft), grace

    def _celery_time_limit(self, request: Any) -> float | None:
        """Celery's own limit of this run (soft, else hard): the call's, else the task's."""
        hard, soft = getattr(request, "timelimit", None) or (None, None)
        limit = soft or self.soft_time_limit or hard or self.time_limit
        return float(limit) if limit else None

    def _invoke(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The run. Celery's tracer has pushed this run's task and request already, and calls
        ``run`` directly for a task without its own ``__call__``; so do we, unless a class after
        ``TqTask`` in the MRO has a ``__call__`` of its own (``Task.__call__`` would push the
        request a second time)."""
        if self._tq_direct_run:
            return self.run(*args, **kwargs)
        return super().__call__(*args, **kwargs)

    def _invoke_timed(
        self,
        request: Any,
        timeout: float,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        grace: float | None = None,
    ) -> Any:
        if grace is None:
            grace = settings_for(self.app).timeout_grace

        def fail_hard_timeout() -> None:  # runs on a timer thread: no request stack there
            error = TaskTimeout(self.name, timeout)
            self.backend.mark_as_failure(str(request.id), error, request=request)

        with timeouts.enforce(timeout, grace, fail_hard_timeout) as clock:
            result = self._invoke(args, kwargs)
        if clock.hard_expired:
            raise TaskTimeout(self.name, timeout)
        return result

    def _may_retry(self) -> bool:
        if self.request.is_eager:
            return False
        return self.max_retries is None or self.request.retries < self.max_retries

    def _backoff(self, settings: TqSettings) -> float:
        """Exponential backoff with full jitter (Celery's own helper)."""
        own = getattr(self, "retry_backoff", None)  # Celery sets these only with autoretry_for
        factor = own if isinstance(own, int | float) and not isinstance(own, bool) else None
        maximum = getattr(self, "retry_backoff_max", None) or settings.retry_backoff_max
        return float(
            get_exponential_backoff_interval(
                factor=max(1, round(factor if factor else settings.retry_backoff)),
                retries=self.request.retries,
                maximum=max(1, round(maximum)),
                full_jitter=getattr(self, "retry_jitter", True) is not False,
            )
        )
