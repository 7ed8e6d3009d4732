"""Run inside a clean virtualenv that has celery-tq with one extra: one task end to end on that
extra's broker or store, with only that extra installed (``python extra_probe.py redis``).

Also the app module of the worker it starts (``celery -A extra_probe worker``). Imports only
what celery-tq itself installs: the test suite's helpers are not in that virtualenv.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

from celery import Celery

import celery_tq
from celery_tq.testing import WorkerProcess

app = Celery("extra_probe")
tq = celery_tq.install(app, preset="development")
app.conf.update(broker_url=os.environ["PROBE_BROKER"], result_backend=os.environ["PROBE_BACKEND"])


@tq.task(name="extra_probe.add", priority=9, tags={"probe"})
def add(x: int, y: int) -> int:
    return x + y


def run_task() -> str:
    result = add.delay(2, 3)
    assert result.get(timeout=60) == 5, result
    record = tq.registry.get(result.id)
    assert record is not None and record.state == "SUCCESS" and record.tags == {"probe"}, record
    return str(result.id)


def with_flower(port: int) -> None:
    flower = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "extra_probe",
            "flower",
            f"--port={port}",
            "--address=127.0.0.1",
        ],
        env={**os.environ, "FLOWER_UNAUTHENTICATED_API": "1"},
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthcheck", timeout=2).close()
                break
            except OSError:
                assert flower.poll() is None and time.monotonic() < deadline, "Flower did not start"
                time.sleep(0.2)
        task_id = run_task()
        while True:  # Flower saw the task through the worker's events
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/tasks", timeout=5) as answer:
                if task_id in json.load(answer):
                    return
            assert time.monotonic() < deadline, "Flower never saw the task"
            time.sleep(0.2)
    finally:
        flower.terminate()
        flower.wait(20)


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    env = {"PYTHONPATH": here}
    with WorkerProcess("extra_probe", pool="solo", cwd=here, env=env):
        if sys.argv[1] == "flower":
            with_flower(int(sys.argv[2]))
        else:
            run_task()
    print("probe ok")
