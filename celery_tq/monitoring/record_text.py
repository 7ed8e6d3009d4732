"""Task records in words: what ``celery tq tasks`` and ``tq show`` print, for people and for pipes."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from celery_tq.registry.record import STATES

__all__ = [
    "duration",
    "error_line",
    "parse_state",
    "short_ids",
    "short_when",
    "tags_text",
    "traceback_chain",
    "when",
]

# Flower's and Celery's words for the registry's states (Flower's filter button says "Failed").
_SYNONYMS = {
    "FAILED": "FAILURE",
    "FAIL": "FAILURE",
    "SUCCEEDED": "SUCCESS",
    "SUCCESSFUL": "SUCCESS",
    "PENDING": "QUEUED",
    "RECEIVED": "QUEUED",
    "RETRYING": "RETRY",
    "RETRIED": "RETRY",
    "CANCELLED": "REVOKED",
    "CANCELED": "REVOKED",
}
_CAUSED = "\nThe above exception was the direct cause of the following exception:\n\n"


def parse_state(text: str) -> str:
    """The registry's state for ``text`` (any case; Flower's words too); ``ValueError`` if none."""
    word = text.strip().upper()
    state = _SYNONYMS.get(word, word)
    if state not in STATES:
        words = ", ".join(STATES)
        raise ValueError(f"{text!r} is not a task state; one of {words} (any case; FAILED = FAILURE)")
    return state


def error_line(error: dict[str, Any] | None) -> str:
    """One line naming the error's type once: ``IoError: I/O error: ... (path)``."""
    if not error:
        return ""
    kind, message = str(error.get("type") or ""), str(error.get("message") or "")
    line = message if message.startswith(kind) else f"{kind}: {message}" if message else kind
    return " ".join(line.split())


def when(moment: datetime | None) -> str:
    """Local time to the millisecond, with the zone: ``2026-12-01 10:02:03.214 UTC``."""
    if moment is None:
        return ""
    local = moment.astimezone()
    stamp = f"{local.strftime('%Y-%m-%d %H:%M:%S')}.{local.microsecond // 1000:03d}"
    return f"{stamp} {local.strftime('%Z')}".strip()


def short_when(moment: datetime | None) -> str:
    """``10:02:03`` today, ``11-30 10:02`` before (local time)."""
    if moment is None:
        return ""
    local = moment.astimezone()
    today = datetime.now().astimezone().date()
    return local.strftime("%H:%M:%S" if local.date() == today else "%m-%d %H:%M")


def short_ids(ids: list[str], least: int = 8) -> dict[str, str]:
    """Each id's shortest prefix (``least`` characters or more) that no other id here shares."""
    shortest: dict[str, str] = {}
    for task_id in ids:
        length = least
        while length < len(task_id) and any(o != task_id and o.startswith(task_id[:length]) for o in ids):
            length += 1
        shortest[task_id] = task_id[:length]
    return shortest


def duration(seconds: float | None) -> str:
    """``4.8 ms``, ``1.25 s``, ``2 min 5 s``."""
    if seconds is None:
        return ""
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 60:
        return f"{seconds:.2f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s"


def tags_text(tags: Iterable[str]) -> str:
    return ", ".join(sorted(tags))


def traceback_chain(error: dict[str, Any] | None) -> str:
    """The whole chain as Python prints it: the first cause first, each with its own frames."""
    levels: list[dict[str, Any]] = []
    level = error
    while isinstance(level, dict):
        levels.append(level)
        level = level.get("cause")
    parts = []
    for level in reversed(levels):
        text = str(level.get("traceback") or "").rstrip("\n")
        parts.append(text or error_line(level))
    return _CAUSED.join(parts)
