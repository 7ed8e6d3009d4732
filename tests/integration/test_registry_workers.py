"""Every task leaves one record, through real workers, on each of the four stores."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, chain

import celery_tq
from celery_tq.registry import Registry
from celery_tq.registry.record import progress_of
from celery_tq.testing import WorkerProcess
from tests.registry_support import STORE_KINDS, pg_url, store_url

from .conftest import APPS, tqshop

__all__ = ["pg_url"]


@dataclass
class RegistryShop:
    kind: str
    app: Celery
    registry: Registry
    start: Any


@pytest.fixture(params=STORE_KINDS)
def registry_shop(request: pytest.FixtureRequest, data_dir: str) -> Iterator[RegistryShop]:
    kind = request.param
    backend = "tq+" + store_url(kind, request, Path(data_dir))
    broker = "memory://" if kind == "memory" else request.getfixturevalue("redis_dbs")[0]
    app = tqshop.make_app(broker, backend)
    if kind == "memory":
        app.conf.broker_transport_options = {"polling_interval": 0.01}
    system = celery_tq.system_for(app)
    workers: list[WorkerProcess] = []

    def start() -> None:
        if kind == "memory":  # one process: the in-process worker
            system.start(concurrency=2)
            return
        env = {
            "TQSHOP_BROKER_URL": broker,
            "TQSHOP_RESULT_BACKEND": backend,
            "TQ_DATA_DIR": data_dir,
            "PYTHONPATH": f"{APPS}:{Path(__file__).parents[2]}",
        }
        workers.append(WorkerProcess("tqshop", env=env, concurrency=2).start())

    yield RegistryShop(kind, app, system.registry, start)
    system.shutdown()
    for worker in workers:
        worker.stop()
    app.close()


def watch(registry: Registry, task_id: str, timeout: float = 30.0) -> list[str]:
    """Every state the record shows until it is terminal, in the order seen; each one is at
    least as far along as the one before (a retry's attempt counts: RETRY then STARTED of
    attempt 1 is forward)."""
    seen: list[tuple[str, int]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = registry.get(task_id)
        if record is not None and (not seen or seen[-1] != (record.state, record.retries)):
            seen.append((record.state, record.retries))
        if seen and seen[-1][0] in {"SUCCESS", "FAILURE", "REVOKED", "REJECTED"}:
            assert_forward(seen)
            return [state for state, _ in seen]
        time.sleep(0.01)
    raise AssertionError(f"{task_id} never finished; seen {seen}")


def wait_scheduled(app: Celery, task_id: str, timeout: float = 30.0) -> None:
    """Until a worker says it holds ``task_id`` for its ETA (``celery inspect scheduled``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        replies = app.control.inspect(timeout=0.5).scheduled() or {}
        if any(entry["request"]["id"] == task_id for entries in replies.values() for entry in entries):
            return
    raise AssertionError(f"no worker holds {task_id}")


def assert_forward(seen: list[tuple[str, int]]) -> None:
    progress = [progress_of(state, retries) for state, retries in seen]
    assert progress == sorted(progress), seen


def test_every_task_is_recorded_from_queued_to_its_end(registry_shop: RegistryShop) -> None:
    app, registry = registry_shop.app, registry_shop.registry
    sleep = app.tasks["tqshop.sleep"]
    queued = sleep.apply_async((0.5,), tags={"billing", "vip"}, priority=8)

    record = registry.get(queued.id)  # no worker runs yet
    # the registry says QUEUED; Celery, which has no such state, reads PENDING
    assert record is not None and record.state == "QUEUED" and queued.state == "PENDING"
    assert (record.name, record.priority, record.tags) == ("tqshop.sleep", 8, frozenset({"billing", "vip"}))
    assert record.queue == "tq.default" and record.args_repr == "(0.5,)"
    assert registry.get("never-sent") is None

    registry_shop.start()
    assert watch(registry, queued.id)[-2:] == ["STARTED", "SUCCESS"]  # QUEUED was seen above
    done = registry.get(queued.id)
    assert done is not None and done.result == 0.5 and queued.get(timeout=10) == 0.5
    assert done.worker and done.runtime is not None and 0.4 < done.runtime < 5
    assert done.submitted_at and done.started_at and done.finished_at
    assert done.submitted_at <= done.started_at <= done.finished_at

    failed = app.tasks["tqshop.slow_fail"].delay(0.5)
    assert watch(registry, failed.id)[-2:] == ["STARTED", "FAILURE"]
    record = registry.get(failed.id)
    assert record is not None and record.error is not None
    assert (record.error["type"], record.error["args"]) == ("InvalidInput", ["card declined"])
    assert "card declined" in (record.error["traceback"] or "")
    assert failed.state == "FAILURE" and "InvalidInput" in (failed.traceback or "")

    retried = app.tasks["tqshop.retry_once"].delay()
    seen = watch(registry, retried.id)
    assert "RETRY" in seen and seen[-1] == "SUCCESS", seen
    record = registry.get(retried.id)
    assert record is not None and (record.retries, record.result, record.error) == (1, 1, None)

    revoked = sleep.apply_async((5,), countdown=3)
    wait_scheduled(app, revoked.id)  # the worker holds it until its ETA
    record = registry.get(revoked.id)
    assert record is not None and record.state == "QUEUED"
    revoked.revoke()
    # Celery 5.7's worker stores REVOKED as it gets the revoke (no reply is awaited): that may be
    # before the first look here
    assert watch(registry, revoked.id) in (["QUEUED", "REVOKED"], ["REVOKED"])
    record = registry.get(revoked.id)
    assert record is not None and record.error and record.error["type"] == "Cancelled"

    # queries by each filter
    assert [r.id for r in registry.query(tags={"vip"})] == [queued.id]
    assert [r.id for r in registry.query(state="FAILURE", tags={"billing"})] == [failed.id]
    assert [r.id for r in registry.query(name="tqshop.retry_once")] == [retried.id]
    assert [r.id for r in registry.query(priority=8)] == [queued.id]
    assert {r.id for r in registry.query(queue="tq.default")} >= {queued.id, failed.id, retried.id}
    assert [r.id for r in registry.query(since=record.submitted_at)] == [revoked.id]  # type: ignore[union-attr]
    assert queued.id not in [r.id for r in registry.query(until=done.submitted_at.timestamp() - 1)]
    assert len(registry.query(limit=2)) == 2
    assert registry.counts() == {"SUCCESS": 2, "FAILURE": 1, "REVOKED": 1}

    # a chain's records share its root id
    result = chain(app.signature("tqshop.add", (1, 2)), app.signature("tqshop.add", (3,))).delay()
    assert result.get(timeout=30) == 6
    root = result.parent.id
    records = registry.query(root_id=root)
    assert sorted(r.id for r in records) == sorted([root, result.id])
    assert all(r.state == "SUCCESS" for r in records)
    assert registry.get(result.id).parent_id == root  # type: ignore[union-attr]


def test_custom_progress_states_and_ignored_results_are_recorded(registry_shop: RegistryShop) -> None:
    app, registry = registry_shop.app, registry_shop.registry
    registry_shop.start()
    running = app.tasks["tqshop.progress"].delay(1.5)
    deadline = time.monotonic() + 30
    while running.state != "PROGRESS":
        assert time.monotonic() < deadline, f"no PROGRESS state seen (last {running.state})"
        time.sleep(0.02)
    assert running.info == {"done": 1, "of": 2}  # Celery's meta, as update_state stored it
    record = registry.get(running.id)
    assert record is not None and record.state == "PROGRESS"
    assert [r.id for r in registry.query(state="PROGRESS")] == [running.id]
    assert running.get(timeout=30) == "finished"
    assert registry.get(running.id).state == "SUCCESS"  # type: ignore[union-attr]

    ignored = app.tasks["tqshop.add"].apply_async((2, 3), ignore_result=True)
    deadline = time.monotonic() + 30
    while (r := registry.get(ignored.id)) is None or r.state != "SUCCESS":
        assert time.monotonic() < deadline, f"the ignored-result task's record: {r}"
        time.sleep(0.05)
    assert r.result == 5


def test_concurrent_clients_and_worker_processes_leave_one_record_per_task(
    registry_shop: RegistryShop,
) -> None:
    registry_shop.start()
    add = registry_shop.app.tasks["tqshop.add"]
    results: list[Any] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        for i in range(15):
            result = add.apply_async((n, i), tags={f"client-{n}"})
            with lock:
                results.append(result)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.get(timeout=60) for r in results) == sorted(n + i for n in range(4) for i in range(15))
    registry = registry_shop.registry
    records = registry.query(name="tqshop.add", limit=1000)
    assert sorted(r.id for r in records) == sorted(r.id for r in results)
    for record in records:
        n, i = (int(x) for x in (record.args_repr or "").strip("()").split(","))
        assert (record.state, record.result, record.tags) == ("SUCCESS", n + i, frozenset({f"client-{n}"}))
        assert record.retries == 0 and record.worker and record.runtime is not None
    assert registry.counts(tags={"client-2"}) == {"SUCCESS": 15}


