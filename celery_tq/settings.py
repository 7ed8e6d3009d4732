"""One frozen object for every ``tq_*`` setting, read from the app's configuration."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from celery import Celery

from celery_tq.errors import ConfigurationError
from celery_tq.metadata import MAX_PRIORITY, MIN_PRIORITY, validate_priority

__all__ = ["DEFAULT_QUEUE", "TqSettings", "refuse_pickle", "settings_allowing_pickle"]

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
}


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

    @classmethod
    def from_app(cls, app: Celery) -> TqSettings:
        conf = app.conf
        values = {key[3:]: conf.get(key, default) for key, default in DEFAULTS.items()}
        values["default_queue"] = str(
            values["default_queue"] or conf.get("task_default_queue") or DEFAULT_QUEUE
        )
        bands = values["priority_bands"]
        values["priority_bands"] = _validate_bands(bands) if bands else None
        if float(values["timeout_grace"]) < 0:
            raise ConfigurationError("tq_timeout_grace must be >= 0 seconds")
        if float(values["event_flush_interval"]) < 0 or int(values["event_batch"]) < 1:
            raise ConfigurationError("tq_event_flush_interval must be >= 0 s and tq_event_batch >= 1")
        extra = values["prefetch_extra"]
        if isinstance(extra, bool) or not isinstance(extra, int) or extra < 0:
            raise ConfigurationError(f"tq_prefetch_extra must be an int >= 0, not {extra!r}")
        cap = values["max_message_bytes"]
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
            raise ConfigurationError(f"tq_max_message_bytes must be an int >= 0 (0: no limit), not {cap!r}")
        retries = values["worker_lost_retries"]
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ConfigurationError(f"tq_worker_lost_retries must be an int >= 0, not {retries!r}")
        if not 0 <= float(values["worker_lost_delay"]) <= float(values["worker_lost_delay_max"]):
            raise ConfigurationError("tq_worker_lost_delay must be >= 0 s and <= tq_worker_lost_delay_max")
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
