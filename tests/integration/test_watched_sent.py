"""A client sends ``task-sent`` events only while a task-event monitor listens: on Redis, and on
RabbitMQ where publishes wait for confirms (the production preset).

Each Redis test runs its own redis-server, so the number of PUBLISH commands the client sent and
the subscribers present are the test's own. On RabbitMQ a queue bound to ``task.sent`` alone sees
the events without being a monitor (a monitor takes every task event, ``task.multi`` included).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery
from kombu import Connection, Exchange, Queue

import celery_tq
from celery_tq import TqTask
from celery_tq.client.watched_sent import PROBE_EVERY
from tests.event_monitor import EventMonitor
from tests.integration.test_publish_batch import queued_ids, send_across_a_restart
from tests.private_redis import PrivateRedis
from tests.waiting import wait_for


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.kill()


def make_app(broker_url: str, tmp_path: Path, **conf: object) -> Celery:
    name = f"sent{uuid.uuid4().hex[:6]}"
    app = Celery(name)
    celery_tq.install(app, preset="production")
    app.conf.update(
        broker_url=broker_url,
        task_default_queue=name,  # a queue of the test's own (the RabbitMQ vhost is the session's)
        tq_default_queue=name,
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
    result = send_across_a_restart(broker, noop, down_for=PROBE_EVERY)  # its probe finds no broker
    assert queued_ids(broker, app.conf.task_default_queue) == [result.id]
    assert recorded(app, result.id) == "QUEUED"
    app.close()


def sent_only_queue(url: str) -> Queue:
    """A queue on ``url``'s vhost that gets ``task-sent`` events and nothing else (not a monitor)."""
    queue = Queue(
        f"sent-only-{uuid.uuid4().hex[:8]}", Exchange("celeryev", type="topic"), routing_key="task.sent"
    )
    with Connection(url) as conn:
        queue.bind(conn.default_channel).declare()
    return queue


def messages_in(url: str, queue: Queue) -> int:
    with Connection(url) as conn:
        return int(queue.bind(conn.default_channel).queue_declare(passive=True).message_count)


def delete(url: str, app: Celery, queue: Queue) -> None:
    """Delete the observer and the queue the test's tasks went to."""
    with Connection(url) as conn:
        queue.bind(conn.default_channel).delete()
        conn.default_channel.queue_delete(app.conf.task_default_queue)


def test_on_rabbitmq_with_confirms_no_task_sent_event_while_no_monitor_listens(
    rabbitmq_vhost: str, tmp_path: Path
) -> None:
    app = make_app(rabbitmq_vhost, tmp_path)  # the production preset: publisher confirms
    observer = sent_only_queue(rabbitmq_vhost)
    try:
        ids = [app.tasks["sent.noop"].apply_async((i,)).id for i in range(10)]
        assert messages_in(rabbitmq_vhost, observer) == 0
        assert [recorded(app, task_id) for task_id in ids] == ["QUEUED"] * 10
    finally:
        delete(rabbitmq_vhost, app, observer)
        app.close()


def test_on_rabbitmq_a_listening_monitor_gets_every_task_sent_event(
    rabbitmq_vhost: str, tmp_path: Path
) -> None:
    app = make_app(rabbitmq_vhost, tmp_path)
    observer = sent_only_queue(rabbitmq_vhost)
    try:
        with EventMonitor(app, wakeup=False) as monitor:
            ids = [app.tasks["sent.noop"].apply_async((i,)).id for i in range(10)]
            wait_for(lambda: set(ids) <= monitor.seen.get("task-sent", set()), 10, "every task-sent event")
        wait_for(lambda: messages_in(rabbitmq_vhost, observer) == 10, 10, "the events in the sent-only queue")
    finally:
        delete(rabbitmq_vhost, app, observer)
        app.close()


def test_on_rabbitmq_without_confirms_every_call_sends_its_event(rabbitmq_vhost: str, tmp_path: Path) -> None:
    app = make_app(rabbitmq_vhost, tmp_path, broker_transport_options={})  # an event costs no round trip
    observer = sent_only_queue(rabbitmq_vhost)
    try:
        for i in range(10):
            app.tasks["sent.noop"].apply_async((i,))
        wait_for(lambda: messages_in(rabbitmq_vhost, observer) == 10, 10, "one task-sent event per call")
    finally:
        delete(rabbitmq_vhost, app, observer)
        app.close()
