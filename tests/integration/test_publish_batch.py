"""A task and its ``task-sent`` event leave in one batch on Redis; nothing is recorded for a
message that never left, and a broker that comes back still gets the message (Celery's retry)."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from kombu.exceptions import OperationalError

import celery_tq
from tests.private_redis import PrivateRedis


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.kill()


def make_app(broker_url: str, tmp_path: Path) -> Celery:
    app = Celery(f"batch{uuid.uuid4().hex[:6]}")
    celery_tq.install(app, preset="production")
    app.conf.update(
        broker_url=broker_url,
        result_backend=f"tq+sqlite:///{tmp_path / 'registry.db'}",
        broker_connection_retry_on_startup=True,
        broker_transport_options={"max_retries": 1, "interval_start": 0, "interval_step": 0.2},
    )

    @app.task(name="batch.noop", shared=False)
    def noop(i: int) -> int:
        return i

    return app


def state_of(app: Celery, task_id: str, timeout: float = 10) -> str | None:
    """The task's registry state once the client's writer has stored it (None: not recorded)."""
    registry = celery_tq.system_for(app).registry  # get() writes what this process has buffered
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = registry.get(task_id)
        if record is not None:
            return record.state
        time.sleep(0.02)
    return None


def queued_ids(server: PrivateRedis, queue: str = "tq.default") -> list[str]:
    """The ids of the messages waiting in ``queue`` (its priority lists included)."""
    client = redis.Redis(port=server.port)
    queues = client.keys(f"{queue}*")
    ids = [json.loads(raw)["headers"]["id"] for key in queues for raw in client.lrange(key, 0, -1)]
    client.close()
    return ids


def send_across_a_restart(broker: PrivateRedis, task: Any, down_for: float = 0.0) -> Any:
    """Kill the broker and send ``task`` with Celery's retries while it is down: the call starts
    ``down_for`` s after the kill, the broker starts again 1 s after that."""
    broker.kill()
    time.sleep(down_for)
    restart = threading.Timer(1.0, broker.start)
    restart.start()
    try:
        return task.apply_async((1,), retry=True, retry_policy={"max_retries": 20, "interval_step": 0.2})
    finally:
        restart.join()


@pytest.mark.parametrize("scheme", ["redis", "tq+redis"])
def test_task_and_sent_event_arrive_and_are_recorded(
    broker: PrivateRedis, tmp_path: Path, scheme: str
) -> None:
    listener = redis.Redis(port=broker.port).pubsub()
    listener.psubscribe("*celeryev*")
    listener.get_message(timeout=2)  # the subscription's confirmation
    app = make_app(f"{scheme}://127.0.0.1:{broker.port}/0", tmp_path)
    result = app.tasks["batch.noop"].apply_async((1,))
    assert queued_ids(broker) == [result.id]
    sent = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not sent:
        message = listener.get_message(timeout=0.5)
        if message and message["type"] == "pmessage":
            body = json.loads(base64.b64decode(json.loads(message["data"])["body"]))
            for event in body if isinstance(body, list) else [body]:  # a list: a batch (the probe's: [])
                if event["type"] == "task-sent" and event["uuid"] == result.id:
                    sent.append(event)
    assert sent, "no task-sent event"
    assert state_of(app, result.id) == "QUEUED"
    listener.close()
    app.close()


@pytest.mark.parametrize("scheme", ["redis", "tq+redis"])
def test_a_publish_that_fails_records_nothing(broker: PrivateRedis, tmp_path: Path, scheme: str) -> None:
    app = make_app(f"{scheme}://127.0.0.1:{broker.port}/0", tmp_path)
    noop = app.tasks["batch.noop"]
    noop.apply_async((0,))  # connected
    broker.kill()
    lost = str(uuid.uuid4())
    with pytest.raises((OperationalError, redis.ConnectionError)):
        noop.apply_async((1,), task_id=lost, retry=False)
    broker.start()
    sent = noop.apply_async((2,))
    assert state_of(app, sent.id) == "QUEUED"
    assert state_of(app, lost, timeout=0) is None  # nothing buffered for it either (get() flushes)
    assert queued_ids(broker) == [sent.id]
    app.close()


@pytest.mark.parametrize("scheme", ["redis", "tq+redis"])
def test_a_broker_that_comes_back_gets_the_message_once(
    broker: PrivateRedis, tmp_path: Path, scheme: str
) -> None:
    app = make_app(f"{scheme}://127.0.0.1:{broker.port}/0", tmp_path)
    noop = app.tasks["batch.noop"]
    noop.apply_async((0,))
    result = send_across_a_restart(broker, noop)
    assert queued_ids(broker) == [result.id]
    assert state_of(app, result.id) == "QUEUED"
    app.close()
