"""celery-tq's pytest fixtures, used as a user's test suite would use them (no import: the
``celery_tq`` pytest plugin is registered by the package's ``pytest11`` entry point)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from celery_tq import TaskQueueSystem
from celery_tq.testing import WorkerProcess


@pytest.fixture(scope="session")
def tq_worker_app() -> str:
    return "examples.shop"  # the demo's app: what a user names in `celery -A`


def test_tq_system_runs_tasks_in_process_with_the_testing_preset(tq_system: TaskQueueSystem) -> None:
    @tq_system.task(priority=7, tags={"billing"})
    def double(x: int) -> int:
        return x * 2

    assert tq_system.app.conf.broker_url == "memory://"
    tq_system.start()
    task_id = tq_system.submit(double, 21)
    assert tq_system.wait_for_result(task_id, timeout=10) == 42
    record = tq_system.registry.get(task_id)
    assert record is not None and record.state == "SUCCESS" and record.tags == {"billing"}


def test_tq_worker_runs_the_users_tasks_in_a_real_worker_process(
    tq_worker: WorkerProcess, tq_data_dir: Path
) -> None:
    from examples import shop

    result = shop.charge.apply_async((5, 9.5), tags={"vip"})
    assert result.get(timeout=30) == {"order_id": 5, "charged": 9.5}
    assert tq_worker.pid != os.getpid()
    assert (tq_data_dir / "results.db").exists()
    record = shop.tq.registry.get(result.id)
    assert record is not None and record.tags == {"billing", "vip"} and record.worker


@pytest.mark.parametrize("run", [1, 2])
def test_each_test_gets_a_data_dir_of_its_own(tq_worker: WorkerProcess, run: int) -> None:
    from examples import shop

    assert shop.send_receipt.delay(run).get(timeout=30) == f"receipt for order {run} sent"
    assert shop.tq.registry.counts() == {"SUCCESS": 1}  # nothing from the other run


@pytest.fixture(scope="session")
def celery_config() -> dict[str, Any]:
    return {"broker_url": "memory://", "result_backend": "cache+memory://"}


def test_tq_fixtures_work_beside_pytest_celerys_classic_fixtures(
    celery_config: dict[str, Any], celery_app: Celery, tq_system: TaskQueueSystem
) -> None:
    # pytest-celery >= 1.0 gives `celery_worker` to its Docker set-up; its classic in-thread worker
    # is celery.contrib.testing's start_worker, which the classic fixture wrapped.
    from celery.contrib.testing.worker import start_worker

    @celery_app.task
    def add(x: int, y: int) -> int:
        return x + y

    @tq_system.task(priority=9)
    def urgent() -> str:
        return "done"

    assert celery_app.conf.result_backend == celery_config["result_backend"]
    with start_worker(celery_app, perform_ping_check=False):
        assert add.delay(2, 3).get(timeout=10) == 5
    tq_system.start()
    assert tq_system.wait_for_result(tq_system.submit(urgent), timeout=10) == "done"
    assert celery_app is not tq_system.app
