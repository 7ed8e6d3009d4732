"""`celery tq lost`: tasks recorded QUEUED whose message a broker dropped are found, re-sent or
marked, never silently lost; tasks still queued or held by a worker are left alone.

The broker is a private redis-server without persistence, restarted (it comes back empty) while
tasks wait with no worker; the registry lives on the shared Redis, so the records survive.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from celery_tq import errors
from celery_tq.system import system_for
from celery_tq.testing import WorkerProcess
from tests.private_redis import PrivateRedis
from tests.waiting import wait_for

from .conftest import APPS

ROOT = Path(__file__).parents[2]
BIG = "x" * 2000  # more than the 1 KiB of JSON a record keeps of a call


class Setup:
    """The tqshop app on one broker, its workers and ``celery -A tqshop tq ...`` runs."""

    def __init__(self, broker_url: str, result_backend: str, data_dir: str) -> None:
        import tqshop

        self.env = {
            "TQSHOP_BROKER_URL": broker_url,
            "TQSHOP_RESULT_BACKEND": result_backend,
            "TQ_DATA_DIR": data_dir,
            "PYTHONPATH": f"{APPS}:{ROOT}",
        }
        self.data_dir = Path(data_dir)
        self.app: Celery = tqshop.make_app(broker_url, result_backend)
        self.workers: list[WorkerProcess] = []

    def tq(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "celery", "-A", "tqshop", "tq", *args],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=120,
        )

    def lost_ids(self, *args: str) -> dict[str, dict[str, Any]]:
        done = self.tq("lost", "--older-than", "0s", "--json", *args)
        assert done.returncode in (0, 1), done.stderr
        return {entry["id"]: entry for entry in json.loads(done.stdout)}

    def busy(self, label: str, **options: Any) -> str:
        return str(self.app.tasks["tqshop.busy"].apply_async((label, 0), **options).id)

    def state(self, task_id: str) -> str | None:
        record = system_for(self.app).registry.get(task_id)  # flushes this process's QUEUED writes
        return None if record is None else record.state

    def runs(self) -> list[str]:
        log = self.data_dir / "runs.log"
        return [line.split()[0] for line in log.read_text().splitlines()] if log.exists() else []

    def start_worker(self) -> WorkerProcess:
        worker = WorkerProcess("tqshop", concurrency=2, env=self.env)
        self.workers.append(worker)
        return worker.start()

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.app.close()


@pytest.fixture(params=["redis", "tq+redis"])
def on_redis(
    request: pytest.FixtureRequest, tmp_path: Path, data_dir: str
) -> Iterator[tuple[Setup, PrivateRedis]]:
    server = PrivateRedis(tmp_path)  # no AOF, no RDB: a restart empties it
    server.start()
    _, results = request.getfixturevalue("redis_dbs")
    broker = f"{server.url}/0" if request.param == "redis" else f"tq+{server.url}/0"
    setup = Setup(broker, "tq+" + results, data_dir)
    yield setup, server
    setup.close()
    server.kill()


def test_tasks_dropped_by_a_restarted_redis_are_listed_resent_and_marked(
    on_redis: tuple[Setup, PrivateRedis],
) -> None:
    setup, server = on_redis
    echo = setup.app.tasks["tqshop.echo_meta"]
    small = [setup.busy("a"), setup.busy("b", priority=9, tags={"vip"})]
    meta = str(echo.apply_async(("v",), priority=2, tags={"vip"}).id)
    big = setup.busy(BIG)
    add = setup.app.tasks["tqshop.add"]
    chained = (add.s(1, 2) | add.s(10)).apply_async()  # the first task's message carries the rest
    first = str(chained.parent.id)
    assert [setup.state(i) for i in (*small, meta, big, first)] == ["QUEUED"] * 5
    assert setup.lost_ids() == {}  # every message is still queued

    server.kill()  # no persistence: the restarted server holds nothing
    server.start()
    waiting = setup.busy("d")
    assert setup.state(waiting) == "QUEUED"

    listed = setup.lost_ids()
    assert set(listed) == {*small, meta, big, first}  # not the task still queued
    assert [listed[i]["resendable"] for i in (*small, meta, big, first)] == [True, True, True, False, True]
    assert listed[small[1]]["queue"] == "tq.default" and listed[small[1]]["priority"] == 9

    resent = setup.tq("lost", "--older-than", "0s", "--resend")
    assert resent.returncode == 1  # one task could not be re-sent
    assert f"{big} tqshop.busy: cannot re-send: arguments not kept" in resent.stdout
    assert set(setup.lost_ids()) == {big}  # the re-sent ones are queued again

    setup.start_worker()
    assert echo.AsyncResult(meta).get(timeout=60) == {
        "value": "v",
        "priority": 2,
        "tags": ["billing", "vip"],
        "timeout": 30.0,
        "broker_priority": 7,  # Redis: 9 - priority
        "queue": "tq.default",
    }
    assert chained.get(timeout=60) == 13  # the chain goes on after the re-sent first task
    wait_for(
        lambda: all(setup.state(i) == "SUCCESS" for i in (*small, waiting)), 30, "every task to end SUCCESS"
    )
    assert sorted(setup.runs()) == ["a", "b", "d"]  # each ran once; the big one never
    record = system_for(setup.app).registry.get(small[1])
    assert record is not None and (record.priority, record.tags, record.deliveries) == (9, {"vip"}, 1)

    marked = setup.tq("lost", "--older-than", "0s", "--mark")
    assert marked.returncode == 0, marked.stderr
    assert f"{big} tqshop.busy: marked FAILURE: lost in the broker" in marked.stdout
    with pytest.raises(errors.ResourceUnavailable, match="lost in the broker"):
        setup.app.AsyncResult(big).get(timeout=10)
    assert setup.state(big) == "FAILURE"
    assert "no task lost in the broker" in setup.tq("lost", "--older-than", "0s").stdout


def test_a_backlog_larger_than_the_limit_is_worked_through_oldest_first(
    on_redis: tuple[Setup, PrivateRedis],
) -> None:
    setup, server = on_redis
    ids = []
    for label in "abcde":
        ids.append(setup.busy(label))
        time.sleep(0.01)  # distinct submission times
    server.kill()
    server.start()
    first = setup.tq("lost", "--older-than", "0s", "--limit", "2", "--mark")
    assert first.returncode == 0, first.stderr
    assert [setup.state(i) for i in ids] == ["FAILURE", "FAILURE", "QUEUED", "QUEUED", "QUEUED"]
    assert setup.tq("lost", "--older-than", "0s", "--limit", "2", "--mark").returncode == 0
    assert [setup.state(i) for i in ids] == ["FAILURE"] * 4 + ["QUEUED"]


def test_a_task_a_worker_holds_for_its_eta_is_not_lost(on_redis: tuple[Setup, PrivateRedis]) -> None:
    setup, server = on_redis
    setup.start_worker()
    later = setup.busy("later", countdown=300)
    client = redis.Redis(port=server.port)
    # out of the queue: the worker holds it
    wait_for(lambda: client.keys("tq.default*") == [], 30, "the queue to empty")
    assert setup.state(later) == "QUEUED"
    assert setup.lost_ids() == {}  # held in kombu's unacked hash / the tq+redis processing list
    client.close()


def test_the_embedded_broker_is_read_too(data_dir: str, tmp_path: Path) -> None:
    setup = Setup(
        f"tq+sqlite:///{tmp_path / 'broker.db'}", f"tq+sqlite:///{tmp_path / 'results.db'}", data_dir
    )
    try:
        kept, dropped = setup.busy("kept"), setup.busy("dropped")
        assert setup.state(kept) == setup.state(dropped) == "QUEUED"
        with sqlite3.connect(tmp_path / "broker.db") as db:  # what a lost file or a bad restore leaves
            db.execute("DELETE FROM tq_message WHERE payload LIKE ?", (f"%{dropped}%",))
        assert set(setup.lost_ids()) == {dropped}
    finally:
        setup.close()


def test_rabbitmq_is_refused_with_the_reason(rabbitmq_vhost: str, data_dir: str, tmp_path: Path) -> None:
    setup = Setup(rabbitmq_vhost, f"tq+sqlite:///{tmp_path / 'results.db'}", data_dir)
    try:
        setup.busy("queued")
        done = setup.tq("lost")
        assert done.returncode == 1
        assert len(done.stderr.strip().splitlines()) == 1
        assert "RabbitMQ queues cannot be read without consuming" in done.stderr
        assert "management UI" in done.stderr
    finally:
        setup.app.control.purge()
        setup.close()
