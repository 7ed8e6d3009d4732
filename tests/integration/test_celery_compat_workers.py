"""What Celery's clients see through the tq backend, with real workers: chords and groups as
Celery's Redis backend runs them, forget(), ignored results, a running task revoked."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import chord, group
from celery.exceptions import TaskRevokedError

import celery_tq
from celery_tq import errors

from .conftest import Shop, _shop


@pytest.fixture(params=["tq-redis", "embedded"])
def tq_shop(request: pytest.FixtureRequest, data_dir: str) -> Iterator[Shop]:
    """The tq backend on Redis (tq+redis://) and on SQLite (the development preset's)."""
    yield from _shop(request.param, request, Path(data_dir))


def test_chord_with_a_nested_group_in_its_header_completes_on_a_single_process_worker(tq_shop: Shop) -> None:
    # Celery's generic join made the last header task wait for the others inside the worker;
    # with one process and header tasks in its prefetch, that waited forever.
    tq_shop.start_worker(concurrency=1)
    tasks = tq_shop.app.tasks
    header = [group(tasks["tqshop.add"].si(1, 1), tasks["tqshop.add"].si(2, 2)), tasks["tqshop.add"].si(3, 3)]
    result = chord(header)(tasks["tqshop.collect"].s())
    # Flat, as on Celery's Redis backend (its header results are a generator: none is saved).
    assert sorted(result.get(timeout=60)) == [2, 4, 6]


def test_a_failing_header_task_fails_the_chord_with_its_own_error_and_calls_the_errback(
    tq_shop: Shop, data_dir: str
) -> None:
    tq_shop.start_worker()
    tasks = tq_shop.app.tasks
    body = tasks["tqshop.collect"].s().on_error(tasks["tqshop.note"].si(label="chord failed"))
    header = [tasks["tqshop.add"].si(1, 1), tasks["tqshop.raise_error"].si("InvalidInput", ["card declined"])]
    result = chord(header)(body)
    with pytest.raises(errors.InvalidInput):  # the header's own error, not ChordError
        result.get(timeout=60)
    notes = Path(data_dir) / "notes.log"
    deadline = time.monotonic() + 30
    while not notes.exists() or "chord failed" not in notes.read_text():
        assert time.monotonic() < deadline, "the chord's errback never ran"
        time.sleep(0.05)
    assert notes.read_text().splitlines() == ["chord failed"]


def test_a_header_task_adds_a_task_to_its_running_chord(tq_shop: Shop) -> None:
    tq_shop.start_worker()
    tasks = tq_shop.app.tasks
    header = [tasks["tqshop.grow_chord"].si(), tasks["tqshop.add"].si(1, 1)]
    result = chord(header)(tasks["tqshop.collect"].s())
    assert sorted(result.get(timeout=60)) == [1, 2, 20]


def test_a_forgotten_result_reads_pending_and_leaves_no_record(tq_shop: Shop) -> None:
    tq_shop.start_worker()
    result = tq_shop.app.tasks["tqshop.add"].delay(2, 3)
    assert result.get(timeout=60) == 5
    result.forget()
    assert result.state == "PENDING"
    assert result.result is None
    assert celery_tq.system_for(tq_shop.app).registry.get(result.id) is None


def test_an_ignored_result_reads_pending_while_the_registry_keeps_the_outcome(tq_shop: Shop) -> None:
    tq_shop.start_worker()
    registry = celery_tq.system_for(tq_shop.app).registry
    result = tq_shop.app.tasks["tqshop.add"].apply_async((2, 3), ignore_result=True)
    deadline = time.monotonic() + 30
    while (record := registry.get(result.id)) is None or record.state != "SUCCESS":
        assert time.monotonic() < deadline, f"no SUCCESS record: {record}"
        time.sleep(0.05)
    assert record.result == 5
    assert (result.state, result.result) == ("PENDING", None)  # Celery stored nothing, as on Redis


def test_a_running_task_revoked_with_terminate_ends_revoked_and_the_worker_goes_on(tq_shop: Shop) -> None:
    tq_shop.start_worker(concurrency=1)
    tasks = tq_shop.app.tasks
    running = tasks["tqshop.sleep"].delay(120)
    deadline = time.monotonic() + 60
    while running.state != "STARTED":
        assert time.monotonic() < deadline, f"the task did not start (last {running.state})"
        time.sleep(0.05)
    running.revoke(terminate=True)
    with pytest.raises(TaskRevokedError) as caught:  # what code written for plain Celery catches
        running.get(timeout=60)
    assert isinstance(caught.value, errors.Cancelled)
    assert running.state == "REVOKED"
    record = celery_tq.system_for(tq_shop.app).registry.get(running.id)
    assert record is not None and record.state == "REVOKED"
    assert tasks["tqshop.add"].delay(1, 2).get(timeout=60) == 3  # the one pool process was replaced
