"""A pool process that dies under a task: the task runs again within seconds, a bounded number of
times, then ends as FAILURE(WorkerLost); nothing is lost and nothing finishes twice."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from celery_tq import errors
from celery_tq.system import system_for
from tests.waiting import wait_for

from .conftest import Shop


def _runs(data_dir: str, label: str) -> list[tuple[int, int, float]]:
    log = Path(data_dir) / "runs.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return [(int(p), int(r), float(t)) for lab, p, r, t in (line.split() for line in lines) if lab == label]


def test_task_whose_process_is_killed_runs_again_within_five_seconds(
    production_shop: Shop, data_dir: str
) -> None:
    production_shop.start_worker(concurrency=2)
    busy = production_shop.app.tasks["tqshop.busy"]
    victim = busy.delay("victim", 3)
    wait_for(lambda: bool(_runs(data_dir, "victim")), 30, "the victim to run")
    pid, _, _ = _runs(data_dir, "victim")[0]
    os.kill(pid, signal.SIGKILL)  # what the OOM killer does
    killed_at = time.time()
    assert victim.get(timeout=60) == "victim"
    runs = _runs(data_dir, "victim")
    assert len(runs) == 2  # the killed run and one re-run: nothing finished twice
    assert runs[1][2] - killed_at < 5
    record = production_shop.app.backend.get_task_meta(victim.id)
    assert record["status"] == "SUCCESS" and record["retries"] == 1
    registered = system_for(production_shop.app).registry.get(victim.id)
    assert registered is not None and registered.deliveries == 2  # the killed run and the re-run
    assert registered.started_at is not None and registered.started_at.timestamp() >= runs[1][2] - 1
    others = [busy.delay(f"other{i}", 0.1) for i in range(4)]  # the pool is whole again
    assert [r.get(timeout=30) for r in others] == [f"other{i}" for i in range(4)]


def test_poison_task_fails_with_worker_lost_within_a_minute(production_shop: Shop, data_dir: str) -> None:
    production_shop.start_worker(concurrency=2)
    started = time.monotonic()
    poison = production_shop.app.tasks["tqshop.busy"].delay("poison", 0, die=True)
    with pytest.raises(errors.WorkerLost) as caught:
        poison.get(timeout=60)
    assert time.monotonic() - started < 60
    assert caught.value.task_name == "tqshop.busy"
    assert len(_runs(data_dir, "poison")) == 4  # the first run and tq_worker_lost_retries (3) more
    assert production_shop.app.tasks["tqshop.add"].delay(1, 2).get(timeout=30) == 3  # the worker goes on


def test_worker_lost_retries_are_configurable(redis_shop: Shop, data_dir: str) -> None:
    redis_shop.start_worker(env={"TQSHOP_CONF": '{"tq_worker_lost_retries": 1, "tq_worker_lost_delay": 0.2}'})
    poison = redis_shop.app.tasks["tqshop.busy"].delay("poison", 0, die=True)
    with pytest.raises(errors.WorkerLost):
        poison.get(timeout=60)
    assert [retries for _, retries, _ in _runs(data_dir, "poison")] == [0, 1]


@pytest.mark.parametrize("task", ["tqshop.busy", "tqshop.plain_busy"])
def test_redelivered_task_that_already_ended_is_acked_without_running_again(
    rabbitmq_production_shop: Shop, data_dir: str, task: str
) -> None:
    """celery-tq's tasks, and Celery's own on a worker that hands outcomes over (as the production
    preset's does), are not run again when the broker redelivers a message whose task already ended.
    (A redelivery on demand: RabbitMQ requeues what a closed channel did not ack.)"""
    from celery.app.task import Context
    from kombu import Connection

    production_shop = rabbitmq_production_shop
    app = production_shop.app
    busy = app.tasks[task]
    busy.apply_async(("ended-before", 0), task_id="dup-ended")
    busy.apply_async(("not-ended", 0), task_id="dup-open")
    got: list[object] = []
    with Connection(production_shop.broker_url) as conn:  # a worker that dies before its acks
        with conn.Consumer(app.amqp.queues["tq.default"], callbacks=[lambda body, m: got.append(m)]):
            while len(got) < 2:
                conn.drain_events(timeout=10)
        # It ran the first one and stored the result; then its connection dropped.
        app.backend.mark_as_done("dup-ended", "ended-before", request=Context(id="dup-ended", task=busy.name))
    # (the shop's preset is the development one: the production preset's hand-over turned on)
    production_shop.start_worker(env={"TQSHOP_CONF": '{"tq_hand_over_outcomes": true}'})
    assert busy.AsyncResult("dup-open").get(timeout=30) == "not-ended"
    assert busy.AsyncResult("dup-ended").get(timeout=30) == "ended-before"
    with Connection(production_shop.broker_url) as conn:
        depth = conn.default_channel.queue_declare(queue="tq.default", passive=True).message_count
    assert depth == 0  # the ended one was acked, not left behind
    assert [r for r in _runs(data_dir, "ended-before")] == []
    assert len(_runs(data_dir, "not-ended")) == 1


def test_stopping_a_worker_process_lets_its_running_task_finish(embedded_shop: Shop, data_dir: str) -> None:
    """``WorkerProcess.stop()`` is a warm shutdown: only the worker's main process gets SIGTERM,
    so a task its pool is running ends normally, once, before the worker exits."""
    worker = embedded_shop.start_worker(concurrency=1)
    running = embedded_shop.app.tasks["tqshop.busy"].delay("finishing", 2)
    wait_for(lambda: bool(_runs(data_dir, "finishing")), 30, "the task to start")
    assert worker.stop() == 0
    record = system_for(embedded_shop.app).registry.get(running.id)
    assert record is not None and record.state == "SUCCESS" and record.deliveries == 1
    assert len(_runs(data_dir, "finishing")) == 1
