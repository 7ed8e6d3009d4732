"""The seam with Celery, kombu, py-amqp and redis-py: every private member celery-tq touches.

Where those libraries offer no public hook, celery-tq uses one of their private members, and only
here: each use is one function below whose docstring names the member, what celery-tq relies on
and the versions it was checked on. ``setup.cfg`` pins the minor versions (``celery>=5.7,<5.8``,
``kombu>=5.7,<5.8``); ``tests/unit/test_seam.py`` fails when another module of the package uses a
private member, and when an installed version no longer has one of :data:`MEMBERS`.

Checked on celery 5.7.0, kombu 5.7.0, py-amqp 5.4.2, redis-py 6.4.0 and 8.1.0 (the versions
``ci/lowest-constraints.txt`` and ``make install`` bring).

Besides the calls below, :class:`celery_tq.backend.TqBackend` and its mixins override the hooks
Celery's result backends are written against (``_store_result``, ``_get_task_meta_for``; as
django-celery-results does), and the kombu transports under ``celery_tq/transport/`` subclass
kombu's and use their base classes' members, listed in each transport module's docstring.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Any

from celery import Celery, Task

__all__ = [
    "HOOKS",
    "MEMBERS",
    "base_result_meta",
    "base_task_meta_for",
    "chord_error_with_cause",
    "clear_task_join_will_block",
    "conf_maps_chosen",
    "connection_socket",
    "count_fanout_receivers",
    "default_app",
    "drop_connection_caches",
    "in_confirm_mode",
    "is_lazy_header",
    "kombu_parse_url",
    "plain_basic_publish",
    "pool_connections",
    "publish_callback",
    "register_transport_alias",
    "request_context",
    "restore_event_publish",
    "retype",
    "set_default_app",
    "tracer_pushes_request",
    "wrap_backends",
    "wrap_event_publish",
    "wrap_task_sender",
]

Sender = Callable[..., Any]

#: ``module:object`` -> the private members of it used below; ``tests/unit/test_seam.py`` checks
#: that each still exists on the installed versions.
MEMBERS: dict[str, tuple[str, ...]] = {
    "celery.app.amqp:AMQP": ("_create_task_sender", "_retry_publish", "_producer_pool"),
    "celery.app.base:Celery": ("_get_backend", "_local", "_backend_cache", "_pool"),
    "celery.backends.base:BaseBackend": ("_get_result_meta",),
    "celery.backends.base": ("_create_chord_error_with_cause",),
    "celery.utils.functional": ("_regen",),
    "celery._state": ("_set_task_join_will_block", "default_app", "set_default_app"),
    "celery.events.dispatcher:EventDispatcher": ("_publish",),
    "celery.worker.request:Request": ("_context",),
    "amqp.channel:Channel": ("_basic_publish", "_confirm_selected"),
    "kombu.utils.url": ("_parse_url",),
    "kombu.transport": ("TRANSPORT_ALIASES",),
    "redis.connection:ConnectionPool": ("_in_use_connections", "_available_connections"),
    "redis.connection:Connection": ("_sock",),
    "kombu.transport.redis:Channel": ("_put_fanout", "_get_publish_topics"),
}

#: Backend hooks celery-tq overrides (Celery calls them; they are what backend authors override).
HOOKS: dict[str, tuple[str, ...]] = {
    "celery.backends.base:BaseKeyValueStoreBackend": ("_store_result", "_get_task_meta_for"),
}


def resolve(target: str) -> Any:
    """The object a :data:`MEMBERS` key names (``module`` or ``module:attribute``)."""
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr) if attr else module


# --- publishing -----------------------------------------------------------------------------------


def wrap_task_sender(app: Celery, wrap: Callable[[Sender], Sender]) -> None:
    """Every task message ``app`` sends goes through ``wrap(celery's sender)``.

    Relies on ``celery.app.amqp.AMQP._create_task_sender()`` building the
    ``send_task_message(producer, name, message, **options)`` function that every path that sends
    a task (``apply_async``, ``send_task``, canvas, retries) ends in, and on
    ``AMQP.send_task_message`` being a ``cached_property`` of it (a cached one, made before this
    call, is dropped). Checked on celery 5.7.0.
    """
    amqp: Any = app.amqp
    amqp.__dict__.pop("send_task_message", None)
    create = amqp._create_task_sender

    def _create_task_sender() -> Sender:
        return wrap(create())

    amqp._create_task_sender = _create_task_sender


def publish_callback(app: Celery, publish: Sender, *args: Any) -> Any:
    """Publish a chord's body as Celery's backends do: ``app.amqp._retry_publish(publish, *args)``.

    Relies on ``AMQP._retry_publish`` marking the publish as a callback's, which makes Celery wait
    between publish retries (a context variable read by ``send_task_message``). Checked on
    celery 5.7.0.
    """
    amqp: Any = app.amqp
    return amqp._retry_publish(publish, *args)


# --- result backends ------------------------------------------------------------------------------


def wrap_backends(app: Celery, wrap: Callable[[Any], Any]) -> None:
    """Every result backend ``app`` creates (one per thread, or one shared) is ``wrap(backend)``.

    Relies on ``Celery._get_backend()`` being what ``app.backend`` calls to create a backend and on
    a backend made earlier sitting in ``app._local.backend`` (thread-unsafe backends) or in
    ``app._backend_cache`` (thread-safe ones). Checked on celery 5.7.0.
    """
    own: Any = app
    create = own._get_backend

    def _get_backend() -> Any:
        return wrap(create())

    own._get_backend = _get_backend
    for backend in (getattr(own._local, "backend", None), own._backend_cache):
        if backend is not None:
            wrap(backend)


def retype(backend: Any, cls: type[Any]) -> None:
    """Make ``backend`` an instance of ``cls`` (a subclass of its class adding a mixin).

    Relies on Celery's backend classes having no ``__slots__`` and on their methods looking
    nothing up by exact class, so ``__class__`` can be assigned. Checked on celery 5.7.0's
    backends (``celery.backends.*``).
    """
    backend.__class__ = cls


def base_result_meta(base: Any, **kwargs: Any) -> dict[str, Any]:
    """Celery's meta dict of a state to store: ``base._get_result_meta(**kwargs)``.

    ``base`` is the calling backend's ``super()``. Relies on
    ``BaseBackend._get_result_meta(result, state, traceback, request, ...)`` returning the dict
    Celery's backends store (status, result, traceback, children, date_done, and the request's
    extended fields). Checked on celery 5.7.0.
    """
    meta: dict[str, Any] = base._get_result_meta(**kwargs)
    return meta


def base_task_meta_for(base: Any, task_id: str) -> Any:
    """The stored meta of a task, read by the next backend class: ``base._get_task_meta_for(id)``.

    ``base`` is the calling mixin's ``super()``. Relies on ``_get_task_meta_for`` being the read
    every backend implements behind ``get_task_meta``. Checked on celery 5.7.0.
    """
    return base._get_task_meta_for(task_id)


def is_lazy_header(value: Any) -> bool:
    """True for a chord header Celery keeps as a lazy generator (``celery.utils.functional._regen``).

    Celery's Redis backend leaves such headers alone in ``apply_chord``; so does celery-tq.
    Checked on celery 5.7.0.
    """
    functional = importlib.import_module("celery.utils.functional")
    return isinstance(value, functional._regen)


def chord_error_with_cause(message: str, original_exc: BaseException | None) -> Exception:
    """The ``ChordError`` Celery's Redis backend raises for a failed header task, with the
    header's exception as its cause: ``celery.backends.base._create_chord_error_with_cause``.
    Checked on celery 5.7.0."""
    base = importlib.import_module("celery.backends.base")
    error: Exception = base._create_chord_error_with_cause(message=message, original_exc=original_exc)
    return error


# --- the worker -----------------------------------------------------------------------------------


def tracer_pushes_request(next_call: Callable[..., Any]) -> bool:
    """True if a task whose ``__call__`` would next call ``next_call`` may call ``run`` directly.

    Relies on Celery's tracer (``celery.app.trace.build_tracer``) pushing the task and its request
    before calling a task that has its own ``__call__``, so ``Task.__call__`` (which pushes a
    request holding only args and kwargs) must not run again inside it. Checked on celery 5.7.0.
    """
    return next_call is Task.__call__


def request_context(request: Any) -> Any:
    """The run's ``Context`` of a worker's request: ``celery.worker.request.Request._context``.

    Relies on it being the context Celery's own ``on_failure``/``on_retry`` hand to signals and
    to ``mark_as_retry``, holding the message's headers. Checked on celery 5.7.0.
    """
    return request._context


def wrap_event_publish(dispatcher: Any, publish: Sender) -> Sender:
    """Send every event of ``dispatcher`` through ``publish``; returns Celery's own publish.

    Relies on ``celery.events.dispatcher.EventDispatcher._publish(event, producer, routing_key,
    ...)`` being the one method that sends single and batched events. Checked on celery 5.7.0.
    """
    original: Sender = dispatcher._publish
    dispatcher._publish = publish
    return original


def restore_event_publish(dispatcher: Any) -> None:
    """Undo :func:`wrap_event_publish` (``EventDispatcher._publish`` is Celery's again)."""
    dispatcher.__dict__.pop("_publish", None)


def in_confirm_mode(channel: Any) -> bool:
    """True if a py-amqp channel is in confirm mode: ``amqp.Channel._confirm_selected``.

    Relies on py-amqp setting it on the first confirmed publish; a channel in confirm mode cannot
    leave it. Unknown (no such member) counts as True. Checked on py-amqp 5.4.2.
    """
    return bool(getattr(channel, "_confirm_selected", True))


def plain_basic_publish(channel: Any) -> None:
    """Make a py-amqp channel publish without waiting for confirms.

    Relies on ``amqp.Channel._basic_publish`` being the unconfirmed publish that
    ``basic_publish_confirm`` wraps (kombu sets ``basic_publish = basic_publish_confirm`` for
    ``confirm_publish``). Checked on py-amqp 5.4.2.
    """
    channel.basic_publish = channel._basic_publish


# --- the process ----------------------------------------------------------------------------------


def default_app() -> Celery | None:
    """The process's default app, if one was set: ``celery._state.default_app``.
    Checked on celery 5.7.0."""
    state = importlib.import_module("celery._state")
    app: Celery | None = state.default_app
    return app


def set_default_app(app: Celery) -> None:
    """Make ``app`` the process's default again: ``celery._state.set_default_app``.
    Checked on celery 5.7.0."""
    importlib.import_module("celery._state").set_default_app(app)


def clear_task_join_will_block() -> None:
    """Tell Celery this process's caller is not a task: ``celery._state._set_task_join_will_block``.

    A worker's pool sets it at start, after which ``AsyncResult.get()`` in this process refuses to
    run (``RuntimeError``); the in-process worker's caller is not a task. Checked on celery 5.7.0.
    """
    importlib.import_module("celery._state")._set_task_join_will_block(False)


def conf_maps_chosen(conf: Any) -> list[Any]:
    """The maps of an app's configuration that hold values the user chose (not the defaults).

    Relies on ``app.conf`` being a ``celery.utils.collections.ChainMap`` whose ``maps`` end with
    Celery's own defaults. Checked on celery 5.7.0.
    """
    return list(conf.maps[:-1])


def drop_connection_caches(app: Celery) -> None:
    """Forget ``app``'s broker connections, producers and result backend, so the next use
    connects to what its configuration says now.

    Relies on ``Celery._pool`` (connection pool), ``AMQP._producer_pool``, ``Celery._backend_cache``
    and ``Celery._local.backend`` being where they are cached. Checked on celery 5.7.0.
    """
    own: Any = app
    if own._pool is not None:
        own._pool.force_close_all()
        own._pool = None
    own.amqp._producer_pool = None
    own._backend_cache = None
    own._local.__dict__.pop("backend", None)


# --- kombu and redis-py ---------------------------------------------------------------------------


def register_transport_alias(alias: str, target: str) -> None:
    """Make kombu resolve ``alias+...`` URLs to ``target`` (``module:Class``).

    Relies on ``kombu.transport.TRANSPORT_ALIASES`` being the table ``resolve_transport`` reads;
    kombu has no registration function. Checked on kombu 5.7.0.
    """
    aliases = importlib.import_module("kombu.transport").TRANSPORT_ALIASES
    aliases[alias] = target


def kombu_parse_url(url: str) -> Any:
    """kombu's URL parts (``transport, hostname, port, username, password, virtual_host, query``):
    ``kombu.utils.url._parse_url``, as kombu's Redis transport reads its URL. Checked on kombu 5.7.0."""
    return importlib.import_module("kombu.utils.url")._parse_url(url)


def pool_connections(pool: Any) -> list[Any]:
    """The connections of a redis-py ``ConnectionPool`` (kombu's and Sentinel's), in use and free;
    none if it cannot tell.

    Relies on ``ConnectionPool._in_use_connections`` (a set) and ``_available_connections`` (a
    list), copied under the pool's lock by ``_get_in_use_connections()``/``_get_free_connections()``
    where redis-py has them (8.1 does; 6.4 has only the attributes, read here without the lock).
    Checked on redis-py 6.4.0 and 8.1.0.
    """
    connections: list[Any] = []
    for method, attribute in (
        ("_get_in_use_connections", "_in_use_connections"),
        ("_get_free_connections", "_available_connections"),
    ):
        try:
            read = getattr(pool, method, None)
            connections += list(read() if read is not None else getattr(pool, attribute, ()))
        except Exception:  # a pool closed or changed meanwhile: no sockets to give
            continue
    return connections


def connection_socket(connection: Any) -> Any:
    """The socket of a redis-py connection, or None: ``redis.connection.Connection._sock``.
    Checked on redis-py 6.4.0 and 8.1.0."""
    return getattr(connection, "_sock", None)


def count_fanout_receivers(channel: Any) -> bool:
    """Make a channel of kombu's Redis transport (``redis://``, ``sentinel://``, and celery-tq's
    ``tq+redis://``, which subclasses it) keep how many subscribers got its last fanout message
    in ``channel.tq_fanout_receivers`` (the number Redis PUBLISH answers); False for any other
    channel. Set on the one channel: its other publishes are kombu's.

    Relies on ``kombu.transport.redis.Channel._put_fanout(exchange, message, routing_key,
    **kwargs)`` being the fanout publish (``_publish_batch`` in ``kwargs``: sent later with a
    batch, so no count), ``_get_publish_topics(exchange, routing_key)`` naming its PUB/SUB
    topics, and ``conn_or_acquire()`` giving its client. Checked on kombu 5.7.0.
    """
    try:
        from kombu.transport.redis import Channel as RedisChannel
    except ImportError:  # redis-py not installed: no Redis channel exists
        return False
    if not isinstance(channel, RedisChannel):
        return False
    return _count_fanout_receivers(channel)


def _count_fanout_receivers(channel: Any) -> bool:
    kombus = channel._put_fanout

    def put_fanout(exchange: str, message: Any, routing_key: str, **kwargs: Any) -> None:
        if kwargs.get("_publish_batch") is not None:
            kombus(exchange, message, routing_key, **kwargs)
            return
        from kombu.utils.json import dumps

        payload = dumps(message)
        with channel.conn_or_acquire() as client:
            channel.tq_fanout_receivers = sum(
                int(client.publish(topic, payload))
                for topic in channel._get_publish_topics(exchange, routing_key)
            )

    channel.tq_fanout_receivers = None
    channel._put_fanout = put_fanout
    return True


def iter_members() -> Iterable[tuple[str, str]]:
    """Every (``module:object``, member) of :data:`MEMBERS` and :data:`HOOKS`."""
    for table in (MEMBERS, HOOKS):
        for target, names in table.items():
            for name in names:
                yield target, name
