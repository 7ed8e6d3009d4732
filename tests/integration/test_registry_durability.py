"""A task's outcome is durable before its message is acked: kill -9 loses no result.

Real ``celery worker -P prefork -c 2`` processes with the production preset on the ``tq+redis://``
broker, the registry on Redis and on PostgreSQL. Workers are killed (-9) while tasks run and
records sit in their buffers; once the broker has redelivered what they held and another worker
has run it, every task must have its terminal record with its result: none lost, none stuck.
"""

from __future__ import annotations

import os
import signal
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from celery_tq.registry import Registry, store_for_url
from celery_tq.testing import WorkerProcess
from tests.app_module import app_module
from tests.processes import children
from tests.registry_support import pg_url, store_url

__all__ = ["pg_url"]

N_TASKS = 300

APP = textwrap.dedent(
    """
    import os, time
    from celery import Celery
    import celery_tq

    app = Celery("durapp")
    celery_tq.install(app, preset="production")
    app.conf.update(
        broker_url=os.environ["DUR_BROKER"],
        result_backend=os.environ["DUR_BACKEND"],
        task_retry_on_worker_lost=False,  # requeued at once, not retried after a delay
        broker_transport_options={
            "priority_steps": list(range(10)), "confirm_publish": True,
            "heartbeat_ttl": 3, "heartbeat_interval": 0.5, "recover_interval": 1,
        },
    )

    @app.task(name="dur.work", bind=True, shared=False)
    def work(self, i):
        time.sleep(0.01)
        return {"i": i, "pid": os.getpid()}

    @app.task(name="dur.slow", shared=False)
    def slow(seconds):
        time.sleep(seconds)
        return seconds
    """
)


Durable = tuple[object, Registry, dict[str, str]]  # the app, its registry, the workers' environment


@pytest.fixture(params=["redis", "postgresql"])
def durable(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[object, Registry, dict[str, str]]]:
    broker = request.getfixturevalue("redis_dbs")[0].replace("redis://", "tq+redis://")
    backend = "tq+" + store_url(request.param, request, tmp_path)
    env = {"DUR_BROKER": broker, "DUR_BACKEND": backend}
    with app_module(tmp_path, "durapp", APP, env) as (app, worker_env):
        yield app, Registry(store_for_url(backend)), worker_env


def _wait_all_done(registry: Registry, ids: list[str], timeout: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        records = {i: registry.get(i) for i in ids}
        if all(r is not None and r.state == "SUCCESS" for r in records.values()):
            return records
        if time.monotonic() > deadline:
            states: dict[str, int] = {}
            for r in records.values():
                key = "missing" if r is None else r.state
                states[key] = states.get(key, 0) + 1
            raise AssertionError(f"not every task reached SUCCESS in {timeout} s: {states}")
        time.sleep(0.2)


def _wait_successes(registry: Registry, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while registry.counts().get("SUCCESS", 0) < n:
        assert time.monotonic() < deadline, f"fewer than {n} tasks done in {timeout} s"
        time.sleep(0.05)


def test_kill_9_of_the_whole_worker_loses_no_result(durable: Durable, tmp_path: Path) -> None:
    app, registry, env = durable
    work = app.tasks["dur.work"]  # type: ignore[attr-defined]
    ids = [work.delay(i).id for i in range(N_TASKS)]
    first = WorkerProcess("durapp", concurrency=2, env=env, cwd=tmp_path).start()
    _wait_successes(registry, N_TASKS // 3)
    first.kill()  # main process and pool processes, with whatever they buffered
    second = WorkerProcess("durapp", concurrency=2, env=env, cwd=tmp_path).start()
    try:
        records = _wait_all_done(registry, ids, timeout=120)
    finally:
        second.stop()
    for i, task_id in enumerate(ids):
        record = records[task_id]
        assert record.result["i"] == i  # type: ignore[attr-defined]
        assert work.AsyncResult(task_id).get(timeout=5)["i"] == i


def test_kill_9_of_pool_processes_loses_no_result(durable: Durable, tmp_path: Path) -> None:
    app, registry, env = durable
    work = app.tasks["dur.work"]  # type: ignore[attr-defined]
    ids = [work.delay(i).id for i in range(N_TASKS)]
    worker = WorkerProcess("durapp", concurrency=2, env=env, cwd=tmp_path).start()
    try:
        assert worker.process is not None
        for fraction in (4, 2):  # two kills, each of a busy pool process
            _wait_successes(registry, N_TASKS // fraction)
            os.kill(children(worker.process.pid)[0], signal.SIGKILL)
        records = _wait_all_done(registry, ids, timeout=120)
    finally:
        worker.stop()
    assert all(records[t].result["i"] == i for i, t in enumerate(ids))  # type: ignore[attr-defined]
    assert "exited with 'signal 9 (SIGKILL)'" in worker.log  # the kills hit the pool


def test_a_run_redelivered_after_kill_9_counts_two_deliveries_and_shows_the_last_run(
    durable: Durable, tmp_path: Path
) -> None:
    app, registry, env = durable
    slow = app.tasks["dur.slow"]  # type: ignore[attr-defined]
    first = WorkerProcess("durapp", concurrency=2, env=env, cwd=tmp_path, hostname="first@tq").start()
    result = slow.delay(2.0)
    deadline = time.monotonic() + 30
    while (record := registry.get(result.id)) is None or record.state != "STARTED":
        assert time.monotonic() < deadline, f"the task did not start: {record}"
        time.sleep(0.05)
    assert (record.deliveries, record.worker) == (1, "first@tq")
    first.kill()  # mid-run: the heartbeat expires and the message is recovered
    killed_at = time.time()
    second = WorkerProcess("durapp", concurrency=2, env=env, cwd=tmp_path, hostname="second@tq").start()
    try:
        assert result.get(timeout=60) == 2.0
    finally:
        second.stop()
    record = registry.get(result.id)
    assert record is not None
    assert (record.state, record.deliveries, record.retries, record.worker) == ("SUCCESS", 2, 0, "second@tq")
    assert record.started_at is not None and record.started_at.timestamp() > killed_at
    assert record.runtime is not None and record.runtime < 10
