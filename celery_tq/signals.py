"""Signal handlers that record every task in the registry (filled in by the registry work)."""

from __future__ import annotations

from celery import Celery

__all__ = ["connect"]


def connect(app: Celery) -> None:
    """Connect the registry's handlers for ``app`` (``weak=False``, one ``dispatch_uid`` each)."""