@pytest.mark.parametrize("registry_shop", ["redis", "postgresql"], indirect=True)
def test_a_short_tasks_get_reads_nothing_from_the_store(
    registry_shop: RegistryShop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``apply_async(...).get()`` of a short task, in a process that has waited before: the
    wake-up carries the result (Redis PUBLISH, PostgreSQL NOTIFY), so the caller reads no record
    (earlier releases read it twice on Redis). A read is allowed where a run took longer than
    the first wait (a loaded machine). (SQLite and the memory store cannot wake a waiter.)"""
    registry_shop.start()
    add, store = registry_shop.app.tasks["tqshop.add"], registry_shop.registry.store
    assert add.delay(1, 1).get(timeout=30) == 2  # the listener is open from here on
    reads: list[int] = []
    real_read = store.read
    monkeypatch.setattr(store, "read", lambda ids: reads.append(len(ids)) or real_read(ids))
    assert [add.delay(n, 1).get(timeout=30) for n in range(20)] == [n + 1 for n in range(20)]
    assert len(reads) < 10, reads  # two per get() before: 40
    if registry_shop.kind == "redis":  # a task whose result is ignored is not listened for
        ignored = add.apply_async((1, 1), ignore_result=True)
        assert store.client.pubsub_channels(store._done(ignored.id)) == []  # type: ignore[attr-defined]
