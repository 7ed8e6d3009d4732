"""pytest plugin for Celery's integration suite: every test app goes through ``celery_tq.install``.

Loaded by ``scripts/celery_suite.py`` (``-p celery_suite_plugin``) for the ``installed``
configuration. Celery's fixtures build the apps; this plugin makes them what a user of celery-tq
has: ``Celery(..., task_cls=TqTask)`` and ``celery_tq.install(app, preset="production")``, the
suite's broker and backend URLs being the user's own settings.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

import celery_tq

APPS = {"celery_session_app", "celery_app"}


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef: Any, request: Any) -> Generator[None, Any, None]:
    outcome = yield
    if fixturedef.argname == "celery_parameters":
        outcome.get_result().setdefault("task_cls", "celery_tq.task:TqTask")
    elif fixturedef.argname in APPS:
        celery_tq.install(outcome.get_result(), preset="production")
