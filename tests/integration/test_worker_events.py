"""Task events leave the worker in batches, without publisher confirms, and none is lost.

On RabbitMQ with ``confirm_publish`` (the production preset), a monitor still sees every task
event, including those of the last tasks before a warm shutdown; the event channel never enters
confirm mode, while task messages keep their confirms.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from celery import Celery
from kombu import Connection, Producer

from celery_tq.worker_events import unconfirm
from tests.integration.conftest import Shop


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


def _monitor(app: Celery, seen: dict[str, set[str]], ready: threading.Event, stop: threading.Event) -> None:
    def on_event(event: dict[str, Any]) -> None:
        if "uuid" in event:
            seen.setdefault(event["type"], set()).add(event["uuid"])

    with app.connection_for_read() as conn:
        receiver = app.events.Receiver(conn, handlers={"*": on_event})
        receiver.on_iteration = lambda: (ready.set(), setattr(receiver, "should_stop", stop.is_set()))
        receiver.capture(limit=None, timeout=None, wakeup=False)  # drains until should_stop


def _wait(predicate: Any, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def test_a_monitor_sees_every_task_event_of_a_confirming_worker_even_at_shutdown(
    rabbitmq_shop: Shop,
) -> None:
    app = rabbitmq_shop.app
    seen: dict[str, set[str]] = {}
    ready, stop = threading.Event(), threading.Event()
    monitor = threading.Thread(target=_monitor, args=(app, seen, ready, stop), daemon=True)
    monitor.start()
    assert ready.wait(10)
    try:
        conf = {"broker_transport_options": {"confirm_publish": True}, "tq_event_flush_interval": 3.0}
        worker = rabbitmq_shop.start_worker(env={"TQSHOP_CONF": json.dumps(conf)})
        add = app.tasks["tqshop.add"]
        ids = [add.delay(i, i).id for i in range(30)]
        assert [app.AsyncResult(i).get(timeout=30) for i in ids] == [2 * i for i in range(30)]
        assert _wait(lambda: set(ids) <= seen.get("task-succeeded", set()))
        assert set(ids) <= seen.get("task-received", set())
        assert set(ids) <= seen.get("task-started", set())

        last = [add.delay(i, 1).id for i in range(5)]
        for task_id in last:
            app.AsyncResult(task_id).get(timeout=30)
        worker.stop()  # within the 3 s flush interval: stopping flushes what is buffered
        assert _wait(lambda: set(last) <= seen.get("task-succeeded", set()), timeout=10)
    finally:
        stop.set()
        monitor.join(5)
