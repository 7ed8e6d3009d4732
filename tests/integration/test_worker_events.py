"""Task events leave the worker in batches, without publisher confirms, and none is lost.

On RabbitMQ with ``confirm_publish`` (the production preset), a monitor still sees every task
event, including those of the last tasks before a warm shutdown; the event channel never enters
confirm mode, while task messages keep their confirms. While no monitor listens, the worker
pauses its task events; one that connects sees them again at once (``wakeup``, as Flower and
``celery events`` do) or within a heartbeat (a plain queue on the event exchange).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery
from kombu import Connection, Producer

from celery_tq.worker.events import unconfirm
from tests.event_monitor import EventMonitor
from tests.integration.conftest import Shop, _shop
from tests.waiting import wait_for


def test_unconfirm_takes_a_producer_off_publisher_confirms(rabbitmq_vhost: str) -> None:
    with Connection(rabbitmq_vhost, transport_options={"confirm_publish": True}) as conn:
        fresh = Producer(conn.channel())
        assert unconfirm(fresh)
        fresh.publish({"n": 1}, routing_key="tq-nowhere")
        assert fresh.channel._confirm_selected is False  # the broker was never asked to confirm

        used = Producer(conn.channel())
        used.publish({"n": 2}, routing_key="tq-nowhere")  # confirmed: the channel is in confirm mode
        confirmed_channel = used.channel
        assert confirmed_channel._confirm_selected is True
        assert unconfirm(used)
        assert used.channel is not confirmed_channel  # confirm mode cannot be left: a new channel
        used.publish({"n": 3}, routing_key="tq-nowhere")
        assert used.channel._confirm_selected is False


def test_unconfirm_leaves_producers_without_confirms_alone(rabbitmq_vhost: str) -> None:
    with Connection(rabbitmq_vhost) as conn:
        producer = Producer(conn.channel())
        assert not unconfirm(producer)
        producer.publish({"n": 1}, routing_key="tq-nowhere")


def test_a_monitor_sees_every_task_event_of_a_confirming_worker_even_at_shutdown(
    rabbitmq_shop: Shop,
) -> None:
    app = rabbitmq_shop.app
    with EventMonitor(app, wakeup=False) as monitor:
        seen = monitor.seen
        conf = {"broker_transport_options": {"confirm_publish": True}, "tq_event_flush_interval": 3.0}
        worker = rabbitmq_shop.start_worker(env={"TQSHOP_CONF": json.dumps(conf)})
        add = app.tasks["tqshop.add"]
        ids = [add.delay(i, i).id for i in range(30)]
        assert [app.AsyncResult(i).get(timeout=30) for i in ids] == [2 * i for i in range(30)]
        wait_for(lambda: set(ids) <= seen.get("task-succeeded", set()), 20, "every task-succeeded")
        assert set(ids) <= seen.get("task-received", set())
        assert set(ids) <= seen.get("task-started", set())

        last = [add.delay(i, 1).id for i in range(5)]
        for task_id in last:
            app.AsyncResult(task_id).get(timeout=30)
        worker.stop()  # within the 3 s flush interval: stopping flushes what is buffered
        wait_for(lambda: set(last) <= seen.get("task-succeeded", set()), 10, "the last task-succeeded")


def _run(app: Celery, count: int) -> list[str]:
    add = app.tasks["tqshop.add"]
    ids = [add.delay(i, 1).id for i in range(count)]
    assert [app.AsyncResult(i).get(timeout=30) for i in ids] == [i + 1 for i in range(count)]
    return ids


PAUSED, RESUMED = "Task events paused", "Task events resumed"


@pytest.fixture(params=["rabbitmq", "tq+redis", "redis"])
def watched_shop(request: pytest.FixtureRequest, data_dir: str) -> Iterator[Shop]:
    """The brokers that tell a worker whether a monitor listens: RabbitMQ (a mandatory publish
    returned) and Redis, celery-tq's ``tq+redis://`` and kombu's ``redis://`` (PUBLISH counts the
    subscribers)."""
    yield from _shop(request.param, request, Path(data_dir))


def test_task_events_pause_with_no_monitor_and_resume_when_one_connects(watched_shop: Shop) -> None:
    app = watched_shop.app
    worker = watched_shop.start_worker()
    wait_for(lambda: PAUSED in worker.log, 10, "events paused")  # the first heartbeat found no listener
    _run(app, 5)

    with EventMonitor(app, wakeup=True) as flower_like:  # Flower and `celery events` ask for a heartbeat
        wait_for(lambda: RESUMED in worker.log, 5, "events resumed")
        ids = _run(app, 10)
        wait_for(lambda: flower_like.saw_all_events_of(ids), 20, "the monitor to see every event")

    wait_for(lambda: worker.log.count(PAUSED) == 2, 10, "events paused again")  # the monitor left
    _run(app, 5)
    with EventMonitor(app, wakeup=False) as plain_queue:  # no wakeup: the next heartbeat finds it
        wait_for(lambda: worker.log.count(RESUMED) == 2, 10, "events resumed again")
        ids = _run(app, 10)
        wait_for(lambda: plain_queue.saw_all_events_of(ids), 20, "the plain queue to see every event")
    assert "Traceback" not in worker.log


@pytest.fixture(params=["tq+redis", "redis"])
def redis_watched_shop(request: pytest.FixtureRequest, data_dir: str) -> Iterator[Shop]:
    yield from _shop(request.param, request, Path(data_dir))


def test_a_worker_that_starts_with_nobody_listening_publishes_no_task_event(
    redis_watched_shop: Shop,
) -> None:
    """Paused from the start (not from its first heartbeat, 2 s later): Redis MONITOR, which
    subscribes to nothing, sees every task-event batch the worker publishes."""
    shop = redis_watched_shop
    channel = f"/{shop.broker_url.rsplit('/', 1)[1]}.celeryev/task.multi"
    batches: list[str] = []
    watching = threading.Event()

    def watch() -> None:
        with redis.Redis.from_url(shop.broker_url.removeprefix("tq+")).monitor() as monitor:
            watching.set()
            while watching.is_set():
                command = monitor.next_command()["command"]
                if channel in command and '"body": "W10="' not in command:  # W10= is [], a probe
                    batches.append(command)

    threading.Thread(target=watch, daemon=True).start()
    assert watching.wait(5)
    worker = shop.start_worker()
    ids = _run(shop.app, 10)
    time.sleep(0.5)  # a worker sends its batch of task events within 0.1 s
    watching.clear()
    assert batches == [], f"{len(batches)} task-event batches published for {len(ids)} tasks"
    assert PAUSED in worker.log


def test_task_events_stay_on_when_pausing_is_turned_off(rabbitmq_shop: Shop) -> None:
    app = rabbitmq_shop.app
    conf = {"tq_pause_unwatched_events": False}
    worker = rabbitmq_shop.start_worker(env={"TQSHOP_CONF": json.dumps(conf)})
    _run(app, 3)
    time.sleep(5)  # two heartbeats with nobody listening
    with EventMonitor(app, wakeup=False) as monitor:
        ids = _run(app, 5)
        wait_for(lambda: monitor.saw_all_events_of(ids), 20, "the monitor to see every event")
    assert PAUSED not in worker.log
