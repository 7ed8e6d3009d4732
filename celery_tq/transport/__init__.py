"""kombu transports of celery-tq, selected by the URL scheme after ``tq+``.

``tq+sqlite:////abs/path.db`` (or ``tq+sqlite:///relative/path.db``) is the embedded
SQLite broker. kombu maps the alias ``tq`` to :class:`Transport` and passes the rest of
the URL (``sqlite:///...``) as the connection's hostname; :class:`Transport` then builds
the implementation chosen by :func:`transport_for_url`. A new backend (e.g. ``tq+redis``)
plugs in by adding ``"redis": "celery_tq.transport.redis:Transport"`` to ``SCHEMES``.
Importing this module has no side effects; call :func:`register_transports`.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import virtual
from kombu.utils.imports import symbol_by_name

__all__ = ["SCHEMES", "Transport", "register_transports", "transport_for_url"]

#: inner URL scheme -> "module:Class" of the kombu transport implementing it.
SCHEMES: dict[str, str] = {
    "sqlite": "celery_tq.transport.sqlite:Transport",
    "redis": "celery_tq.transport.redis:Transport",
    "rediss": "celery_tq.transport.redis:Transport",
    "sentinel": "celery_tq.transport.redis_sentinel:Transport",
}


def transport_for_url(hostname: str) -> type[Any]:
    """Return the transport class for the part of a ``tq+`` URL after ``tq+``."""
    scheme = hostname.partition("://")[0] if "://" in hostname else ""
    try:
        target = SCHEMES[scheme]
    except KeyError:
        supported = ", ".join(f"tq+{s}://" for s in sorted(SCHEMES))
        raise ValueError(
            f"unsupported celery-tq broker URL 'tq+{hostname}': supported schemes are {supported}"
        ) from None
    cls: type[Any] = symbol_by_name(target)
    return cls


class Transport(virtual.Transport):
    """Dispatcher: instantiating it returns the transport for the connection's URL.

    kombu only reads a few class attributes before instantiating (none of which
    depend on the scheme); every later access goes to the returned instance.
    """

    driver_type = "tq"
    driver_name = "tq"
    implements = virtual.Transport.implements.extend(
        asynchronous=False, exchange_type=frozenset(["direct", "topic", "fanout"])
    )

    def __new__(cls, client: Any, **kwargs: Any) -> Any:
        return transport_for_url(client.hostname or "")(client, **kwargs)


def register_transports() -> None:
    """Make kombu resolve ``tq+...`` URLs to :class:`Transport` (idempotent)."""
    from celery_tq.celery_seam import register_transport_alias

    register_transport_alias("tq", "celery_tq.transport:Transport")
    _merge_errors()


def _merge_errors() -> None:
    """Give the dispatcher the error classes of every implementation.

    kombu's ``Connection.connection_errors`` (which Celery's consumer reads before it connects,
    to decide which errors mean "reconnect") comes from the transport *class*, so the
    dispatcher must list them all; without it a Redis restart is an unrecoverable error.
    """
    for kind in ("connection_errors", "channel_errors"):
        errors = list(getattr(virtual.Transport, kind))
        for target in SCHEMES.values():
            try:
                cls = symbol_by_name(target)
            except ImportError:  # e.g. redis-py not installed
                continue
            errors += [e for e in getattr(cls, kind) if e not in errors]
        setattr(Transport, kind, tuple(errors))
