"""The write path of one process: batches after a short linger, durable writes that take the
buffer along, refused rows isolated, flush on demand."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import pytest

from celery_tq.errors import StorageError
from celery_tq.registry import Store, store_for_url
from celery_tq.registry.record import QUEUED, change
from celery_tq.registry.writer import QueuedWriter, enqueue, flush_pending, write_with_retry


def _store() -> Store:
    return store_for_url(f"memory://{uuid.uuid4().hex}")


def _state(store: Store, task_id: str) -> Any:
    row = store.read([task_id])[0]
    return None if row is None else row["state"]


def test_a_change_is_written_once_the_linger_has_passed() -> None:
    store = _store()
    writer = QueuedWriter(store, linger=0.05)
    writer.put(change("a", QUEUED, name="t"))
    deadline = time.monotonic() + 5
    while _state(store, "a") is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _state(store, "a") == QUEUED


def test_flush_writes_at_once_whatever_the_linger() -> None:
    store = _store()
    writer = QueuedWriter(store, linger=60)
    writer.put(change("a", QUEUED, name="t"))  # the thread would wait up to 60 s for more
    assert writer.flush(timeout=5)
    assert _state(store, "a") == QUEUED


class CountingStore:
    """A memory store that records each batch it is asked to write and refuses one task id."""

    def __init__(self, refuse: str = "") -> None:
        self.inner = _store()
        self.url = self.inner.url
        self.batches: list[list[str]] = []
        self.refuse = refuse

    def write(self, changes: Any) -> None:
        self.batches.append([c["id"] for c in changes])
        if any(c["id"] == self.refuse for c in changes):
            raise StorageError("value too long for type character varying(155)")
        self.inner.write(changes)

    def read(self, task_ids: Any) -> Any:
        return self.inner.read(task_ids)


def test_a_durable_write_takes_what_the_process_buffered_along_in_one_batch() -> None:
    store: Any = CountingStore()
    enqueue(store, change("child", QUEUED, name="t"))  # what the task published
    enqueue(store, change("a", "STARTED", name="t", started_at=1.0))
    assert write_with_retry(store, [change("a", "SUCCESS", name="t")], "SUCCESS of a", retry_for=5)
    assert store.batches == [["child", "a", "a"]]  # one round trip for all three
    assert (_state(store.inner, "a"), _state(store.inner, "child")) == ("SUCCESS", QUEUED)
    flush_pending(store)
    assert store.batches == [["child", "a", "a"]]  # nothing left for the background writer


def test_a_row_the_store_refuses_is_dropped_alone_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    store: Any = CountingStore(refuse="x" * 200)
    rows = [change("before", QUEUED, name="t"), change("x" * 200, QUEUED, name="t"), change("after", QUEUED)]
    with caplog.at_level(logging.ERROR, logger="celery_tq.registry"):
        assert write_with_retry(store, rows, "three records", retry_for=5)
    assert (_state(store.inner, "before"), _state(store.inner, "after")) == (QUEUED, QUEUED)
    assert "refused the QUEUED record of task 'xxxx" in caplog.text


def test_the_background_writer_isolates_a_refused_row() -> None:
    store: Any = CountingStore(refuse="bad")
    writer = QueuedWriter(store, linger=60)
    for task_id in ("a", "bad", "b"):
        writer.put(change(task_id, QUEUED, name="t"))
    assert writer.flush(timeout=5)  # not retried forever
    assert (_state(store.inner, "a"), _state(store.inner, "b")) == (QUEUED, QUEUED)
    writer.put(change("c", QUEUED, name="t"))  # later changes still flow
    assert writer.flush(timeout=5)
    assert _state(store.inner, "c") == QUEUED


def test_flush_does_not_wait_on_a_store_that_is_down() -> None:
    class DownStore(CountingStore):
        def write(self, changes: Any) -> None:
            raise ConnectionError("store down")

    store: Any = DownStore()
    writer = QueuedWriter(store, linger=0.01)
    writer.put(change("a", QUEUED, name="t"))
    deadline = time.monotonic() + 5
    while not writer._failing:  # the thread has met the outage
        assert time.monotonic() < deadline
        time.sleep(0.01)
    started = time.monotonic()
    assert writer.flush(timeout=10) is False  # the row stays buffered; the caller goes on
    assert time.monotonic() - started < 1


def test_a_deferred_meta_is_computed_only_when_its_row_is_written_on_its_own() -> None:
    from celery_tq.registry.writer import Deferred, resolved

    calls: list[str] = []

    def meta(name: str) -> Deferred:
        return Deferred(lambda: calls.append(name) or f'{{"status": "STARTED", "who": "{name}"}}')

    started = change("a", "STARTED", meta=meta("a"), worker="w1")
    alone = change("b", "STARTED", meta=meta("b"), worker="w1")
    outcome = change("a", "SUCCESS", result="1", meta='{"status": "SUCCESS"}')
    batch = [started, alone, outcome]

    written = resolved(batch)

    assert calls == ["b"]  # a's outcome supersedes its STARTED in the same batch: never built
    assert "meta" not in written[0] and written[0]["worker"] == "w1"  # the rest of the row goes on
    assert written[1]["meta"] == '{"status": "STARTED", "who": "b"}'
    assert written[2] is outcome
    assert isinstance(started["meta"], Deferred)  # the caller's rows are not changed (put back on failure)
    assert resolved([outcome]) == [outcome]


def test_a_buffered_started_carries_its_meta_when_written_alone_and_never_hides_the_outcome() -> None:
    from celery_tq.registry.writer import Deferred

    store = _store()
    enqueue(
        store, change("long", "STARTED", meta=Deferred(lambda: '{"status": "STARTED", "result": {"pid": 7}}'))
    )
    flush_pending(store)
    assert store.read(["long"])[0]["meta"] == '{"status": "STARTED", "result": {"pid": 7}}'

    enqueue(store, change("short", "STARTED", meta=Deferred(lambda: '{"status": "STARTED"}'), worker="w1"))
    assert write_with_retry(
        store, [change("short", "SUCCESS", result="2", meta='{"status": "SUCCESS"}')], "t"
    )
    row = store.read(["short"])[0]
    assert (row["state"], row["meta"], row["worker"]) == ("SUCCESS", '{"status": "SUCCESS"}', "w1")


def test_a_deferred_meta_that_fails_to_build_is_logged_and_the_row_still_written(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from celery_tq.registry.writer import Deferred

    def broken() -> str:
        raise ValueError("cannot encode")

    store = _store()
    enqueue(store, change("bad", "STARTED", meta=Deferred(broken), worker="w1"))
    with caplog.at_level(logging.ERROR, logger="celery_tq.registry"):
        flush_pending(store)
    assert store.read(["bad"])[0]["state"] == "STARTED"
    assert "result meta of task bad not recorded" in caplog.text
