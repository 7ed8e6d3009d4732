"""``install(app)``: the one place that wires celery-tq into a Celery app."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, overload

from celery import Celery, signals
from celery.concurrency import get_implementation
from celery.result import AsyncResult

from celery_tq import celery_seam, checks, presets
from celery_tq import signals as signals_module
from celery_tq.client.publish import wire_publisher
from celery_tq.errors import ConfigurationError
from celery_tq.registry import Registry, store_for_url
from celery_tq.registry.capture import registry_url
from celery_tq.result_errors import wire_backend
from celery_tq.routing import PriorityRouter, broker_kind, queues_for
from celery_tq.settings import TqSettings, read_settings, refuse_pickle, settings_for
from celery_tq.task import TqTask
from celery_tq.transport import register_transports
from celery_tq.worker import timeouts
from celery_tq.worker.events import BatchedEvents
from celery_tq.worker.guard import RefuseUnsafeConfig
from celery_tq.worker.handoff import HandOutcomes, HandOutcomesPrefetch
from celery_tq.worker.prefetch import ReserveExtra
from celery_tq.worker.redis_acks import PipelinedRedisAcks
from celery_tq.worker.refused import RecordRefusedMessages
from celery_tq.worker.request import WatchPoolProcesses
from celery_tq.worker.watched_events import WatchedEvents

__all__ = ["TaskQueueSystem", "install", "system_for"]

F = TypeVar("F", bound=Callable[..., Any])
_SYSTEM_ATTR = "_tq_system"  # the app keeps its system: no global map keeps either alive


class TaskQueueSystem:
    """What ``install`` returns: decorate tasks, submit, wait, run a worker in-process, check."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._worker: Any = None
        self._thread: threading.Thread | None = None
        self._previous_default: Celery | None = None

    @property
    def settings(self) -> TqSettings:
        return settings_for(self.app)

    @overload
    def task(self, fun: F) -> Any: ...
    @overload
    def task(
        self,
        *,
        priority: int | None = None,
        timeout: float | None = None,
        tags: Iterable[str] | None = None,
        **options: Any,
    ) -> Callable[[F], Any]: ...

    def task(
        self,
        fun: F | None = None,
        *,
        priority: int | None = None,
        timeout: float | None = None,
        tags: Iterable[str] | None = None,
        **options: Any,
    ) -> Any:
        """``@tq.task(priority=Priority.HIGH, timeout=30, tags={"billing"})``; other options pass."""
        base = options.pop("base", TqTask)
        if not (isinstance(base, type) and issubclass(base, TqTask)):
            raise ConfigurationError(f"base={base!r} must be TqTask or a subclass of it")
        metadata = base.tq_metadata.merged(priority=priority, timeout=timeout, tags=tags)

        app_task: Any = self.app.task

        def decorate(f: F) -> Any:
            return app_task(
                base=base,
                tq_priority=metadata.priority,
                tq_timeout=metadata.timeout,
                tq_tags=tuple(sorted(metadata.tags)),
                **options,
            )(f)

        return decorate(fun) if fun is not None else decorate

    def submit(
        self,
        task: Any,
        *args: Any,
        priority: int | None = None,
        tags: Iterable[str] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> str:
        """Send ``task`` (a task or its name) and return the task id."""
        options: dict[str, Any] = {"priority": priority, "tags": tags, "timeout": timeout}
        options = {k: v for k, v in options.items() if v is not None}
        if isinstance(task, str):
            result = self.app.send_task(task, args=args, kwargs=kwargs, **options)
        else:
            result = task.apply_async(args, kwargs, **options)
        return str(result.id)

    def wait_for_result(self, task_id: str, timeout: float | None = None) -> Any:
        """The task's return value; raises the task's own error, or ``TimeoutError``."""
        return AsyncResult(task_id, app=self.app).get(timeout=timeout, propagate=True)

    def start(self, concurrency: int = 2, queues: Iterable[str] | None = None) -> None:
        """Run a worker in this process (threads pool) until :meth:`shutdown`."""
        if self._thread is not None:
            return
        ready = threading.Event()
        # The threads pool runs tasks with the process's default app: make it this one.
        self._previous_default = celery_seam.default_app()
        self.app.set_default()
        worker_cls: Any = self.app.WorkController
        worker = worker_cls(
            app=self.app,
            pool="threads",
            concurrency=concurrency,
            queues=list(queues) if queues else None,
            loglevel="WARNING",
            logfile=None,
            ready_callback=lambda consumer: ready.set(),
            without_heartbeat=True,
            without_mingle=True,
            without_gossip=True,
        )
        self._worker = worker
        self._thread = threading.Thread(target=worker.start, name="celery-tq-worker", daemon=True)
        self._thread.start()
        if not ready.wait(30):
            self.shutdown()
            raise ConfigurationError("the in-process worker did not become ready within 30 s")
        # The pool marks this process as "inside a worker"; the caller here is not a task.
        celery_seam.clear_task_join_will_block()

    def shutdown(self, timeout: float = 60.0) -> None:
        """Stop the in-process worker after its running tasks finish (warm shutdown)."""
        if self._thread is None:
            return
        self._worker.stop(in_sighandler=False)
        self._thread.join(timeout)
        self._thread = None
        self._worker = None
        if self._previous_default is not None:
            celery_seam.set_default_app(self._previous_default)

    @property
    def registry(self) -> Registry:
        """The record of every task: ``tq.registry.get(id)``, ``.query(...)``, ``.counts(...)``."""
        return _registry_for(self.app)

    def check(self) -> list[checks.Finding]:
        """Findings about this configuration, most severe first."""
        return checks.run(self.app)


def install(app: Celery, preset: str | dict[str, Any] | None = "development") -> TaskQueueSystem:
    """Wire celery-tq into ``app`` (idempotent); the preset's settings are defaults only."""
    system: TaskQueueSystem | None = app.__dict__.get(_SYSTEM_ATTR)
    if system is not None:
        return system
    preset_settings = presets.resolve(preset)  # an unknown preset fails here, not in the worker
    register_transports()
    wire_publisher(app)
    wire_backend(app)
    _connect_signals(app)
    signals_module.connect(app)
    app.steps["consumer"].add(BatchedEvents)
    app.steps["consumer"].add(ReserveExtra)
    app.steps["consumer"].add(HandOutcomesPrefetch)
    app.steps["consumer"].add(WatchedEvents)
    app.steps["consumer"].add(RecordRefusedMessages)
    app.steps["consumer"].add(PipelinedRedisAcks)
    app.steps["worker"].add(WatchPoolProcesses)
    app.steps["worker"].add(HandOutcomes)
    app.steps["worker"].add(RefuseUnsafeConfig)
    # Configuration is (re)built lazily, e.g. again after a late config_from_object.
    app.on_after_configure.connect(
        lambda sender, **kw: _configure(sender, preset_settings),
        weak=False,
        dispatch_uid=f"tq-cfg-{id(app)}",
    )
    if getattr(app, "configured", False):
        _configure(app, preset_settings)
    system = app.__dict__[_SYSTEM_ATTR] = TaskQueueSystem(app)
    return system


def system_for(app: Celery) -> TaskQueueSystem:
    """The system ``install(app)`` returned; ``ConfigurationError`` if it was never installed."""
    system: TaskQueueSystem | None = app.__dict__.get(_SYSTEM_ATTR)
    if system is None:
        raise ConfigurationError("celery_tq.install(app) was not called for this app")
    return system


def _configure(app: Celery, preset_settings: dict[str, Any]) -> None:
    """The preset under the user's settings, then the queues, routes and transport options
    that make priorities mean one thing everywhere."""
    conf = app.conf
    _apply_preset(conf, preset_settings)
    settings = read_settings(app)
    # Celery logs (and swallows) an error raised in on_after_configure: the refusal runs again
    # where it can stop things: when a worker starts (worker_guard) and when a task is first sent.
    refuse_pickle(app.conf)
    kind = broker_kind(conf.broker_url)
    if not conf.task_queues:
        names = settings.queues()
        if conf.task_default_queue not in names:
            names.append(conf.task_default_queue)  # plain tasks of the same app
        conf.task_queues = queues_for(names, kind, settings.max_priority)
    router = PriorityRouter(app)
    routes = conf.task_routes
    if not routes:
        conf.task_routes = (router,)
    elif not any(isinstance(r, PriorityRouter) for r in _as_list(routes)):
        conf.task_routes = (*_as_list(routes), router)
    if kind == "amqp" and conf.task_queue_max_priority is None:
        conf.task_queue_max_priority = settings.max_priority
    if kind == "amqp" and conf.broker_heartbeat:
        # A frozen (half-open) link must not block a read or write forever: without a socket
        # timeout Celery's reconnect hangs closing the event connection (channel.close -> recv).
        # With heartbeats on, an idle link still receives a frame every heartbeat/2 seconds.
        timeout = max(settings.amqp_socket_timeout, float(conf.broker_heartbeat))
        options = dict(conf.broker_transport_options or {})
        options.setdefault("read_timeout", timeout)
        options.setdefault("write_timeout", timeout)
        conf.broker_transport_options = options
    if kind == "redis":
        options = dict(conf.broker_transport_options or {})
        options.setdefault("priority_steps", list(range(10)))
        # A frozen (half-open) link: a read times out and an idle connection is pinged, so the
        # worker reconnects within seconds instead of ~2 minutes (its events too).
        options.setdefault("socket_timeout", settings.redis_socket_timeout)
        options.setdefault("socket_connect_timeout", settings.redis_socket_timeout)
        options.setdefault("health_check_interval", settings.redis_socket_timeout)
        conf.broker_transport_options = options


def _apply_preset(conf: Any, preset_settings: dict[str, Any]) -> None:
    """Set each preset key the user did not set (in conf.update, config_from_object, ...).

    Celery's own defaults are the last map of the configuration's chain; any other map holds
    values the user chose.
    """
    chosen = celery_seam.conf_maps_chosen(conf)
    for key, value in preset_settings.items():
        if not any(key in m for m in chosen):
            conf[key] = value


def _as_list(routes: Any) -> list[Any]:
    return list(routes) if isinstance(routes, list | tuple) else [routes]


def _registry_for(app: Celery) -> Registry:
    """The app's registry: ``tq_registry_url``, else its ``tq+`` result backend's store."""
    return Registry(store_for_url(registry_url(app)))


def _connect_signals(app: Celery) -> None:
    app_ref = weakref.ref(app)  # a global signal must not keep the app alive

    def on_worker_init(sender: Any = None, **kwargs: Any) -> None:
        app = app_ref()
        if app is not None and getattr(sender, "app", None) is app:
            pool = get_implementation(sender.pool_cls)
            timeouts.set_pool(pool.__module__.rsplit(".", 1)[-1])

    signals.worker_init.connect(on_worker_init, weak=False, dispatch_uid=f"tq-pool-{id(app)}")
