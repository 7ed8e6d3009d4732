"""How stores that keep a list's members as opaque values (Redis, SQL) order them by score.

Ties are ordered by value, as in a Redis sorted set (Celery's Redis backend keeps chord results in one).
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["by_score", "scored"]

_SEP = b"\x1f"


def scored(score: float, value: bytes) -> bytes:
    """``value`` prefixed with its score, for :func:`by_score`."""
    return repr(float(score)).encode() + _SEP + value


def by_score(entries: Iterable[bytes]) -> list[bytes]:
    """The values of :func:`scored` entries, by ascending score (``inf`` last), then by value."""
    split = [bytes(entry).partition(_SEP) for entry in entries]
    return [value for score, _, value in sorted(split, key=lambda e: (float(e[0]), e[2]))]
