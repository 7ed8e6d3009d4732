"""pytest plugin for Celery's integration suite, loaded by ``scripts/celery_suite.py``.

``TQ_SUITE_PLUGIN=install``: Celery's fixtures build the apps; this plugin makes them what a user
of celery-tq has: ``Celery(..., task_cls=TqTask)`` and ``celery_tq.install(app,
preset="production")``, the suite's broker and backend URLs being the user's own settings.
``TQ_SUITE_PLUGIN=transport``: plain Celery apps on the ``tq+redis://`` transport, registered
with kombu as a user without ``install`` does.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest

import celery_tq
from celery_tq.transport import register_transports

APPS = {"celery_session_app", "celery_app"}
MODE = os.environ.get("TQ_SUITE_PLUGIN", "")


def pytest_configure(config: Any) -> None:
    if MODE == "transport":
        register_transports()


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef: Any, request: Any) -> Generator[None, Any, None]:
    outcome = yield
    if MODE != "install":
        return
    if fixturedef.argname == "celery_parameters":
        outcome.get_result().setdefault("task_cls", "celery_tq.task:TqTask")
    elif fixturedef.argname in APPS:
        celery_tq.install(outcome.get_result(), preset="production")
