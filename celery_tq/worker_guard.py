"""What a worker refuses to start with: a worker bootstep that raises ``ConfigurationError``.

Celery logs and swallows errors raised in ``on_after_configure``, where celery-tq reads the
configuration, so the refusals run again here, while the worker is being built.
"""

from __future__ import annotations

from typing import Any

from celery import bootsteps

from celery_tq.settings import refuse_pickle

__all__ = ["RefuseUnsafeConfig"]


class RefuseUnsafeConfig(bootsteps.Step):
    """Worker step: the worker does not start on a configuration celery-tq refuses."""

    label = "tq-refuse-unsafe-config"

    def __init__(self, w: Any, **kwargs: Any) -> None:
        super().__init__(w, **kwargs)
        refuse_pickle(w.app.conf)
