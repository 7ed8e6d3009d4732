"""A state stored by a direct call is durable when the call returns, as on Celery's backends.

A client's ``backend.store_result``/``mark_as_started``/``update_state`` and a task's
``update_state`` write their record before returning; only the ``STARTED`` Celery's tracer
stores as a run begins waits to travel with the run's outcome. Each writer below ends with
``os._exit`` right after its calls (no flush at exit, the background writer dies with it), so a
state that was only buffered is lost; another process then reads every state back. Plain Celery
apps with the ``tq`` backend on Redis and on PostgreSQL; the task runs in a real
``celery worker -P solo``, which the task's ``os._exit`` ends.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from celery_tq.testing import WorkerProcess
from tests.registry_support import pg_url, store_url

__all__ = ["pg_url"]

ROOT = Path(__file__).parents[2]

APP = textwrap.dedent(
    """
    import os
    from celery import Celery

    app = Celery("durcalls", set_as_current=False)
    app.conf.update(
        broker_url=os.environ["DC_BROKER"],
        result_backend=os.environ["DC_BACKEND"],
        result_extended=True,
        task_track_started=True,
    )

    @app.task(name="dc.report_and_die", bind=True, shared=False)
    def report_and_die(self, state):
        self.update_state(state=state, meta={"step": 1})
        os._exit(0)  # the whole (solo) worker: nothing it buffered is written
    """
)

CLIENT = textwrap.dedent(
    """
    import os, sys
    from durcalls import app

    ids = sys.argv[1:]
    backend = app.backend
    backend.store_result(ids[0], {"hostname": "other@host"}, "STARTED")
    backend.store_result(ids[1], {"done": 1}, "PROGRESS")
    backend.mark_as_started(ids[2], hostname="other@host")
    app.tasks["dc.report_and_die"].update_state(task_id=ids[3], state="STARTED", meta={"step": 1})
    os._exit(0)
    """
)


@pytest.fixture(params=["redis", "postgresql"])
def calls(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Celery, dict[str, str]]]:
    broker = request.getfixturevalue("redis_dbs")[0]
    backend = "tq+" + store_url(request.param, request, tmp_path)
    (tmp_path / "durcalls.py").write_text(APP)
    env = {**os.environ, "DC_BROKER": broker, "DC_BACKEND": backend, "PYTHONPATH": f"{tmp_path}:{ROOT}"}
    reader = Celery("reader", set_as_current=False)
    reader.conf.update(broker_url=broker, result_backend=backend)
    yield reader, env
    reader.close()


def test_a_clients_store_calls_are_readable_by_another_process_once_they_return(
    calls: tuple[Celery, dict[str, str]], tmp_path: Path
) -> None:
    reader, env = calls
    ids = [str(uuid.uuid4()) for _ in range(4)]
    command = [sys.executable, "-c", CLIENT, *ids]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    read = [reader.AsyncResult(i) for i in ids]
    assert [r.state for r in read] == ["STARTED", "PROGRESS", "STARTED", "STARTED"]
    assert [r.info for r in read] == [
        {"hostname": "other@host"},
        {"done": 1},
        {"hostname": "other@host"},
        {"step": 1},
    ]


@pytest.mark.parametrize("state", ["STARTED", "PROGRESS"])
def test_update_state_in_a_task_is_readable_by_another_process_once_it_returns(
    calls: tuple[Celery, dict[str, str]], tmp_path: Path, state: str
) -> None:
    reader, env = calls
    worker = WorkerProcess("durcalls", pool="solo", env=env, cwd=tmp_path).start()
    try:
        result = reader.send_task("dc.report_and_die", (state,))
        assert worker.process is not None
        assert worker.process.wait(timeout=60) == 0, worker.log  # the task ended the worker
    finally:
        worker.stop()
    assert (result.state, result.info) == (state, {"step": 1})
