"""Processes of a worker under test, as Linux lists them."""

from __future__ import annotations

from pathlib import Path

__all__ = ["children"]


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (a prefork worker's pool processes), from ``/proc``."""
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
