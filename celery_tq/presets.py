"""Presets: small pure functions returning plain Celery settings plus ``tq_*`` keys.

``install(app, preset=...)`` applies them as defaults, so the user's own settings win.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery_tq.errors import ConfigurationError
from celery_tq.settings import DEFAULT_QUEUE

__all__ = ["PRESETS", "data_dir", "development", "production", "resolve", "testing"]

Settings = dict[str, Any]


def data_dir() -> Path:
    """Where the development preset keeps its files: ``$TQ_DATA_DIR`` or ``./.celery_tq``."""
    return Path(os.environ.get("TQ_DATA_DIR") or ".celery_tq").resolve()


def _common() -> Settings:
    return {
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_default_queue": DEFAULT_QUEUE,
        "worker_prefetch_multiplier": 1,
        "task_acks_late": True,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_track_started": True,
        "result_extended": True,
        "broker_connection_retry_on_startup": True,
        # Celery 5.5+ declares a worker's remote-control (pidbox) queue exclusive to its connection.
        # A worker that reconnects before RabbitMQ has closed its old connection (a dropped or
        # frozen link) then gets RESOURCE_LOCKED and stops with "Unrecoverable error". Not
        # exclusive, the queue still goes with its last consumer (auto-delete, control_queue_expires).
        "control_queue_exclusive": False,
    }


def development() -> Settings:
    """One machine, no server: the embedded SQLite broker and the SQLite registry/results under data_dir()."""
    root = data_dir()
    return {
        **_common(),
        "broker_url": f"tq+sqlite:///{root / 'broker.db'}",
        # sqlite:/// + an absolute path = four slashes: absolute, as SQLAlchemy reads it.
        "result_backend": f"tq+sqlite:///{root / 'results.db'}",
        "tq_result_expires": 7 * 24 * 3600,
        "tq_timeout_grace": 5.0,
    }


def testing() -> Settings:
    """One process (``tq.start()``): in-memory broker and results, short grace."""
    return {
        **_common(),
        "broker_url": "memory://",
        "result_backend": "tq+memory://",
        "worker_hijack_root_logger": False,
        "tq_timeout_grace": 1.0,
    }


def production() -> Settings:
    """RabbitMQ (or Redis) and PostgreSQL, with the settings that lose nothing.

    Late ack plus reject-on-worker-lost redeliver a task whose worker died; redelivery is
    bounded by ``task_retry_on_worker_lost`` and the task's ``max_retries``. Publisher
    confirms on AMQP, a broker heartbeat, result-store retries, JSON only, events on.
    """
    return {
        **_common(),
        "broker_url": _reliable(os.environ.get("TQ_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")),
        # The tq backend: results and task records in PostgreSQL, one write per state change.
        "result_backend": os.environ.get(
            "TQ_RESULT_BACKEND", "tq+postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
        ),
        "task_reject_on_worker_lost": True,
        "task_retry_on_worker_lost": True,
        "broker_heartbeat": 6,
        "broker_transport_options": {
            "confirm_publish": True,
            # For a sentinel:// TQ_BROKER_URL: the name in `sentinel monitor <name> ...`.
            **({"master_name": master} if (master := os.environ.get("TQ_SENTINEL_MASTER")) else {}),
        },
        "broker_connection_max_retries": 100,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "result_backend_always_retry": True,
        "result_backend_max_retries": 30,
        "result_backend_max_sleep_between_retries_ms": 2000,
        "task_publish_retry": True,
        # Only needed when TQ_RESULT_BACKEND names another (non-tq) Celery backend.
        **({"tq_registry_url": os.environ["TQ_REGISTRY_URL"]} if os.environ.get("TQ_REGISTRY_URL") else {}),
        "tq_result_expires": 7 * 24 * 3600,
        "tq_timeout_grace": 10.0,
        # Pool processes hand outcomes to the main process, which writes them in batches (SQL
        # registries, Redis) and acks once they are durable (README, "The write path"): a commit
        # costs more than the row, and a pool process waiting for its write runs nothing. A
        # cut-off host may then have run up to 3c + 1 tasks that run again elsewhere (c + 1 with
        # it off).
        "tq_hand_over_outcomes": True,
    }


def _reliable(broker_url: str) -> str:
    """On Redis or Sentinel, production uses the plugin's reliable transport (same keys as kombu's)."""
    if broker_url.startswith(("redis://", "rediss://", "sentinel://")):
        return f"tq+{broker_url}"
    return broker_url


PRESETS: dict[str, Callable[[], Settings]] = {
    "development": development,
    "testing": testing,
    "production": production,
}


def resolve(preset: str | Settings | None) -> Settings:
    """The settings of a preset given by name (or as a dict already)."""
    if preset is None:
        return {}
    if isinstance(preset, dict):
        return dict(preset)
    try:
        return PRESETS[preset]()
    except KeyError:
        raise ConfigurationError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}") from None
