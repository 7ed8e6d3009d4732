"""``task-sent`` events leave a publisher on Redis only while a monitor listens; on RabbitMQ always.

What goes to Redis is read with its MONITOR command (a MONITOR client subscribes to nothing, so
the probe does not count it as a monitor)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from celery_tq.client.sent_events import PROBE_EVERY
from tests.integration.conftest import Shop, _shop
from tests.integration.test_worker_events import _Monitor
from tests.waiting import wait_for


class _RedisCommands:
    """The PUBLISH commands a Redis server runs, read by MONITOR in a thread."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url.removeprefix("tq+"))
        self.db = int(self.client.connection_pool.connection_kwargs.get("db") or 0)
        self.published: list[str] = []
        self._monitor = self.client.monitor().__enter__()  # sends MONITOR
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for command in self._monitor.listen():
                text = str(command.get("command", ""))
                if text.upper().startswith("PUBLISH") and f"/{self.db}.celeryev/" in text:
                    self.published.append(text)
        except Exception:  # the connection closed by close()
            return

    def count(self, routing_key: str) -> int:
        return sum(f"celeryev/{routing_key} " in text for text in self.published)

    def close(self) -> None:
        self._monitor.connection.disconnect()
        self.client.close()


@pytest.fixture(params=["redis", "tq+redis"])
def redis_shop(request: pytest.FixtureRequest, data_dir: str) -> Iterator[Shop]:
    yield from _shop(request.param, request, Path(data_dir))


def _send(shop: Shop, count: int) -> list[str]:
    add = shop.app.tasks["tqshop.add"]
    return [add.apply_async((i, 1), queue="tq-sent-events").id for i in range(count)]


def test_task_sent_events_go_to_redis_only_while_a_monitor_listens(redis_shop: Shop) -> None:
    commands = _RedisCommands(redis_shop.broker_url)
    try:
        time.sleep(0.2)  # MONITOR is on
        _send(redis_shop, 5)  # nobody listens
        wait_for(lambda: commands.count("task.multi") >= 1, 5, "the probe's PUBLISH")
        assert commands.count("task.sent") == 0

        with _Monitor(redis_shop.app, wakeup=False) as monitor:
            time.sleep(PROBE_EVERY + 0.3)  # the next probe finds it
            ids = _send(redis_shop, 5)
            wait_for(lambda: set(ids) <= monitor.seen.get("task-sent", set()), 10, "every task-sent")

        time.sleep(PROBE_EVERY + 0.3)  # the monitor left
        sent_before = commands.count("task.sent")
        _send(redis_shop, 5)
        time.sleep(0.3)
        assert commands.count("task.sent") == sent_before
    finally:
        commands.close()


def test_task_sent_events_are_not_paused_on_rabbitmq(rabbitmq_shop: Shop) -> None:
    _send(rabbitmq_shop, 1)
    with _Monitor(rabbitmq_shop.app, wakeup=False) as monitor:
        ids = _send(rabbitmq_shop, 3)  # at once: RabbitMQ publishers do not probe
        wait_for(lambda: set(ids) <= monitor.seen.get("task-sent", set()), 10, "every task-sent")
