"""What a message may hold: ids, names and queues a store can keep, and a size cap, at publish."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

import celery_tq
from celery_tq.client.limits import check_message, json_bounds
from celery_tq.errors import InvalidInput


@pytest.fixture
def app(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Iterator[Celery]:
    monkeypatch.setenv("TQ_DATA_DIR", str(tmp_path))
    app = Celery("limits", set_as_current=False)
    tq = celery_tq.install(app, preset="testing")
    app.conf.tq_max_message_bytes = 1024 * 1024

    @tq.task(name="limits.echo", shared=False)
    def echo(value: Any = None) -> Any:
        return value

    with app.connection_for_write() as conn:  # memory:// queues live as long as the process
        conn.default_channel.queue_declare(queue="tq.default")
        conn.default_channel.queue_purge("tq.default")
    yield app
    app.close()


def queued(app: Celery) -> int:
    with app.connection_for_write() as conn:
        return int(conn.default_channel.queue_declare(queue="tq.default", passive=True).message_count)


def records(app: Celery) -> int:
    return sum(celery_tq.system_for(app).registry.counts().values())


@pytest.mark.parametrize(
    "options",
    [
        {"task_id": "x" * 156},
        {"task_id": "bad\x00id"},
        {"parent_id": "p" * 200},
        {"root_id": "r" * 200},
        {"queue": "q" * 256},
    ],
)
def test_ids_and_queues_a_store_cannot_hold_are_refused_before_sending(
    app: Celery, options: dict[str, Any]
) -> None:
    before = records(app)
    with pytest.raises(InvalidInput, match="nothing was sent"):
        app.tasks["limits.echo"].apply_async((1,), **options)
    assert queued(app) == 0
    assert records(app) == before


def test_a_task_name_longer_than_the_registry_column_is_refused(app: Celery) -> None:
    with pytest.raises(InvalidInput, match=r"task name .* 256 characters"):
        app.send_task("n" * 256)
    assert queued(app) == 0


def test_the_longest_id_and_name_a_store_holds_are_sent(app: Celery) -> None:
    app.tasks["limits.echo"].apply_async((1,), task_id="x" * 155)
    app.send_task("n" * 255)
    assert queued(app) == 2


def test_a_message_over_the_size_cap_is_refused_before_sending(app: Celery) -> None:
    before = records(app)
    with pytest.raises(InvalidInput, match="tq_max_message_bytes"):
        app.tasks["limits.echo"].delay("x" * (1024 * 1024 + 1))
    assert queued(app) == 0
    assert records(app) == before


def test_a_message_of_many_small_values_over_the_cap_is_measured_and_refused(app: Celery) -> None:
    with pytest.raises(InvalidInput, match=r"is [\d,]+ bytes"):
        app.tasks["limits.echo"].delay(list(range(300_000)))
    assert queued(app) == 0


def test_a_message_under_the_cap_is_sent(app: Celery) -> None:
    app.tasks["limits.echo"].delay("x" * 500_000)
    app.tasks["limits.echo"].delay({"nested": [list(range(50))] * 100})
    assert queued(app) == 2


def test_a_zero_cap_turns_the_size_check_off(app: Celery) -> None:
    check_message("t", {"id": "a"}, (("x" * 10_000,), {}, {}), None, "json", 0)


@pytest.mark.parametrize(
    "value",
    [
        "plain",
        'é ü 😀 \n " \\ \x01',
        b"\x00\xff",
        0,
        -(10**40),
        2**200,
        3.25,
        True,
        None,
        {"k": [1, "two", {"three": 3.0}]},
        ("a", ["b", ("c",)]),
    ],
)
def test_size_bounds_hold_the_real_json_size(value: Any) -> None:
    from kombu.serialization import dumps

    body = ((value,), {"v": value}, {"callbacks": None})
    low, high, walked = json_bounds(body)
    size = len(dumps(body, serializer="json")[2])
    assert walked
    assert low <= size <= high


def _sent(app: Celery) -> Any:
    with app.connection_for_write() as conn:
        message = conn.default_channel.basic_get("tq.default", no_ack=True)
        assert message is not None
        return message


def test_a_task_re_sent_after_its_process_died_goes_one_broker_level_up_keeping_its_priority(
    app: Celery,
) -> None:
    app.tasks["limits.echo"].apply_async((1,), priority=5, headers={"tq_lost": 1})
    message = _sent(app)
    assert message.properties["priority"] == 6  # ahead of its peers at level 5
    assert message.headers["tq_priority"] == 5  # the task's own priority is unchanged
    app.tasks["limits.echo"].apply_async((1,), priority=9, headers={"tq_lost": 2})
    assert _sent(app).properties["priority"] == 9
    app.tasks["limits.echo"].apply_async((1,), priority=5)
    assert _sent(app).properties["priority"] == 5
