"""One frozen object for every ``tq_*`` setting, read from the app's configuration."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from celery import Celery

from celery_tq.errors import ConfigurationError
from celery_tq.metadata import MAX_PRIORITY, MIN_PRIORITY, validate_priority

__all__ = [
    "DEFAULT_QUEUE",
    "TqSettings",
    "read_settings",
    "refuse_pickle",
    "settings_allowing_pickle",
    "settings_for",
]

logger = logging.getLogger("celery_tq")

DEFAULT_QUEUE = "tq.default"

DEFAULTS: dict[str, Any] = {
    "tq_timeout_grace": 5.0,
    "tq_priority_bands": None,
    "tq_default_queue": None,  # None: Celery's task_default_queue (the presets make it tq.default)
    "tq_retry_backoff": 1.0,
    "tq_retry_backoff_max": 60.0,
    "tq_result_expires": 7 * 24 * 3600,
    "tq_registry_url": None,
    "tq_max_priority": 10,
    "tq_event_flush_interval": 0.1,
    "tq_event_batch": 200,
    "tq_prefetch_extra": 1,
    "tq_pause_unwatched_events": True,
    "tq_allow_pickle": False,
    "tq_max_message_bytes": 16 * 1024 * 1024,
    "tq_amqp_socket_timeout": 10.0,
    "tq_redis_socket_timeout": 5.0,
    "tq_worker_lost_retries": 3,
    "tq_worker_lost_delay": 1.0,
    "tq_worker_lost_delay_max": 10.0,
    "tq_store_retry_timeout": 60.0,
    "tq_result_poll_interval": 0.02,
    "tq_hand_over_outcomes": False,
    "tq_pipeline_redis_acks": True,
    "tq_metric_tags": (),
}

_SECONDS = (
    "timeout_grace",
    "retry_backoff",
    "retry_backoff_max",
    "result_expires",
    "event_flush_interval",
    "amqp_socket_timeout",
    "redis_socket_timeout",
    "worker_lost_delay",
    "worker_lost_delay_max",
    "store_retry_timeout",
)
_SETTINGS_ATTR = "_tq_settings"  # the app keeps its settings, like its system


@dataclass(frozen=True)
class TqSettings:
    """The plugin's settings; every field comes from the ``tq_<field>`` key."""

    timeout_grace: float
    priority_bands: Mapping[str, tuple[int, int]] | None
    default_queue: str
    retry_backoff: float
    retry_backoff_max: float
    result_expires: float
    registry_url: str | None
    max_priority: int
    event_flush_interval: float
    event_batch: int
    prefetch_extra: int
    pause_unwatched_events: bool
    allow_pickle: bool
    max_message_bytes: int
    amqp_socket_timeout: float
    redis_socket_timeout: float
    worker_lost_retries: int
    worker_lost_delay: float
    worker_lost_delay_max: float
    store_retry_timeout: float
    result_poll_interval: float
    hand_over_outcomes: bool
    pipeline_redis_acks: bool
    metric_tags: frozenset[str]

    @classmethod
    def from_app(cls, app: Celery) -> TqSettings:
        """Read and validate every ``tq_*`` key: ``ConfigurationError`` names a bad one.

        Code that runs per task or per call uses :func:`settings_for` (read once) instead.
        """
        conf = app.conf
        values = {key[3:]: conf.get(key, default) for key, default in DEFAULTS.items()}
        values["default_queue"] = str(
            values["default_queue"] or conf.get("task_default_queue") or DEFAULT_QUEUE
        )
        bands = values["priority_bands"]
        values["priority_bands"] = _validate_bands(bands) if bands else None
        for name in _SECONDS:
            values[name] = _seconds(name, values[name])
        values["result_poll_interval"] = _seconds("result_poll_interval", values["result_poll_interval"], 0.0)
        values["event_batch"] = _count("event_batch", values["event_batch"], minimum=1)
        values["max_priority"] = _count("max_priority", values["max_priority"], minimum=MAX_PRIORITY)
        values["prefetch_extra"] = _count("prefetch_extra", values["prefetch_extra"])
        values["max_message_bytes"] = _count(
            "max_message_bytes", values["max_message_bytes"], "(0: no limit)"
        )
        values["worker_lost_retries"] = _count("worker_lost_retries", values["worker_lost_retries"])
        if values["worker_lost_delay"] > values["worker_lost_delay_max"]:
            raise ConfigurationError("tq_worker_lost_delay must be <= tq_worker_lost_delay_max")
        for name in ("pause_unwatched_events", "allow_pickle", "hand_over_outcomes", "pipeline_redis_acks"):
            if not isinstance(values[name], bool):
                raise ConfigurationError(f"tq_{name} must be True or False, not {values[name]!r}")
        url = values["registry_url"]
        if url is not None and not isinstance(url, str):
            raise ConfigurationError(f"tq_registry_url must be a URL string, not {url!r}")
        values["registry_url"] = url or None
        values["metric_tags"] = _tags(values["metric_tags"])
        return cls(**values)

    def worker_lost_countdown(self, attempt: int) -> float:
        """Seconds before re-running a task whose process died for the ``attempt``-th time (0 = first)."""
        return float(min(self.worker_lost_delay * 2 ** min(attempt, 30), self.worker_lost_delay_max))

    def queues(self) -> list[str]:
        """Every queue a tq worker consumes, in band order (most urgent first)."""
        if not self.priority_bands:
            return [self.default_queue]
        return sorted(self.priority_bands, key=lambda q: -self.priority_bands[q][1])  # type: ignore[index]

    def queue_for(self, priority: int) -> str:
        if self.priority_bands:
            for queue, (low, high) in self.priority_bands.items():
                if low <= priority <= high:
                    return queue
        return self.default_queue


