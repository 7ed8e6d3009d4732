"""Bad input gets a clear, typed error and loses nothing; a worker never dies of one bad message."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest
import redis
from kombu import Connection

from celery_tq import errors
from celery_tq.transport.sqlite import db_path

from .conftest import Shop, _shop


def _queued(shop: Shop) -> int:
    """Task messages waiting in tq.default (any priority)."""
    if shop.kind == "embedded":
        path = db_path(shop.broker_url.removeprefix("tq+"))
        if not path.exists():
            return 0
        with contextlib.closing(sqlite3.connect(path)) as db:
            return int(
                db.execute("SELECT count(*) FROM tq_message WHERE queue LIKE 'tq.default%'").fetchone()[0]
            )
    client = redis.Redis.from_url(shop.broker_url)
    try:
        return sum(int(client.llen(key)) for key in client.keys("tq.default*"))  # type: ignore[union-attr]
    finally:
        client.close()


def test_non_json_argument_is_refused_at_submit_and_nothing_is_sent(embedded_or_redis_shop: Shop) -> None:
    add = embedded_or_redis_shop.app.tasks["tqshop.add"]
    with pytest.raises(errors.InvalidInput, match="cannot be serialized"):
        add.delay(object(), 1)
    assert _queued(embedded_or_redis_shop) == 0


@pytest.mark.parametrize(
    "options",
    [{"priority": 10}, {"priority": -1}, {"timeout": 0}, {"tags": {""}}, {"tags": {"x" * 65}}],
)
def test_bad_metadata_is_refused_at_call_time_and_nothing_is_sent(
    embedded_or_redis_shop: Shop, options: dict[str, object]
) -> None:
    with pytest.raises(errors.MetadataError):
        embedded_or_redis_shop.app.tasks["tqshop.add"].apply_async((1, 2), **options)
    with pytest.raises(ValueError):  # MetadataError is also a ValueError
        embedded_or_redis_shop.app.send_task("tqshop.add", (1, 2), **options)
    assert _queued(embedded_or_redis_shop) == 0


def test_unknown_task_name_is_a_failure_the_caller_sees(embedded_or_redis_shop: Shop) -> None:
    worker = embedded_or_redis_shop.start_worker()
    with pytest.raises(Exception, match=r"tqshop\.does_not_exist"):
        embedded_or_redis_shop.app.send_task("tqshop.does_not_exist", (1,)).get(timeout=30)
    assert worker.process is not None and worker.process.poll() is None


def test_garbage_messages_do_not_kill_the_worker(embedded_or_redis_shop: Shop) -> None:
    worker = embedded_or_redis_shop.start_worker()
    with Connection(embedded_or_redis_shop.broker_url) as conn:
        producer = conn.Producer()
        producer.publish(b"\x00\xffnot json", routing_key="tq.default", content_type="application/json")
        producer.publish({"no": "headers"}, routing_key="tq.default", serializer="json")
        producer.publish(
            "[[1], {}, {}]",
            routing_key="tq.default",
            content_type="application/json",
            headers={"task": "tqshop.add", "id": "bad-arity"},
        )
    assert embedded_or_redis_shop.app.tasks["tqshop.add"].delay(2, 3).get(timeout=30) == 5
    assert worker.process is not None and worker.process.poll() is None


def _queue_depth(shop: Shop) -> int:
    with shop.app.connection_for_write() as conn:
        return int(conn.default_channel.queue_declare(queue="tq.default", passive=True).message_count)


@pytest.mark.parametrize("kind", ["embedded", "tq+redis", "rabbitmq"])
def test_a_150_mb_argument_is_refused_at_publish_on_every_broker(
    kind: str, request: pytest.FixtureRequest
) -> None:
    shop_iter = _shop(kind, request, Path(request.getfixturevalue("data_dir")))
    shop = next(shop_iter)
    try:
        big = "x" * (150 * 1024 * 1024)
        with pytest.raises(errors.InvalidInput, match="tq_max_message_bytes"):
            shop.app.tasks["tqshop.add"].delay(big, 1)
        del big
        assert shop.app.tasks["tqshop.add"].delay(1, 2).id  # the connection is still good
        assert _queue_depth(shop) == 1  # only that one: nothing of the refused message
    finally:
        next(shop_iter, None)


@pytest.mark.parametrize("options", [{"task_id": "i" * 200}, {"queue": "q" * 300}])
def test_an_id_or_queue_the_registry_cannot_hold_is_refused_at_publish(
    embedded_or_redis_shop: Shop, options: dict[str, object]
) -> None:
    with pytest.raises(errors.InvalidInput, match="nothing was sent"):
        embedded_or_redis_shop.app.tasks["tqshop.add"].apply_async((1, 2), **options)
    assert _queued(embedded_or_redis_shop) == 0


def test_malformed_body_with_a_task_id_ends_rejected_for_the_caller_and_the_registry(
    production_shop: Shop,
) -> None:
    import time

    from celery.result import AsyncResult

    from celery_tq import system_for
    from celery_tq.worker.refused import refused_count

    app = production_shop.app
    worker = production_shop.start_worker()
    registry = system_for(app).registry
    with Connection(production_shop.broker_url) as conn:
        producer = conn.Producer()
        for headers in ({"task": "tqshop.add", "id": "malformed-1"}, {"task": "tqshop.add"}):
            producer.publish(
                b'{"not": json',
                routing_key="tq.default",
                content_type="application/json",
                content_encoding="utf-8",
                headers=headers,
            )
    deadline = time.monotonic() + 30
    while AsyncResult("malformed-1", app=app).state != "REJECTED":
        assert time.monotonic() < deadline, "never REJECTED"
        time.sleep(0.1)
    with pytest.raises(errors.InvalidInput, match="rejected"):
        AsyncResult("malformed-1", app=app).get(timeout=10)
    record = registry.get("malformed-1")
    assert record is not None and record.state == "REJECTED" and record.name == "tqshop.add"
    assert "cannot be decoded" in str(record.error)
    while refused_count(registry.store) < 2:  # the one without an id is counted too
        assert time.monotonic() < deadline, "refused messages not counted"
        time.sleep(0.1)
    assert app.tasks["tqshop.add"].delay(2, 3).get(timeout=30) == 5
    assert worker.process is not None and worker.process.poll() is None
