"""``check()``: findings about an app's configuration, each with the fix spelled out."""

from __future__ import annotations

from typing import Any

from celery import Celery

from celery_tq.checks.broker import amqp_findings, reachability_findings, redis_persistence_findings
from celery_tq.checks.findings import Finding
from celery_tq.routing import broker_kind
from celery_tq.settings import settings_for
from celery_tq.task import TqTask

__all__ = ["Finding", "run"]

_ORDER = {"error": 0, "warning": 1, "info": 2}
_NO_PRIORITY = {"memory", "filesystem", "sqs", "sqla", "sqlalchemy", "zookeeper", "etcd"}


def run(app: Celery, reach: bool = False) -> list[Finding]:
    """Findings, most severe first; with ``reach``, also whether the broker and store answer."""
    conf = app.conf
    findings: list[Finding] = reachability_findings(app) + redis_persistence_findings(app) if reach else []
    findings += _serializers(conf)
    findings += _priority(app)
    findings += _timeouts(app)
    findings += _registry(app)
    findings += amqp_findings(app)
    if not conf.result_backend or conf.result_backend == "disabled":
        findings.append(
            Finding(
                "warning",
                "no-result-backend",
                "no result backend: callers cannot get results or errors",
                'set result_backend (the development preset uses "tq+sqlite:///...")',
            )
        )
    return sorted(findings, key=lambda f: _ORDER[f.level])


def _serializers(conf: Any) -> list[Finding]:
    accepted = set(conf.accept_content or ()) | set(conf.result_accept_content or ())
    accepted |= {conf.task_serializer, conf.result_serializer}
    if {"pickle", "application/x-python-serialize"} & accepted:
        return [
            Finding(
                "error",
                "pickle-accepted",
                "pickle is accepted: anyone who can publish a message can run code in the worker",
                'set accept_content = result_accept_content = ["json"] and the serializers to "json"',
            )
        ]
    return []


def _priority(app: Celery) -> list[Finding]:
    conf = app.conf
    findings: list[Finding] = []
    kind = broker_kind(conf.broker_url)
    if kind in _NO_PRIORITY or kind.startswith("sqla"):
        findings.append(
            Finding(
                "warning",
                "priority-ignored",
                f"the {kind}:// transport ignores message priority: tasks run in FIFO order",
                "use the embedded broker (development preset), Redis or RabbitMQ",
            )
        )
    if kind == "redis":
        steps = (conf.broker_transport_options or {}).get("priority_steps")
        if steps is not None and len(set(steps)) < 10:
            findings.append(
                Finding(
                    "error",
                    "redis-priority-steps",
                    f"Redis priority_steps={steps!r} merge priorities into {len(set(steps))} levels",
                    "remove priority_steps from broker_transport_options (celery-tq sets 0..9)",
                )
            )
    if (conf.worker_prefetch_multiplier or 0) > 1:
        findings.append(
            Finding(
                "warning",
                "prefetch-defeats-priority",
                f"worker_prefetch_multiplier={conf.worker_prefetch_multiplier}: each worker "
                "reserves tasks before it sees more urgent ones",
                "set worker_prefetch_multiplier = 1 and task_acks_late = True",
            )
        )
    extra = settings_for(app).prefetch_extra
    if extra > 1:
        findings.append(
            Finding(
                "warning",
                "prefetch-extra-defeats-priority",
                f"tq_prefetch_extra={extra}: an urgent task may start after concurrency + {extra} "
                "lower ones a worker already reserved",
                "set tq_prefetch_extra = 1 (concurrency + 1) or 0 (only what runs)",
            )
        )
    return findings


def _timeouts(app: Any) -> list[Finding]:
    pool = str(app.conf.worker_pool or "prefork")
    timed = sorted(
        name
        for name, task in app.tasks.items()
        if isinstance(task, TqTask) and task.tq_metadata.timeout is not None
    )
    if not timed:
        return []
    if pool in {"eventlet", "gevent"}:
        return [
            Finding(
                "error",
                "pool-cannot-enforce-timeouts",
                f"the {pool} pool cannot enforce timeouts; timed tasks fail with "
                f"ConfigurationError there: {', '.join(timed[:5])}",
                "run these tasks on a prefork, threads or solo worker (-P prefork)",
            )
        ]
    if pool in {"threads", "solo"}:
        return [
            Finding(
                "info",
                "timeouts-enforced-by-tq",
                f"the {pool} pool has no time limits; celery-tq raises TaskTimeout in the task "
                "itself (a task blocked in C code is failed at timeout + grace)",
                "prefork enforces hard limits by killing the process",
            )
        ]
    return []


def _registry(app: Celery) -> list[Finding]:
    from celery_tq.registry.capture import registry_url

    backend = str(app.conf.result_backend or "")
    # With in-memory results (the testing preset) or broker everything runs in one process anyway.
    single_process = backend.startswith(("cache+memory", "memory", "tq+memory")) or str(
        app.conf.broker_url or ""
    ).startswith("memory")
    if registry_url(app).startswith(("memory://", "tq+memory://")) and not single_process:
        return [
            Finding(
                "warning",
                "registry-in-memory",
                "no registry store: task records would live only in each process's memory, so "
                "prefork workers do not record tasks at all and `celery tq tasks` shows none",
                'use result_backend = "tq+sqlite:///path" (or tq+postgresql://, tq+redis://), '
                "or set tq_registry_url to one of those stores",
            )
        ]
    return []