def settings_for(app: Celery) -> TqSettings:
    """``app``'s settings, read and validated once.

    ``install`` reads them when it configures the app (again after a late
    ``config_from_object``); an app used without ``install`` (a ``tq+`` result backend alone)
    has them read here, on first use. Changing a ``tq_*`` key later has no effect.
    """
    settings: TqSettings | None = app.__dict__.get(_SETTINGS_ATTR)
    if settings is None:
        app.conf.get("tq_timeout_grace")  # a pending configuration is built now: install reads it
        settings = app.__dict__.get(_SETTINGS_ATTR)
    return settings if settings is not None else read_settings(app)


def read_settings(app: Celery) -> TqSettings:
    """Read (again) and keep ``app``'s settings: what :func:`settings_for` returns from now on."""
    settings = app.__dict__[_SETTINGS_ATTR] = TqSettings.from_app(app)
    return settings


PICKLE_NAMES = frozenset({"pickle", "application/x-python-serialize"})
_SERIALIZER_SETTINGS = ("accept_content", "result_accept_content", "task_serializer", "result_serializer")


def settings_allowing_pickle(conf: Any) -> list[str]:
    """The Celery settings of ``conf`` that let pickle in (an unpickled message runs code)."""
    found = []
    for key in _SERIALIZER_SETTINGS:
        value = conf.get(key)
        values = {value} if isinstance(value, str) else set(value or ())
        if values & PICKLE_NAMES:
            found.append(key)
    return found


def refuse_pickle(conf: Any) -> None:
    """Anyone who can publish a pickled message runs code in the worker: ``ConfigurationError``
    unless the user says, with ``tq_allow_pickle = True``, that every publisher is trusted."""
    allowing = settings_allowing_pickle(conf)
    if allowing and not conf.get("tq_allow_pickle"):
        raise ConfigurationError(
            f"{', '.join(allowing)} allow pickle: anyone who can publish a message could run code "
            'in the worker. Use "json" (the presets\' choice), or set tq_allow_pickle = True if '
            "every publisher and the broker are trusted"
        )


def _validate_bands(bands: object) -> dict[str, tuple[int, int]]:
    if not isinstance(bands, Mapping):
        raise ConfigurationError(
            'tq_priority_bands must map queue names to (low, high), e.g. {"tq.high": (7, 9)}'
        )
    result: dict[str, tuple[int, int]] = {}
    covered: dict[int, str] = {}
    for queue, band in bands.items():
        try:
            low, high = (validate_priority(p) for p in band)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"tq_priority_bands[{queue!r}] = {band!r}: {exc}") from exc
        if low > high:
            raise ConfigurationError(f"tq_priority_bands[{queue!r}]: low {low} > high {high}")
        for p in range(low, high + 1):
            if p in covered:
                raise ConfigurationError(f"priority {p} is in two bands: {covered[p]!r} and {queue!r}")
            covered[p] = str(queue)
        result[str(queue)] = (low, high)
    missing = [p for p in range(MIN_PRIORITY, MAX_PRIORITY + 1) if p not in covered]
    if missing:
        logger.warning("tq_priority_bands leaves priorities %s to tq_default_queue", missing)
    return result


def _seconds(name: str, value: object, exclusive_min: float | None = None) -> float:
    """A duration in seconds: a number >= 0 (> ``exclusive_min`` when given)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"tq_{name} must be a number of seconds, not {value!r}")
    if exclusive_min is not None and not value > exclusive_min:
        raise ConfigurationError(f"tq_{name} must be > {exclusive_min:g} seconds, not {value!r}")
    if value < 0:
        raise ConfigurationError(f"tq_{name} must be >= 0 seconds, not {value!r}")
    return float(value)


def _count(name: str, value: object, note: str = "", minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(
            f"tq_{name} must be an int >= {minimum}{' ' + note if note else ''}, not {value!r}"
        )
    return value


def _tags(value: object) -> frozenset[str]:
    """``tq_metric_tags``: a collection of tag names (a lone string is a mistake, not its letters)."""
    if value is None:
        return frozenset()
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ConfigurationError(
            f'tq_metric_tags must be a list or set of tag names, e.g. ["billing"], not {value!r}'
        )
    tags = list(value)
    bad = [t for t in tags if not isinstance(t, str) or not t]
    if bad:
        raise ConfigurationError(f"tq_metric_tags must hold non-empty strings, not {bad[0]!r}")
    return frozenset(tags)
