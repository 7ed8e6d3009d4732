"""On Redis a client sends ``task-sent`` events only while a task-event monitor listens.

Each test runs its own redis-server, so the number of PUBLISH commands the client sent and the
subscribers present are the test's own.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

import celery_tq
from celery_tq import TqTask
from celery_tq.client.watched_sent import PROBE_EVERY
from tests.event_monitor import EventMonitor
from tests.integration.test_publish_batch import queued_ids
from tests.private_redis import PrivateRedis
from tests.waiting import wait_for


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.kill()


def make_app(broker_url: str, tmp_path: Path, **conf: object) -> Celery:
    app = Celery(f"sent{uuid.uuid4().hex[:6]}")
    celery_tq.install(app, preset="production")
    app.conf.update(
        broker_url=broker_url,
        result_backend=f"tq+sqlite:///{tmp_path / 'registry.db'}",
        broker_connection_retry_on_startup=True,
        **conf,
    )

    @app.task(name="sent.noop", shared=False, base=TqTask, tq_priority=7, tq_tags=("billing",))
    def noop(i: int) -> int:
        return i

    return app


def publishes(server: PrivateRedis) -> int:
    """How many PUBLISH commands the server has run (every event goes out as one on Redis)."""
    client = redis.Redis(port=server.port)
    stats = client.info("commandstats").get("cmdstat_publish", {})
    client.close()
    return int(stats.get("calls", 0))


def monitoring(app: Celery, server: PrivateRedis) -> EventMonitor:
    """A monitor (Celery's receiver, as Flower runs it), returned once Redis has its subscription."""
    monitor = EventMonitor(app, wakeup=False).__enter__()
    client = redis.Redis(port=server.port)
    wait_for(lambda: int(client.execute_command("PUBSUB", "NUMPAT")) > 0, 10, "the monitor's subscription")
    client.close()
    return monitor


def recorded(app: Celery, task_id: str) -> str | None:
    record = celery_tq.system_for(app).registry.get(task_id)  # get() writes what is buffered
    return None if record is None else record.state


@pytest.mark.parametrize("scheme", ["redis", "tq+redis"])
def test_no_task_sent_event_while_no_monitor_listens_but_every_task_is_recorded(
    broker: PrivateRedis, tmp_path: Path, scheme: str
) -> None:
    app = make_app(f"{scheme}://127.0.0.1:{broker.port}/0", tmp_path)
    noop = app.tasks["sent.noop"]
    before = publishes(broker)
    ids = [noop.apply_async((i,)).id for i in range(20)]
    assert publishes(broker) - before == 1  # the one probe (an empty batch of events), no task-sent
    assert [recorded(app, task_id) for task_id in ids] == ["QUEUED"] * 20
    app.close()


@pytest.mark.parametrize("scheme", ["redis", "tq+redis"])
def test_a_listening_monitor_gets_every_task_sent_event_with_the_metadata(
    broker: PrivateRedis, tmp_path: Path, scheme: str
) -> None:
    app = make_app(f"{scheme}://127.0.0.1:{broker.port}/0", tmp_path)
    monitor = monitoring(app, broker)
    try:
        ids = [app.tasks["sent.noop"].apply_async((i,)).id for i in range(10)]
        wait_for(lambda: set(ids) <= monitor.seen.get("task-sent", set()), 10, "every task-sent event")
        sent = [e for e in monitor.events if e["type"] == "task-sent"]
        assert [e["uuid"] for e in sent] == ids
        assert all("priority=7" in e["kwargs"] and "billing" in e["kwargs"] for e in sent)
    finally:
        monitor.__exit__()
    app.close()


def test_a_monitor_that_connects_later_gets_task_sent_events_within_the_probe_interval(
    broker: PrivateRedis, tmp_path: Path
) -> None:
    app = make_app(f"tq+redis://127.0.0.1:{broker.port}/0", tmp_path)
    noop = app.tasks["sent.noop"]
    noop.apply_async((0,))  # probed: nobody listens
    monitor = monitoring(app, broker)
    try:
        ids: list[str] = []

        def sent_seen() -> bool:
            ids.append(noop.apply_async((len(ids),)).id)
            return bool(monitor.seen.get("task-sent"))

        wait_for(sent_seen, PROBE_EVERY + 10, "a task-sent event", interval=0.1)
        first = ids.index(next(e["uuid"] for e in monitor.events if e["type"] == "task-sent"))
        later = [noop.apply_async((i,)).id for i in range(5)]
        wait_for(lambda: set(later) <= monitor.seen["task-sent"], 10, "every later task-sent event")
        assert set(ids[first:]) <= monitor.seen["task-sent"]  # from the first on, none is missing
    finally:
        monitor.__exit__()
    app.close()


def test_task_sent_events_stay_on_when_pausing_is_turned_off(broker: PrivateRedis, tmp_path: Path) -> None:
    app = make_app(f"redis://127.0.0.1:{broker.port}/0", tmp_path, tq_pause_unwatched_events=False)
    noop = app.tasks["sent.noop"]
    before = publishes(broker)
    for i in range(10):
        noop.apply_async((i,))
    assert publishes(broker) - before == 10  # one task-sent event per call, nobody listening
    app.close()


@pytest.mark.parametrize("scheme", ["redis", "tq+redis"])
def test_a_call_whose_probe_finds_the_broker_down_is_sent_once_when_it_is_back(
    broker: PrivateRedis, tmp_path: Path, scheme: str
) -> None:
    app = make_app(f"{scheme}://127.0.0.1:{broker.port}/0", tmp_path)
    noop = app.tasks["sent.noop"]
    noop.apply_async((0,))  # probed: nobody listens
    broker.kill()
    time.sleep(PROBE_EVERY)  # the next call probes, and finds no broker
    restart = threading.Timer(1.0, broker.start)
    restart.start()
    try:
        result = noop.apply_async((1,), retry=True, retry_policy={"max_retries": 20, "interval_step": 0.2})
    finally:
        restart.join()
    assert queued_ids(broker) == [result.id]
    assert recorded(app, result.id) == "QUEUED"
    app.close()
