"""pytest fixtures for testing your own tasks (registered as the ``celery_tq`` pytest plugin).

They live beside pytest-celery's classic fixtures (``celery_config``, ``celery_app``,
``celery_worker``) and never replace them; every name here starts with ``tq_``:

- ``tq_app``: a new Celery app with celery-tq installed, testing preset (in-memory broker and
  results: one process), plus ``tq_config``; ``tq_system`` is what ``install`` returned for it
  (``tq_system.task``, ``.start()``, ``.registry``).
- ``tq_data_dir``: an empty directory of the test's own, also set as ``TQ_DATA_DIR``.
- ``tq_worker``: a real ``celery -A <tq_worker_app> worker`` process on the embedded broker, its
  broker, results and task records in ``tq_data_dir``; your app in the test process is pointed at
  the same files for the test, and put back afterwards. Name your app module with the
  ``tq_worker_app`` ini option or fixture; ``tq_worker_options`` take WorkerProcess's options.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from celery_tq import celery_seam
from celery_tq.system import TaskQueueSystem, install, system_for
from celery_tq.testing import WorkerProcess

__all__ = [
    "tq_app",
    "tq_config",
    "tq_data_dir",
    "tq_system",
    "tq_worker",
    "tq_worker_app",
    "tq_worker_options",
]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("tq_worker_app", "the app tq_worker runs: what `celery -A` takes (module or module:app)")


@pytest.fixture(scope="session")
def tq_config() -> dict[str, Any]:
    """Settings ``tq_app`` gets on top of the testing preset; override to add your own."""
    return {}


@pytest.fixture
def tq_app(tq_config: dict[str, Any]) -> Iterator[Celery]:
    """A new app with celery-tq's testing preset (``memory://`` broker, ``tq+memory://`` results)."""
    app = Celery("tq-test", set_as_current=False)
    install(app, preset="testing")
    app.conf.update(tq_config)
    yield app
    system_for(app).shutdown()
    app.close()


@pytest.fixture
def tq_system(tq_app: Celery) -> TaskQueueSystem:
    """``celery_tq.install(tq_app)``: decorate with ``tq_system.task``, run with ``.start()``."""
    return system_for(tq_app)


@pytest.fixture
def tq_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty directory of this test's own, set as ``TQ_DATA_DIR``."""
    path = tmp_path / "tq-data"
    path.mkdir()
    monkeypatch.setenv("TQ_DATA_DIR", str(path))
    return path


@pytest.fixture(scope="session")
def tq_worker_app(pytestconfig: pytest.Config) -> str:
    """The app ``tq_worker`` runs, as ``celery -A`` takes it; default: the ``tq_worker_app`` ini option."""
    name = str(pytestconfig.getini("tq_worker_app") or "")
    if not name:
        raise pytest.UsageError(
            "tq_worker needs your app: set `tq_worker_app = shop` in the [pytest] ini section, "
            "or define a `tq_worker_app` fixture returning it"
        )
    return name


@pytest.fixture(scope="session")
def tq_worker_options() -> dict[str, Any]:
    """Options of :class:`celery_tq.testing.WorkerProcess` (pool, concurrency, queues, env...)."""
    return {"pool": "prefork", "concurrency": 1}


@pytest.fixture
def tq_worker(
    tq_worker_app: str,
    tq_worker_options: dict[str, Any],
    tq_data_dir: Path,
    pytestconfig: pytest.Config,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[WorkerProcess]:
    """A real worker process on the embedded broker in ``tq_data_dir``; stopped after the test."""
    broker = f"tq+sqlite:///{tq_data_dir / 'broker.db'}"
    results = f"tq+sqlite:///{tq_data_dir / 'results.db'}"
    root = str(pytestconfig.rootpath)
    options = dict(tq_worker_options)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    options["env"] = {
        "PYTHONPATH": path,
        "TQ_DATA_DIR": str(tq_data_dir),
        "CELERY_BROKER_URL": broker,  # Celery reads these before any setting of the app's own
        "CELERY_RESULT_BACKEND": results,
        **options.get("env", {}),
    }
    options.setdefault("cwd", root)
    if root not in sys.path:  # where the worker finds the app, the test process does too
        monkeypatch.syspath_prepend(root)
    app = _load_app(tq_worker_app)
    saved = (app.conf.broker_url, app.conf.result_backend)
    _point_at(app, broker, results)
    try:
        with WorkerProcess(tq_worker_app, **options) as worker:
            yield worker
    finally:
        _point_at(app, *saved)


def _load_app(name: str) -> Celery:
    """The app ``celery -A name`` would find: ``module:attr``, or the module's ``app``/``celery``."""
    module_name, _, attr = name.partition(":")
    module = importlib.import_module(module_name)
    for candidate in (attr,) if attr else ("app", "celery"):
        app = getattr(module, candidate, None)
        if isinstance(app, Celery):
            return app
    raise pytest.UsageError(f"tq_worker_app={name!r}: no Celery app found in {module_name}")


def _point_at(app: Celery, broker: str, results: str) -> None:
    """Point ``app`` at another broker and result backend, dropping its cached connections."""
    app.conf.update(broker_url=broker, result_backend=results)
    celery_seam.drop_connection_caches(app)
