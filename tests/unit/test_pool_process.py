"""What a prefork pool process runs per task: only the handlers that record something there,
and a ``TqTask`` run that still goes through every ``__call__`` of the task's class."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from celery import Celery, Task

import celery_tq
from celery_tq import TqTask

# A fresh process (worker_process_init changes process-wide state): which celery-tq registry
# handlers are still connected to each task signal once the pool process has started.
POOL_PROCESS = """
import json, sys
from celery import Celery, signals
import celery_tq

app = Celery("pool")
app.conf.update(broker_url="memory://", **json.loads(sys.argv[1]))
celery_tq.install(app, preset="testing")
signals.worker_process_init.send(sender=None)
names = ("after_task_publish", "task_prerun", "task_success", "task_failure", "task_retry",
         "task_postrun", "worker_process_shutdown")
print(json.dumps({
    name: sum(str(key[0]).startswith("tq-registry") for key, _ in getattr(signals, name).receivers)
    for name in names
}))
"""


def handlers_in_pool_process(**conf: object) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", POOL_PROCESS, json.dumps(conf)], check=True, capture_output=True, text=True
    )
    return dict(json.loads(out.stdout))


def test_a_pool_process_without_a_registry_runs_no_registry_handler_per_task() -> None:
    handlers = handlers_in_pool_process(result_backend=None)
    assert handlers.pop("worker_process_shutdown") == 1
    assert handlers == dict.fromkeys(handlers, 0)


def test_with_the_tq_backend_only_what_the_backend_does_not_write_stays(tmp_path: Path) -> None:
    handlers = handlers_in_pool_process(result_backend=f"tq+sqlite:///{tmp_path / 'r.db'}")
    # QUEUED of what a task publishes, STARTED when not tracked, the flush after each run
    assert handlers["after_task_publish"] == handlers["task_prerun"] == handlers["task_postrun"] == 1
    # the backend's own write is the terminal record; the outcome handlers stay connected for the
    # runs whose results are ignored (Celery stores nothing for them) and return at once otherwise
    assert handlers["task_success"] == handlers["task_failure"] == handlers["task_retry"] == 1


def test_with_another_backend_every_registry_handler_stays(tmp_path: Path) -> None:
    handlers = handlers_in_pool_process(
        result_backend="cache+memory://", tq_registry_url=f"sqlite:///{tmp_path / 'r.db'}"
    )
    assert handlers == dict.fromkeys(handlers, 1)


@pytest.fixture
def app() -> Celery:
    app = Celery("t")
    celery_tq.install(app, preset="testing")
    return app


def test_a_call_of_a_base_class_after_tqtask_in_the_mro_still_wraps_each_run(app: Celery) -> None:
    wrapped: list[str] = []

    class Audited(Task):  # type: ignore[type-arg]
        def __call__(self, *args: object, **kwargs: object) -> object:
            wrapped.append(str(self.request.id))
            return super().__call__(*args, **kwargs)

    class AuditedTask(TqTask, Audited):
        pass

    @app.task(base=AuditedTask, name="t.add")
    def add(x: int, y: int) -> int:
        return x + y

    result = add.apply((2, 3))
    assert result.get() == 5
    assert wrapped == [result.id]
