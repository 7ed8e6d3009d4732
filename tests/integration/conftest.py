"""Integration fixtures: the tqshop app on each real broker, with real worker processes."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from celery_tq.testing import WorkerProcess
from tests.integration.redis_runs import Run
from tests.registry_support import pg_url

__all__ = ["pg_url"]

APPS = Path(__file__).parent / "apps"
sys.path.insert(0, str(APPS))

import tqshop  # noqa: E402


@dataclass
class Shop:
    """The test process's side of one broker: the app plus a way to start workers on it."""

    kind: str
    broker_url: str
    result_backend: str
    app: Celery
    start_worker: Callable[..., WorkerProcess]


BROKERS = ["embedded", "redis", "rabbitmq"]


def _urls(kind: str, request: pytest.FixtureRequest, tmp: Path) -> tuple[str, str]:
    sqlite_results = f"db+sqlite:///{tmp / 'results.db'}"
    if kind == "embedded":  # the development preset's setup: results and records in the tq backend
        return f"tq+sqlite:///{tmp / 'broker.db'}", f"tq+sqlite:///{tmp / 'results.db'}"
    if kind in {"redis", "tq-redis"}:  # tq-redis: results and records in the tq backend on Redis
        broker, results = request.getfixturevalue("redis_dbs")
        return broker, ("tq+" + results if kind == "tq-redis" else results)
    if kind == "tq+redis":  # the production setup on Redis: the plugin's transport and store
        broker, results = request.getfixturevalue("redis_dbs")
        return f"tq+{broker}", f"tq+{results}"
    if kind == "rabbitmq+tq":  # production's RabbitMQ setup: the tq backend on PostgreSQL
        return request.getfixturevalue("rabbitmq_vhost"), "tq+" + str(request.getfixturevalue("pg_url"))
    return request.getfixturevalue("rabbitmq_vhost"), sqlite_results


@pytest.fixture(params=BROKERS)
def shop(request: pytest.FixtureRequest, data_dir: str) -> Iterator[Shop]:
    yield from _shop(request.param, request, Path(data_dir))


@pytest.fixture(params=["embedded", "redis"])
def embedded_or_redis_shop(request: pytest.FixtureRequest, data_dir: str) -> Iterator[Shop]:
    """Broker-independent behaviour (errors reaching the caller, bad input, timeouts): checked on
    the embedded broker and on Redis."""
    yield from _shop(request.param, request, Path(data_dir))


@pytest.fixture
def redis_shop(request: pytest.FixtureRequest, data_dir: str) -> Iterator[Shop]:
    yield from _shop("redis", request, Path(data_dir))


@pytest.fixture(params=["tq+redis", "rabbitmq+tq"])
def production_shop(request: pytest.FixtureRequest, data_dir: str) -> Iterator[Shop]:
    """The two setups of the production preset: tq+redis:// with a tq+redis:// store, and
    RabbitMQ with a tq+postgresql:// store."""
    yield from _shop(request.param, request, Path(data_dir))


@pytest.fixture
def rabbitmq_production_shop(request: pytest.FixtureRequest, data_dir: str) -> Iterator[Shop]:
    """The production preset on RabbitMQ, with a tq+postgresql:// store."""
    yield from _shop("rabbitmq+tq", request, Path(data_dir))


@pytest.fixture
def rabbitmq_shop(request: pytest.FixtureRequest, data_dir: str) -> Iterator[Shop]:
    yield from _shop("rabbitmq", request, Path(data_dir))


@pytest.fixture
def embedded_shop(request: pytest.FixtureRequest, data_dir: str) -> Iterator[Shop]:
    yield from _shop("embedded", request, Path(data_dir))


def _shop(kind: str, request: pytest.FixtureRequest, tmp: Path) -> Iterator[Shop]:
    broker_url, result_backend = _urls(kind, request, tmp)
    app = tqshop.make_app(broker_url, result_backend)
    if kind.startswith("rabbitmq"):
        app.control.purge()  # the session's vhost is shared by the tests of this file
    workers: list[WorkerProcess] = []

    def start_worker(**options: Any) -> WorkerProcess:
        options.setdefault("concurrency", 2)
        env = {
            "TQSHOP_BROKER_URL": broker_url,
            "TQSHOP_RESULT_BACKEND": result_backend,
            "TQ_DATA_DIR": str(tmp),
            "PYTHONPATH": f"{APPS}:{Path(__file__).parents[2]}",
        }
        worker = WorkerProcess("tqshop", env={**env, **options.pop("env", {})}, **options)
        workers.append(worker)
        return worker.start()

    yield Shop(kind, broker_url, result_backend, app, start_worker)
    for worker in workers:
        worker.stop()
    app.close()


@pytest.fixture
def run_factory(tmp_path: Path) -> Iterator[Callable[..., Run]]:
    """Runs of the recording app of :mod:`tests.integration.redis_runs`, closed after the test."""
    runs: list[Run] = []

    def make(broker: str, **kw: Any) -> Run:
        run = Run(tmp_path, broker, **kw)
        runs.append(run)
        return run

    yield make
    for run in runs:
        run.close()
