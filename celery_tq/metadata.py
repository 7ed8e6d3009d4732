"""Task metadata: priority, timeout and tags, validated and carried in message headers."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import Any

from celery_tq.errors import MetadataError

__all__ = [
    "CALL_METADATA",
    "HEADER_PRIORITY",
    "HEADER_TAGS",
    "HEADER_TIMEOUT",
    "Priority",
    "TaskMetadata",
    "carried",
    "stamp",
]

HEADER_PRIORITY = "tq_priority"
HEADER_TAGS = "tq_tags"
HEADER_TIMEOUT = "tq_timeout"
HEADERS = (HEADER_PRIORITY, HEADER_TAGS, HEADER_TIMEOUT)
#: The call option in which ``TqTask.apply_async`` hands the metadata it computed to the publisher.
CALL_METADATA = "tq_call_metadata"

MIN_PRIORITY = 0
MAX_PRIORITY = 9
MAX_TAG_LENGTH = 64
_TAG = re.compile(r"^[A-Za-z0-9_.:/@+-]+$")


class Priority(IntEnum):
    """How urgent a task is: 0..9, higher is more urgent; FIFO within one level."""

    BACKGROUND = 0
    LOW = 2
    NORMAL = 5
    HIGH = 7
    CRITICAL = 9


def validate_priority(value: object) -> int:
    """Return ``value`` as an int in 0..9 or raise :class:`MetadataError` (never clamps)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise MetadataError(f"priority must be an int 0..9 (celery_tq.Priority), got {value!r}")
    if not MIN_PRIORITY <= value <= MAX_PRIORITY:
        raise MetadataError(f"priority must be in 0..9 (higher is more urgent), got {value}")
    return int(value)


def validate_timeout(value: object) -> float | None:
    """Return a positive finite timeout in seconds (or None) or raise :class:`MetadataError`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MetadataError(f"timeout must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise MetadataError(f"timeout must be a positive number of seconds, got {value!r}")
    return float(value)


def validate_tags(value: object) -> frozenset[str]:
    """Return tags as a frozenset or raise :class:`MetadataError` for an empty or bad tag."""
    if value is None:
        return frozenset()
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Iterable):
        raise MetadataError(f"tags must be a set of strings, got {value!r}")
    tags = set()
    for tag in value:
        if not isinstance(tag, str) or not tag:
            raise MetadataError(f"a tag must be a non-empty string, got {tag!r}")
        if len(tag) > MAX_TAG_LENGTH:
            raise MetadataError(f"tag {tag[:20]!r}... is longer than {MAX_TAG_LENGTH} characters")
        if not _TAG.match(tag):
            raise MetadataError(
                f"tag {tag!r} may only hold letters, digits and _ . : / @ + - (no spaces or commas)"
            )
        tags.add(tag)
    return frozenset(tags)


@dataclass(frozen=True)
class TaskMetadata:
    """The effective priority, timeout (seconds, None = none) and tags of a task or a call."""

    priority: int = Priority.NORMAL
    timeout: float | None = None
    tags: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        object.__setattr__(self, "priority", validate_priority(self.priority))
        object.__setattr__(self, "timeout", validate_timeout(self.timeout))
        object.__setattr__(self, "tags", validate_tags(self.tags))

    def merged(self, priority: object = None, timeout: object = None, tags: object = None) -> TaskMetadata:
        """Per-call values: priority and timeout replace this metadata's, tags add to its tags."""
        return replace(
            self,
            priority=self.priority if priority is None else validate_priority(priority),
            timeout=self.timeout if timeout is None else validate_timeout(timeout),
            tags=self.tags | validate_tags(tags),
        )

    def merged_with_call(self, options: dict[str, Any]) -> TaskMetadata:
        """:meth:`merged` with a call's options: its ``priority``, its ``timeout`` (else
        ``tq_timeout``) and its ``tags`` (else ``tq_tags``); the last two are taken out of
        ``options``, where Celery would read ``timeout`` as its publish timeout."""
        tags = options.pop("tags", None)
        if tags is None:
            tags = options.pop("tq_tags", None)
        timeout = options.pop("timeout", None)
        if timeout is None:
            timeout = options.pop("tq_timeout", None)
        return self.merged(priority=options.get("priority"), timeout=timeout, tags=tags)

    def to_headers(self) -> dict[str, Any]:
        return {
            HEADER_PRIORITY: self.priority,
            HEADER_TIMEOUT: self.timeout,
            HEADER_TAGS: sorted(self.tags),
        }

    @classmethod
    def from_headers(cls, headers: Mapping[str, Any], default: TaskMetadata) -> TaskMetadata:
        """Read the metadata a message carries; missing keys fall back to ``default``."""
        values = carried(headers)
        return default.merged(
            priority=values.get(HEADER_PRIORITY),
            timeout=values.get(HEADER_TIMEOUT),
            tags=values.get(HEADER_TAGS),
        )

    def describe(self) -> str:
        """The form shown in Flower and logs: ``priority=9 tags=billing,vip timeout=10``."""
        parts = [f"priority={self.priority}"]
        if self.tags:
            parts.append("tags=" + ",".join(sorted(self.tags)))
        if self.timeout is not None:
            parts.append(f"timeout={self.timeout:g}")
        return " ".join(parts)


def stamp(headers: dict[str, Any], metadata: TaskMetadata) -> None:
    """Write ``metadata`` into a message's ``headers``: the one writer of the ``tq_*`` headers
    (called by the publish hook, :mod:`celery_tq.client.publish`, and for an eager run by
    ``TqTask.apply``)."""
    headers.update(metadata.to_headers())


def carried(source: Any) -> dict[str, Any]:
    """The ``tq_*`` values a message carries, as :func:`stamp` wrote them (only those present).

    ``source`` is a message's headers or a run's request: a worker's request holds the headers as
    attributes, an eager run's in ``headers``; attributes win. The one reader of the headers.
    """
    if isinstance(source, Mapping):
        return {key: source[key] for key in HEADERS if source.get(key) is not None}
    headers = getattr(source, "headers", None) or {}
    values = {key: headers[key] for key in HEADERS if headers.get(key) is not None}
    for key in HEADERS:
        value = getattr(source, key, None)
        if value is not None:
            values[key] = value
    return values
