"""What a message may hold, checked at publish before anything is sent.

- Ids (task, parent, root, group) of at most 155 characters, task names and queues of at most
  255: the registry's SQL columns; no NUL character (PostgreSQL text cannot hold one).
- A body of at most ``tq_max_message_bytes`` (default 16 MiB) once serialized. Most messages are
  small, so the size is bounded first by one walk over the arguments (strings and bytes
  counted by length, numbers by digits); only a body whose bounds straddle the cap, or one too
  big to walk quickly, is serialized to be measured.

Every refusal is an :class:`~celery_tq.errors.InvalidInput` naming the task; nothing was sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kombu.serialization import dumps

from celery_tq.errors import InvalidInput

__all__ = ["MAX_ID", "MAX_NAME", "check_message", "json_bounds"]

MAX_ID = 155
MAX_NAME = 255
_ID_HEADERS = ("id", "parent_id", "root_id", "group")
_WALK_LIMIT = 20_000  # values walked before measuring by serializing instead


def check_message(
    name: str, headers: Mapping[str, Any], body: Any, queue: Any, serializer: str, max_bytes: int
) -> None:
    """Raise ``InvalidInput`` if a store cannot hold this message's ids/name/queue, or it is too big."""
    _check_text("task name", name, MAX_NAME, name)
    for key in _ID_HEADERS:
        value = headers.get(key)
        if value is not None:
            _check_text(f"{key} header", value, MAX_ID, name)
    queue_name = getattr(queue, "name", queue)
    if queue_name is not None:
        _check_text("queue", queue_name, MAX_NAME, name)
    if max_bytes > 0:
        _check_size(name, body, serializer, max_bytes)


def _check_text(what: str, value: Any, limit: int, task: str) -> None:
    if not isinstance(value, str):
        raise InvalidInput(
            f"{what} of {task[:80]} must be a string, not {type(value).__name__}; nothing was sent"
        )
    if len(value) > limit:
        raise InvalidInput(
            f"{what} of {task[:80]} is {len(value)} characters (at most {limit}): {value[:40]!r}...; "
            "nothing was sent"
        )
    if "\x00" in value:
        raise InvalidInput(f"{what} of {task[:80]} holds a NUL character; nothing was sent")


def _check_size(task: str, body: Any, serializer: str, max_bytes: int) -> None:
    low, high, walked = json_bounds(body)
    if walked and high <= max_bytes:
        return
    measured = not walked or low <= max_bytes
    if measured:
        try:
            low = len(dumps(body, serializer=serializer)[2])
        except Exception:  # not serializable: Celery's own encode error says why, at publish
            return
        if low <= max_bytes:
            return
    raise InvalidInput(
        f"the message of {task[:80]} is {'' if measured else 'at least '}{low:,} bytes; the limit is "
        f"{max_bytes:,} (tq_max_message_bytes). Pass a reference (a path, a URL, a key) instead of "
        "the data; nothing was sent"
    )


def json_bounds(body: Any) -> tuple[int, int, bool]:
    """(lower, upper) bounds of the JSON size of ``body``, and whether the walk finished."""
    low = high = 0
    stack = [body]
    walked = 0
    while stack:
        value = stack.pop()
        walked += 1
        if walked > _WALK_LIMIT:
            return low, high, False
        if isinstance(value, str):
            low += len(value) + 2
            high += 12 * len(value) + 2  # \ud83d\ude00: 12 bytes for one character
        elif isinstance(value, bytes | bytearray):
            low += len(value)
            high += 6 * len(value) + 64
        elif isinstance(value, bool) or value is None:
            low += 4
            high += 5
        elif isinstance(value, int):
            bits = value.bit_length()  # digits = bits x 0.30103 (+1), no str() of a huge int
            low += bits * 3 // 10 + 1
            high += bits * 31 // 100 + 3
        elif isinstance(value, float):
            low += 1
            high += 24
        elif isinstance(value, Mapping):  # {"k": v, ...}; keys that are not strings get quoted
            low += 1 + 2 * len(value)
            high += 2 + 6 * len(value)
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list | tuple | set | frozenset):
            low += 1 + len(value)
            high += 2 + 2 * len(value)
            stack.extend(value)
        else:  # datetimes, UUIDs, decimals, objects a serializer may or may not take
            return low, high, False
    return low, high, True
