"""The background writer: batches after a short linger, retraction, and flush on demand."""

from __future__ import annotations

import time
import uuid
from typing import Any

from celery_tq.registry import Store, store_for_url
from celery_tq.registry.record import QUEUED, change
from celery_tq.registry.writer import QueuedWriter


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
    writer.put(change("a", QUEUED, name="t"))
    time.sleep(0.05)  # the thread now lingers
    assert writer.flush(timeout=5)
    assert _state(store, "a") == QUEUED


def test_a_short_task_takes_its_started_back_before_it_is_written() -> None:
    store = _store()
    writer = QueuedWriter(store, linger=60)
    writer.put(change("a", QUEUED, name="t"))
    writer.put(change("b", "STARTED", name="t", started_at=1.0))
    started = writer.retract("b", "STARTED")
    assert started is not None and started["started_at"] == 1.0
    assert writer.retract("b", "STARTED") is None  # taken once
    assert writer.retract("a", "STARTED") is None  # only the state asked for
    assert writer.flush(timeout=5)
    assert _state(store, "b") is None  # never written by the writer
    assert _state(store, "a") == QUEUED


def test_retracting_everything_leaves_nothing_to_wait_for() -> None:
    store = _store()
    writer = QueuedWriter(store, linger=60)
    writer.put(change("b", "STARTED", name="t"))
    assert writer.retract("b", "STARTED") is not None
    assert writer.flush(timeout=5)
    writer.put(change("c", QUEUED, name="t"))  # the thread still serves later changes
    assert writer.flush(timeout=5)
    assert _state(store, "c") == QUEUED
