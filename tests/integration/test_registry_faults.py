"""The registry under faults: an unreachable store, a result that cannot be stored, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery.exceptions import TimeoutError as CeleryTimeoutError

from celery_tq import errors
from celery_tq.registry import Registry, store_for_url
from celery_tq.testing import WorkerProcess
from tests.conftest import service_missing
from tests.private_redis import PrivateRedis
from tests.waiting import wait_for

from .conftest import APPS, Shop, tqshop

ROOT = Path(__file__).parents[2]


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        service_missing("redis-server", "not installed")
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.kill()


def test_store_outage_when_a_task_finishes_is_retried_then_reported_never_fatal(
    private_redis: PrivateRedis, redis_dbs: tuple[str, str], data_dir: str
) -> None:
    broker = redis_dbs[0]
    backend = f"tq+redis://127.0.0.1:{private_redis.port}/0"
    app = tqshop.make_app(broker, backend)
    registry = Registry(store_for_url(backend))
    env = {
        "TQSHOP_BROKER_URL": broker,
        "TQSHOP_RESULT_BACKEND": backend,
        "TQSHOP_STORE_RETRY": "5",  # 60 s by default; shortened so the give-up case runs quickly
        "TQ_DATA_DIR": data_dir,
        "PYTHONPATH": f"{APPS}:{ROOT}",
    }
    with WorkerProcess("tqshop", env=env, concurrency=1) as worker:
        # 1. down for ~2 s while the task finishes: stored once the store is back
        result = app.tasks["tqshop.sleep"].delay(1.0)
        wait_for(lambda: (r := registry.get(result.id)) and r.state == "STARTED", 20, "STARTED")
        private_redis.kill()
        wait_for(lambda: "retrying for up to 5 s" in worker.log, 20, "the write retrying")
        private_redis.start()  # empty: no persistence, the SUCCESS write recreates the record
        assert result.get(timeout=30) == 1.0

        # 2. down for longer than the retry window: an explicit error, the worker lives on
        lost = app.tasks["tqshop.sleep"].delay(0.5)
        wait_for(lambda: (r := registry.get(lost.id)) and r.state == "STARTED", 20, "STARTED")
        private_redis.kill()
        wait_for(lambda: f"could not store SUCCESS of task {lost.id}" in worker.log, 30, "the error")
        private_redis.start()
        assert app.tasks["tqshop.add"].delay(2, 3).get(timeout=30) == 5
        assert worker.process is not None and worker.process.poll() is None
    app.close()


def test_unserializable_result_fails_with_invalid_input_and_the_cli_finds_it(
    embedded_shop: Shop, data_dir: str
) -> None:
    backend = f"tq+sqlite:///{Path(data_dir) / 'registry.db'}"
    app = tqshop.make_app(embedded_shop.broker_url, backend)
    embedded_shop.start_worker(env={"TQSHOP_RESULT_BACKEND": backend})
    result = app.tasks["tqshop.unserializable"].delay()
    with pytest.raises(errors.InvalidInput) as caught:
        result.get(timeout=30)
    assert "cannot be serialized" in str(caught.value)
    failed = app.tasks["tqshop.slow_fail"].delay(0.0)
    with pytest.raises(errors.InvalidInput):
        failed.get(timeout=30)
    assert app.tasks["tqshop.add"].delay(1, 1).get(timeout=30) == 2

    env = {
        **os.environ,
        "TQSHOP_BROKER_URL": embedded_shop.broker_url,
        "TQSHOP_RESULT_BACKEND": backend,
        "PYTHONPATH": f"{APPS}:{ROOT}",
        "COLUMNS": "200",
    }

    def tq(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "celery", "-A", "tqshop", "tq", *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)

    listed = tq("tasks", "--tag", "billing", "--state", "FAILURE", "--since", "1h", "--json")
    assert listed.returncode == 0, listed.stderr
    records = json.loads(listed.stdout)
    assert [r["id"] for r in records] == [failed.id]
    assert records[0]["error"]["type"] == "InvalidInput" and records[0]["tags"] == ["billing"]

    shown = tq("show", result.id, "--json")
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    assert (record["state"], record["error"]["type"]) == ("FAILURE", "InvalidInput")
    assert "tqshop.unserializable" in tq("show", result.id).stdout  # the readable table
    assert tq("show", "never-sent").returncode == 1
    assert "tqshop.add" in tq("tasks").stdout

    purged = tq("purge", "--older-than", "0s")
    assert purged.returncode == 0 and "purged 3 task record(s)" in purged.stdout, purged.stdout
    assert json.loads(tq("tasks", "--json").stdout) == []
    app.close()


def test_get_with_a_timeout_honours_it_while_the_store_is_down(
    private_redis: PrivateRedis, redis_dbs: tuple[str, str]
) -> None:
    backend = f"tq+redis://127.0.0.1:{private_redis.port}/0"
    app = tqshop.make_app(redis_dbs[0], backend)  # the production preset's result-store retries
    queued = app.tasks["tqshop.add"].delay(1, 2)  # no worker: it stays queued
    assert Registry(store_for_url(backend)).get(queued.id) is not None  # its QUEUED is written
    private_redis.kill()
    started = time.monotonic()
    with pytest.raises(CeleryTimeoutError) as caught:
        queued.get(timeout=3)
    assert time.monotonic() - started < 8  # Celery's own retries of the store took ~25 s
    assert "unreachable" in str(caught.value)
    app.close()


def test_a_started_state_stored_outside_a_worker_is_readable_at_once(redis_dbs: tuple[str, str]) -> None:
    backend = "tq+" + redis_dbs[1]
    app = tqshop.make_app(redis_dbs[0], backend)
    app.backend.store_result("set-by-hand", None, "STARTED")  # as Celery's own tests do
    assert app.AsyncResult("set-by-hand").state == "STARTED"
    app.close()
