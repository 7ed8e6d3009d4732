"""Findings that need the servers themselves: can the broker and the registry store be reached,
RabbitMQ queue arguments and server version."""

from __future__ import annotations

import contextlib
import re
from typing import Any

from celery import Celery

from celery_tq.checks.findings import Finding
from celery_tq.routing import broker_kind
from celery_tq.settings import settings_for

__all__ = ["amqp_findings", "reachability_findings", "redis_persistence_findings"]

_PRECONDITION_FAILED = 406
_SETTING = {"broker": "broker_url", "registry store": "result_backend or tq_registry_url"}


def reachability_findings(app: Celery) -> list[Finding]:
    """An error finding for a broker or a registry store that does not answer (RabbitMQ's broker
    is tried by :func:`amqp_findings`, which inspects it anyway)."""
    findings: list[Finding] = []
    kind = broker_kind(app.conf.broker_url)
    if kind not in {"amqp", "memory"}:
        try:
            with app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=5)
        except Exception as exc:
            findings.append(_unreachable("broker", app.conf.broker_url, exc))
    from celery_tq.registry import Registry, store_for_url
    from celery_tq.registry.capture import registry_url

    url = registry_url(app)
    if not url.startswith(("memory://", "tq+memory://")):
        try:
            Registry(store_for_url(url)).query(limit=1)
        except Exception as exc:
            findings.append(_unreachable("registry store", url, exc))
    return findings


def redis_persistence_findings(app: Celery) -> list[Finding]:
    """A warning when a Redis broker keeps nothing on disk (no AOF, no RDB snapshots): a restart
    of that Redis loses every queued task. Silent where CONFIG is not allowed (managed Redis)."""
    if broker_kind(app.conf.broker_url) != "redis":
        return []
    try:
        with app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=3)
            channel: Any = conn.default_channel
            client = channel.client
            appendonly = client.config_get("appendonly").get("appendonly")
            save = client.config_get("save").get("save")
    except Exception:  # CONFIG disabled, or unreachable (reported by reachability_findings)
        return []
    if str(appendonly) == "yes" or save not in (None, ""):
        return []
    return [
        Finding(
            "warning",
            "redis-no-persistence",
            f"the Redis broker {_safe(app.conf.broker_url)} keeps nothing on disk (appendonly no, "
            "no save points): a restart of that Redis loses every queued task",
            "enable persistence on the broker's Redis: `appendonly yes` (with `appendfsync everysec` "
            "or `always`), or RDB save points at the least",
        )
    ]


def _unreachable(what: str, url: str, exc: BaseException) -> Finding:
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return Finding(
        "error",
        f"{what.split()[-1]}-unreachable",
        f"the {what} at {_safe(url)} does not answer: {detail}",
        f"start it, or fix the URL ({_SETTING[what]})",
    )


def _safe(url: str) -> str:
    """The URL without its password."""
    return re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", str(url))


def amqp_findings(app: Celery) -> list[Finding]:
    """RabbitMQ: tq queues that exist with other arguments (the 406 trap), quorum + priority."""
    if broker_kind(app.conf.broker_url) != "amqp":
        return []
    settings = settings_for(app)
    queues = [q for q in app.amqp.queues.values() if q.name in settings.queues()]
    findings: list[Finding] = []
    if len(settings.queues()) > 1:
        findings.append(
            Finding(
                "info",
                "amqp-bands-interleave",
                "RabbitMQ interleaves queues consumed by one worker: priority is strict inside each "
                "band queue, not across them",
                "run one worker per band (celery worker -Q tq.high) to reserve capacity for urgent work",
            )
        )
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
            raw = conn.connection.server_properties.get("version", "0")
            version = raw.decode() if isinstance(raw, bytes) else str(raw)
            for queue in queues:
                findings += _queue_findings(conn, queue, version)
    except Exception as exc:  # an unreachable broker is a finding, not a crash of check()
        findings.append(_unreachable("broker", app.conf.broker_url, exc))
    return findings


def _queue_findings(conn: Any, queue: Any, version: str) -> list[Finding]:
    arguments = dict(queue.queue_arguments or {})
    quorum = arguments.get("x-queue-type") == "quorum"
    if quorum and "x-max-priority" in arguments and _major(version) < 4:
        return [
            Finding(
                "error",
                "amqp-quorum-priority",
                f"queue {queue.name!r} is a quorum queue with x-max-priority, which RabbitMQ "
                f"{version} refuses (quorum queues take priorities from 4.x on)",
                "declare tq queues as classic queues (task_default_queue_type = 'classic')",
            )
        ]
    if not _exists(conn, queue.name):
        return []  # the worker will declare it with the right arguments
    channel = conn.channel()
    try:
        queue.bind(channel).declare()  # same arguments: a no-op; other arguments: 406
    except Exception as exc:
        if getattr(exc, "code", None) != _PRECONDITION_FAILED:
            raise
        return [
            Finding(
                "error",
                "amqp-queue-arguments",
                f"queue {queue.name!r} exists on RabbitMQ with other arguments than {arguments} "
                f"(x-max-priority cannot change: 406 PRECONDITION_FAILED)",
                f"stop producers, let workers drain {queue.name!r}, then `rabbitmqctl delete_queue "
                f"{queue.name}` and restart the workers (they redeclare it); or set "
                "tq_default_queue to a new name and migrate",
            )
        ]
    finally:
        with contextlib.suppress(Exception):  # the broker already closed it after a 406
            channel.close()
    return []


def _exists(conn: Any, name: str) -> bool:
    """Whether queue ``name`` exists; connection errors propagate (reported as unreachable)."""
    from amqp.exceptions import NotFound

    channel = conn.channel()
    try:
        channel.queue_declare(queue=name, passive=True)
        return True
    except NotFound:  # 404: the broker closed this channel; the next check opens its own
        return False
    finally:
        with contextlib.suppress(Exception):
            channel.close()


def _major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        return 0
