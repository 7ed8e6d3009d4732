"""Every store keeps one consistent record per task: forward-only, queryable, purgeable."""

from __future__ import annotations

import contextlib
import json
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_tq.errors import StorageError
from celery_tq.registry import Registry, Store, store_for_url
from celery_tq.registry.record import change
from tests.private_redis import PrivateRedis
from tests.registry_support import STORE_KINDS, pg_url, store_url
from tests.waiting import wait_for

__all__ = ["pg_url"]  # the fixture, used through store_url


@pytest.fixture(params=STORE_KINDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    return store_for_url(store_url(request.param, request, tmp_path))


def lifecycle(task_id: str, t0: float, tags: Any = ("billing",)) -> list[dict[str, Any]]:
    fields = {"name": "shop.charge", "priority": 7, "tags": tags, "queue": "tq.default"}
    return [
        change(task_id, "QUEUED", 0, submitted_at=t0, args_repr="(5,)", root_id=task_id, **fields),
        change(task_id, "STARTED", 0, submitted_at=t0 + 1, started_at=t0 + 1, worker="w1", **fields),
        change(task_id, "RETRY", 1, submitted_at=t0 + 2, error=json.dumps({"type": "ResourceUnavailable"})),
        change(task_id, "STARTED", 1, submitted_at=t0 + 3, started_at=t0 + 3, worker="w2", **fields),
        change(task_id, "SUCCESS", 1, submitted_at=t0 + 4, finished_at=t0 + 4.5, result="42", **fields),
    ]


@pytest.mark.parametrize("order", ["in order", "reversed", "shuffled", "duplicated"])
def test_states_only_move_forward_whatever_order_writes_arrive_in(store: Store, order: str) -> None:
    writes = lifecycle("t1", 1000.0)
    if order == "reversed":
        writes.reverse()
    elif order == "shuffled":
        random.Random(4).shuffle(writes)
    elif order == "duplicated":
        writes = writes + writes[:2]  # a late, duplicated QUEUED and STARTED
    for write in writes:
        store.write([write])
    record = Registry(store).get("t1")
    assert record is not None
    assert (record.state, record.retries, record.result, record.error) == ("SUCCESS", 1, 42, None)
    assert (record.worker, record.started_at and record.started_at.timestamp()) == ("w2", 1003.0)
    assert record.submitted_at and record.submitted_at.timestamp() == 1000.0  # the publish time
    assert record.runtime == pytest.approx(1.5)
    assert (record.name, record.priority, record.tags, record.args_repr) == (
        "shop.charge",
        7,
        frozenset({"billing"}),
        "(5,)",
    )


TEXTS = ['é ü 😀 \n " \\ \x01 end', "[1, 2]", "null", "", '{"a": 1}', "x" * 20_000]


@pytest.mark.parametrize(
    "text", TEXTS, ids=["unicode-and-controls", "json-list", "null", "empty", "json", "long"]
)
def test_every_store_keeps_text_values_and_times_exactly(store: Store, text: str) -> None:
    submitted = 1_796_164_567.010274  # a float with every digit significant
    queued = change("t", "QUEUED", 0, submitted_at=submitted, name="shop.charge", args_repr=text)
    done = change(
        "t",
        "SUCCESS",
        0,
        submitted_at=submitted + 1,
        started_at=submitted + 0.5,
        finished_at=submitted + 0.75,
        kwargs_repr=text,
        result=json.dumps(text),
    )
    other = change("u", "QUEUED", 0, submitted_at=submitted, args_repr=text)  # a batch of two rows
    for batch in ([queued], [done]), ([queued, done, other],):
        store.delete("t")
        for write in batch:
            store.write(write)
        record = Registry(store).get("t")
        assert record is not None
        assert (record.args_repr, record.kwargs_repr, record.result) == (text, text, text)
        if other in batch[0]:
            assert Registry(store).get("u").args_repr == text  # type: ignore[union-attr]
        assert record.submitted_at is not None and record.submitted_at.timestamp() == pytest.approx(
            submitted, abs=1e-6
        )
        assert record.runtime == pytest.approx(0.25, abs=1e-6)


def test_next_attempt_is_newer_than_the_retry_before_it(store: Store) -> None:
    writes = lifecycle("t1", 1000.0)
    store.write(writes[:3])
    assert Registry(store).get("t1").state == "RETRY"  # type: ignore[union-attr]
    store.write([writes[3], writes[2]])  # the RETRY again, late
    record = Registry(store).get("t1")
    assert record is not None and (record.state, record.retries, record.error) == ("STARTED", 1, None)


def test_get_is_none_for_an_id_never_sent(store: Store) -> None:
    assert Registry(store).get("never-sent") is None


def test_queries_by_each_filter_newest_first(store: Store) -> None:
    t0 = time.time() - 100
    rows = [
        change("a", "SUCCESS", 0, submitted_at=t0, name="shop.charge", tags=["billing"], priority=7),
        change("b", "FAILURE", 0, submitted_at=t0 + 10, name="shop.charge", tags=["billing", "vip"]),
        change("c", "FAILURE", 0, submitted_at=t0 + 20, name="shop.ship", tags=["shipping"], queue="tq.low"),
        change("d", "QUEUED", 0, submitted_at=t0 + 30, name="shop.ship", root_id="a", priority=2),
    ]
    store.write(rows)
    registry = Registry(store)

    def ids(**filters: Any) -> list[str]:
        return [r.id for r in registry.query(**filters)]

    assert ids() == ["d", "c", "b", "a"]
    assert ids(state="FAILURE") == ["c", "b"]
    assert ids(tags={"billing"}) == ["b", "a"]
    assert ids(tags={"billing", "vip"}) == ["b"]
    assert ids(tags="billing", state="FAILURE") == ["b"]
    assert ids(name="shop.ship") == ["d", "c"]
    assert ids(queue="tq.low") == ["c"]
    assert ids(priority=7) == ["a"]
    assert ids(root_id="a") == ["d"]
    assert ids(since=t0 + 5, until=t0 + 25) == ["c", "b"]
    assert ids(limit=2) == ["d", "c"]
    assert registry.counts() == {"SUCCESS": 1, "FAILURE": 2, "QUEUED": 1}
    assert registry.counts(tags={"billing"}) == {"SUCCESS": 1, "FAILURE": 1}
    assert registry.counts(state="FAILURE", name="shop.ship") == {"FAILURE": 1}


def test_concurrent_writers_leave_one_consistent_record_per_task(store: Store) -> None:
    task_ids = [f"task-{i}" for i in range(40)]
    writes = [w for i, t in enumerate(task_ids) for w in lifecycle(t, 1000.0 + i)]
    random.Random(7).shuffle(writes)
    chunks = [writes[i::4] for i in range(4)]
    errors: list[BaseException] = []

    def writer(chunk: list[dict[str, Any]]) -> None:
        try:
            for write in chunk:
                store.write([write])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(c,)) for c in chunks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    registry = Registry(store)
    records = registry.query(limit=1000)
    assert sorted(r.id for r in records) == sorted(task_ids)
    assert {(r.state, r.retries, r.worker, r.result) for r in records} == {("SUCCESS", 1, "w2", 42)}
    assert registry.counts(tags={"billing"}) == {"SUCCESS": 40}


def test_purge_deletes_only_records_older_than_the_cutoff(store: Store) -> None:
    now = time.time()
    store.write([change("old", "SUCCESS", 0, submitted_at=now - 3600, tags=["billing"])])
    store.write([change("new", "SUCCESS", 0, submitted_at=now - 60, tags=["billing"])])
    registry = Registry(store)
    assert registry.purge(1800) == 1
    assert registry.get("old") is None
    assert [r.id for r in registry.query(tags={"billing"})] == ["new"]


def test_corrupt_record_is_a_storage_error_naming_its_id(store: Store) -> None:
    store.write([change("bad", "SUCCESS", 0, submitted_at=time.time(), tags=["billing"])])
    store.write([change("good", "SUCCESS", 0, submitted_at=time.time(), tags=["billing"])])
    corrupt(store, "bad")
    registry = Registry(store)
    with pytest.raises(StorageError) as caught:
        registry.get("bad")
    assert caught.value.record_id == "bad"
    assert [r.id for r in registry.query()] == ["good"]  # the query survives, skipping it


def corrupt(store: Any, task_id: str) -> None:
    if hasattr(store, "client"):  # redis
        store.client.hset(f"tq:t:{task_id}", "tags", "{not json")
    elif hasattr(store, "engine"):
        from sqlalchemy import update

        from celery_tq.registry.sql import tasks

        with store.engine.begin() as conn:
            conn.execute(update(tasks).where(tasks.c.id == task_id).values(tags="{not json"))
    else:
        store._rows[task_id]["result"] = "{not json"


def test_key_value_space_counts_for_chords(store: Store) -> None:
    assert [store.kv_incr("chord-x", None) for _ in range(3)] == [1, 2, 3]
    store.kv_set("group-y", b"payload", 60)
    assert store.kv_get(["group-y", "missing"]) == [b"payload", None]
    store.kv_delete("group-y")
    assert store.kv_get(["group-y"]) == [None]


def test_a_waiter_is_woken_by_the_outcome_write_where_the_store_can(store: Store) -> None:
    store.write([change("w", "QUEUED", 0, submitted_at=time.time())])

    def ready(task_id: str) -> bool:
        row = store.read([task_id])[0]
        return row is not None and row["state"] == "SUCCESS"

    woke: list[bool] = []
    waiter = threading.Thread(target=lambda: woke.append(store.wait_for_outcome("w", 30.0, ready)))
    waiter.start()
    time.sleep(0.3)  # the waiter listens by now (a write before that is caught by `ready`)
    store.write([change("w", "STARTED", 0, submitted_at=time.time())])  # not the outcome
    store.write([change("w", "SUCCESS", 0, submitted_at=time.time(), result="1")])
    waiter.join(10.0)  # far below the 30 s it would wait unwoken
    assert not waiter.is_alive()
    assert woke == [not store.url.startswith("sqlite")]  # SQLite cannot wake anyone: callers poll


@pytest.mark.parametrize("size", ["small", "past a notification's 8,000 bytes"])
@pytest.mark.parametrize("kind", ["postgresql", "redis"])
def test_the_wake_up_carries_the_record_a_read_would_give(
    kind: str, size: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    import uuid

    store = store_for_url(store_url(kind, request, tmp_path))
    task_id = f"n {uuid.uuid4().hex}"  # never a record or wake-up of an earlier test
    result = json.dumps("x" * (20 if size == "small" else 9_000))
    store.write([change(task_id, "QUEUED", 0, submitted_at=time.time(), tags=("vip",), name="shop.charge")])
    woke: list[bool] = []
    waiter = threading.Thread(
        target=lambda: woke.append(store.wait_for_outcome(task_id, 30.0, lambda _: False))
    )
    waiter.start()
    time.sleep(0.3)  # listening by now
    store.write([change(task_id, "SUCCESS", 0, submitted_at=time.time(), result=result, worker="w1")])
    waiter.join(10.0)
    assert woke == [True]
    carried = store.notified_row(task_id)
    if size == "small":
        assert carried == store.read([task_id])[0]  # same columns, types and values
        assert carried is not None and (carried["state"], carried["result"]) == ("SUCCESS", result)
    else:
        assert carried is None, {k: str(v)[:80] for k, v in carried.items()}  # too big: read it
    assert store.notified_row(task_id) is None  # taken once


def test_a_postgresql_registry_never_takes_the_notice_of_another_schemas_registry(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    import uuid

    import psycopg

    from tests.registry_support import PG_DSN

    mine = store_for_url(store_url("postgresql", request, tmp_path))
    schema = f"tq_test_{uuid.uuid4().hex[:10]}"  # a second registry in the same database
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        theirs: Any = store_for_url(f"{PG_DSN}?options=-csearch_path%3D{schema}")
        theirs.write([change("shared-id", "QUEUED", 0, submitted_at=time.time())])
        woke: list[bool] = []
        waiter = threading.Thread(
            target=lambda: woke.append(mine.wait_for_outcome("shared-id", 2.0, lambda _: False))
        )
        waiter.start()
        time.sleep(0.3)  # listening by now
        theirs.write([change("shared-id", "SUCCESS", 0, submitted_at=time.time(), result='"theirs"')])
        waiter.join(10.0)
        assert woke == [True]  # its wait ran out
        assert mine.notified_row("shared-id") is None  # the other registry's row never reaches it
    finally:
        theirs.close()
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def test_a_redis_registry_never_takes_the_wake_up_of_another_databases_registry(
    request: pytest.FixtureRequest,
) -> None:
    """Redis pub/sub spans a server's databases: a waiter of the registry in one database is
    neither woken by nor handed the record of the same task id in another database's."""
    import uuid

    from celery_tq.registry.redis import RedisStore

    theirs_url, mine_url = request.getfixturevalue("redis_dbs")  # two databases of one server
    mine, theirs = RedisStore(mine_url), RedisStore(theirs_url)
    task_id = f"shared {uuid.uuid4().hex}"
    mine.write([change(task_id, "QUEUED", 0, submitted_at=time.time())])
    theirs.write([change(task_id, "QUEUED", 0, submitted_at=time.time())])
    woke: list[bool] = []
    started = time.monotonic()
    waiter = threading.Thread(
        target=lambda: woke.append(mine.wait_for_outcome(task_id, 2.0, lambda _: False))
    )
    waiter.start()
    time.sleep(0.3)  # listening by now
    theirs.write([change(task_id, "SUCCESS", 0, submitted_at=time.time(), result='"theirs"')])
    waiter.join(10.0)
    assert woke == [True] and time.monotonic() - started >= 2.0  # its wait ran out
    assert mine.notified_row(task_id) is None  # the other registry's row never reaches it


def test_the_redis_store_reloads_its_script_after_a_script_flush(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path)  # SCRIPT FLUSH is server-wide: never on the shared Redis
    server.start()
    try:
        store: Any = store_for_url(f"{server.url}/0")
        store.write([change("a", "QUEUED", 0, submitted_at=1.0), change("b", "QUEUED", 0, submitted_at=1.0)])
        store.client.script_flush()  # as after a restart of a server without persistence
        store.write(
            [change("a", "SUCCESS", 0, submitted_at=1.0), change("b", "SUCCESS", 0, submitted_at=1.0)]
        )
        assert [r["state"] for r in store.read(["a", "b"])] == ["SUCCESS", "SUCCESS"]
    finally:
        server.stop()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_version_2_schema_gains_deliveries_and_keeps_its_records(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    from celery_tq.registry.sql import SCHEMA_VERSION, SqlStore

    url = store_url(kind, request, tmp_path)
    old = SqlStore(url)
    old.write([change("ran", "SUCCESS", 0, submitted_at=1.0, started_at=2.0, finished_at=3.0)])
    old.write([change("waits", "QUEUED", 0, submitted_at=1.0)])
    with old.engine.begin() as conn:  # what celery-tq 0.x with schema version 2 left behind
        for column in ("deliveries", "run_id"):
            conn.exec_driver_sql(f"ALTER TABLE tq_tasks DROP COLUMN {column}")
        conn.exec_driver_sql("UPDATE tq_schema SET version = 2")
    old.close()
    store = SqlStore(url)
    registry = Registry(store)
    ran, waits = registry.get("ran"), registry.get("waits")
    assert ran is not None and waits is not None
    assert (ran.state, ran.deliveries, waits.deliveries) == ("SUCCESS", 1, 0)
    store.write([change("waits", "STARTED", 0, worker="w", run_id="r1", deliveries=1)])
    assert registry.get("waits").deliveries == 1  # type: ignore[union-attr]
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT version FROM tq_schema").scalar() == SCHEMA_VERSION
    store.close()


def until_subscribed(store: Any, task_id: str) -> None:
    """Redis has taken the subscription ``RedisStore.published`` sent without waiting for its
    answer. In a real round trip the task's way through the broker and the worker gives it that
    time; a test that writes the outcome at once must wait, or the outcome's ``PUBLISH`` (on
    another connection) can reach Redis first."""
    channel = store._done(task_id)
    wait_for(
        lambda: dict(store.client.pubsub_numsub(channel)).get(channel.encode(), 0) >= 1,
        timeout=5.0,
        what=f"Redis to take the subscription to {channel}",
        interval=0.005,
    )


@contextlib.contextmanager
def registry_session(pg_url: str) -> Iterator[tuple[Any, str]]:
    """A session of the test's own (autocommit, in its schema) and the registry's notification
    channel there."""
    import psycopg

    from celery_tq.registry.sql_merge import NOTIFY_CHANNEL_SQL

    schema = pg_url.rsplit("%3D", 1)[1]
    with psycopg.connect(pg_url.split("?")[0], autocommit=True, options=f"-csearch_path={schema}") as conn:
        yield conn, conn.execute(f"SELECT {NOTIFY_CHANNEL_SQL}").fetchone()[0]  # type: ignore[index]


@pytest.mark.parametrize("kind", ["postgresql", "redis"])
def test_a_wait_for_a_task_sent_while_listening_reads_nothing(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """``get()`` of a task this process sent while its listener was open waits for the wake-up
    first; a short task's wake-up carries its record, so no read is made at all."""
    from celery_tq.registry.redis import RedisStore

    url = store_url(kind, request, tmp_path)
    store: Any = RedisStore(url) if kind == "redis" else store_for_url(url)  # not listening yet
    reads: list[str] = []

    def is_ready(task_id: str) -> bool:
        reads.append(task_id)
        return False

    def subscribed(task_id: str) -> None:
        if kind == "redis":  # PostgreSQL listens on one channel for the whole registry
            until_subscribed(store, task_id)

    store.published("before")  # no listener yet: nothing is noted
    store.write([change("before", "SUCCESS", 0, submitted_at=time.time(), result="1")])
    assert store.wait_for_outcome("before", 5.0, is_ready) and reads == ["before"]  # read as ever

    store.published("sent")  # the listener is open now
    subscribed("sent")
    writer = threading.Timer(
        0.02, lambda: store.write([change("sent", "SUCCESS", 0, submitted_at=time.time(), result="2")])
    )
    writer.start()
    assert store.wait_for_outcome("sent", 5.0, is_ready)
    writer.join()
    assert reads == ["before"]  # none for "sent"
    assert (store.notified_row("sent") or {}).get("result") == "2"

    store.published("done first")  # its outcome is written before anyone waits
    subscribed("done first")
    store.write([change("done first", "SUCCESS", 0, submitted_at=time.time(), result="3")])
    assert store.wait_for_outcome("done first", 5.0, is_ready)
    assert reads == ["before"] and (store.notified_row("done first") or {}).get("result") == "3"

    store.published("slow")  # still running after the first wait: read once, as for any task
    started = time.monotonic()
    assert store.wait_for_outcome("slow", 0.3, is_ready)
    assert reads == ["before", "slow"] and time.monotonic() - started >= 0.3


def test_a_redis_client_that_sends_without_waiting_subscribes_to_one_task_ahead_at_most(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A process that waited once subscribes to the next task it sends; one that then sends
    many tasks without waiting holds that one subscription and no more (sending costs it
    nothing), and a wait for another task ends it."""
    from celery_tq.registry.redis import RedisStore

    store: Any = RedisStore(store_url("redis", request, tmp_path))
    # this test's channels only: a worker process's earlier test may hold one subscription ahead
    # in this database (a task it sent and did not wait for), under a hex task id
    channels = store._done("t*")
    store.write([change("first", "SUCCESS", 0, submitted_at=time.time(), result="1")])
    assert store.wait_for_outcome("first", 1.0, lambda _: True)  # the listener is open now
    sent = [f"t{n}" for n in range(200)]
    for task_id in sent:
        store.published(task_id)
        if task_id == "t0":  # the one subscribed ahead
            until_subscribed(store, task_id)
        store.write([change(task_id, "SUCCESS", 0, submitted_at=time.time(), result=f'"{task_id}"')])
    assert store.client.pubsub_channels(channels) == [store._done("t0").encode()]
    reads: list[str] = []

    def is_ready(task_id: str) -> bool:
        reads.append(task_id)
        return True

    assert store.wait_for_outcome("t0", 1.0, is_ready)  # subscribed ahead: no read
    assert reads == [] and (store.notified_row("t0") or {}).get("result") == '"t0"'
    assert store.wait_for_outcome("t150", 1.0, is_ready) and reads == ["t150"]  # read as ever
    store.published("forgotten")
    store.delete("forgotten")  # AsyncResult.forget(): its subscription ends too
    store.published("last")
    assert store._expected == "last"
    assert store.wait_for_outcome("t151", 1.0, is_ready) and reads == ["t150", "t151"]
    wait_for(  # UNSUBSCRIBE is sent without waiting for Redis's answer
        lambda: not store.client.pubsub_channels(store._done("last")), timeout=5.0, interval=0.01
    )
    assert store.client.pubsub_channels(store._done("last")) == []  # the wait for t151 ended it
    assert store.client.pubsub_channels(channels) == []


def test_a_redis_wait_survives_the_loss_of_its_listening_connection(tmp_path: Path) -> None:
    """The connection subscribed when the task was sent is killed before the outcome is written:
    the wake-up is lost, and ``get()``'s wait reads the record after its first short wait."""
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        store: Any = store_for_url(f"{server.url}/0")
        assert store.wait_for_outcome("warm-up", 0.01, lambda _: True)  # the listener is open now
        store.published("t")
        until_subscribed(store, "t")
        assert store.client.client_kill_filter(_type="pubsub") == 1
        store.write([change("t", "SUCCESS", 0, submitted_at=time.time(), result="7")])
        started = time.monotonic()
        assert store.wait_for_outcome("t", 5.0, lambda _: False)  # returns: the caller reads
        assert time.monotonic() - started < 1.0  # not the 5 s it would wait for a lost wake-up
        assert store.notified_row("t") is None and store.read(["t"])[0]["result"] == "7"
        store.published("u")  # and the next task is subscribed to again
        until_subscribed(store, "u")
        store.write([change("u", "SUCCESS", 0, submitted_at=time.time(), result="8")])
        assert store.wait_for_outcome("u", 5.0, lambda _: False)
        assert (store.notified_row("u") or {}).get("result") == "8"
    finally:
        server.stop()


def test_a_backlog_of_any_size_names_its_oldest_waiting_task_per_priority(store: Store) -> None:
    """``tq status``'s "oldest waiting" with more QUEUED records than it reads newest-first
    (2,000): an oldest-first query per priority finds the task that really waits longest."""
    from celery_tq.monitoring.monitor import RECENT_LIMIT, oldest_waiting

    now = time.time()
    backlog = [
        change(f"q{n:05d}", "QUEUED", 0, submitted_at=now - 3600 + n, name="shop.ship", priority=4)
        for n in range(RECENT_LIMIT + 500)
    ]
    backlog.append(change("urgent", "QUEUED", 0, submitted_at=now - 5, name="shop.alert", priority=9))
    backlog.append(change("ran", "SUCCESS", 0, submitted_at=now - 7200, name="shop.ship", priority=4))
    for start in range(0, len(backlog), 500):
        store.write(backlog[start : start + 500])
    registry = Registry(store)
    waiting = oldest_waiting(registry, now)
    assert list(waiting) == [9, 4]
    assert (waiting[4]["id"], waiting[4]["name"]) == ("q00000", "shop.ship")
    assert 3599 <= waiting[4]["age_s"] <= 3601 and waiting[9]["id"] == "urgent"
    oldest = registry.query(state="QUEUED", limit=3, oldest_first=True)
    assert [r.id for r in oldest] == ["q00000", "q00001", "q00002"]
    assert [r.id for r in registry.query(state="QUEUED", limit=2)] == ["urgent", f"q{RECENT_LIMIT + 499:05d}"]


@pytest.mark.parametrize("bad", ["nul", "priority"], ids=["a NUL in a text", "a priority past int2"])
def test_a_postgresql_batch_with_one_record_it_cannot_hold_writes_the_others(
    pg_url: str, bad: str, caplog: pytest.LogCaptureFixture
) -> None:
    from celery_tq.registry.writer import write_isolating

    store = store_for_url(pg_url)
    now = time.time()
    rows = [change(f"ok{i}", "SUCCESS", 0, submitted_at=now, priority=5, result="1") for i in range(4)]
    refused = {"nul": {"result": "a\x00b"}, "priority": {"priority": 99_999}}[bad]
    rows.insert(2, change("bad", "SUCCESS", 0, submitted_at=now, **refused))
    with caplog.at_level("ERROR", logger="celery_tq.registry"):
        write_isolating(store, rows)  # the batch statement fails: each row alone, "bad" dropped
    assert sorted(r.id for r in Registry(store).query()) == [f"ok{i}" for i in range(4)]
    assert "bad" in caplog.text


def test_a_postgresql_store_writes_on_a_new_session_after_its_own_was_terminated(pg_url: str) -> None:
    import psycopg

    store = store_for_url(pg_url)
    now = time.time()
    store.write([change("before", "SUCCESS", 0, submitted_at=now, result="1")])  # prepared on this session
    pid = store.direct.run(lambda conn: conn.info.backend_pid)  # type: ignore[attr-defined]
    with psycopg.connect(pg_url.split("?")[0], autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    store.write([change("after", "SUCCESS", 0, submitted_at=now, result="2")])  # reconnects, prepares again
    assert Registry(store).get("after").result == 2  # type: ignore[union-attr]


def test_a_process_that_stops_waiting_stops_listening_so_it_cannot_hold_postgresqls_notices(
    pg_url: str,
) -> None:
    """A listening session that nobody reads would keep PostgreSQL's notification queue from its
    position on, until the queue is full and every outcome write of the registry fails."""
    from celery_tq.registry.sql import SqlStore

    store = store_for_url(pg_url)
    assert isinstance(store, SqlStore)
    store.listener.idle = 0.5
    with registry_session(pg_url) as (admin, channel):

        def listening() -> list[int]:
            rows = admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE query = %s", (f'LISTEN "{channel}"',)
            ).fetchall()
            return [int(r[0]) for r in rows]

        def wait_for_task(task_id: str) -> float:
            began = time.monotonic()
            assert store.wait_for_outcome(task_id, 10.0, lambda t: store.read([t])[0] is not None)
            return time.monotonic() - began

        now = time.time()
        store.write([change("first", "SUCCESS", 0, submitted_at=now, result="1")])
        wait_for_task("first")
        session = listening()
        assert len(session) == 1
        for i in range(6):  # a process that keeps waiting keeps its session
            time.sleep(0.2)
            store.write([change(f"kept{i}", "SUCCESS", 0, submitted_at=now, result="1")])
            wait_for_task(f"kept{i}")
        assert listening() == session
        store.write([change(f"nobody{i}", "SUCCESS", 0, submitted_at=now, result="1") for i in range(500)])
        wait_for(lambda: not listening(), timeout=10, what="the idle session to close", interval=0.1)
        assert listening() == []
        waiter = threading.Thread(target=wait_for_task, args=("later",))
        waiter.start()  # the next wait listens again and is woken as before
        time.sleep(0.3)
        store.write([change("later", "SUCCESS", 0, submitted_at=now, result="2")])
        waiter.join(10.0)
        assert not waiter.is_alive()
        assert len(listening()) == 1 and listening() != session
        assert store.notified_row("later") is not None


def test_a_forked_child_closing_its_copy_of_a_store_leaves_the_parents_sessions_alone(pg_url: str) -> None:
    """A child forked from a process that uses a PostgreSQL store shares its sockets; the child's
    ``close()`` (or a pool's ``dispose()``) must not end the parent's query, write or listening
    sessions under it."""
    from celery_tq.registry.sql import SqlStore

    store = store_for_url(pg_url)
    assert isinstance(store, SqlStore)
    registry = Registry(store)
    now = time.time()
    store.write([change("first", "SUCCESS", 0, submitted_at=now, result="1")])
    assert store.wait_for_outcome("first", 5.0, lambda t: store.read([t])[0] is not None)  # listening

    def pooled_session() -> int:
        with store.engine.connect() as conn:  # a pooled query session, kept by the pool
            return int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())

    sessions = (
        store.direct.run(lambda c: c.info.backend_pid),
        store.listener._conn.info.backend_pid,
        pooled_session(),
    )

    child = os.fork()
    if child == 0:  # pragma: no cover - the child's outcome is its exit code
        code = 1
        try:
            store.close()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0

    store.write([change("after", "SUCCESS", 0, submitted_at=now, result="2")])  # same write session
    assert store.direct.run(lambda c: c.info.backend_pid) == sessions[0]
    assert registry.get("after").result == 2  # type: ignore[union-attr]
    assert pooled_session() == sessions[2]
    waiter = threading.Thread(target=store.wait_for_outcome, args=("woken", 10.0, lambda t: False))
    waiter.start()
    time.sleep(0.2)
    store.write([change("woken", "SUCCESS", 0, submitted_at=now, result="3")])
    waiter.join(10.0)
    assert not waiter.is_alive()  # woken by the notice on the session it had
    assert store.listener._conn.info.backend_pid == sessions[1]
    assert store.notified_row("woken") is not None


def test_postgresql_notifies_a_write_that_ends_a_task_and_not_a_late_queued_row(pg_url: str) -> None:
    """A client's QUEUED row merged after its task ended (short tasks: the client writes QUEUED
    in batches, a moment later) changes no outcome: it wakes no listener again, as on Redis,
    whose store publishes only a change that is itself terminal."""
    from celery_tq.registry.sql_merge import notice_id

    store = store_for_url(pg_url)
    with registry_session(pg_url) as (ear, channel):
        ear.execute(f'LISTEN "{channel}"')
        now = time.time()
        store.write([change("short", "SUCCESS", 0, submitted_at=now, finished_at=now + 1, result="1")])
        store.write([change("short", "QUEUED", 0, submitted_at=now, args_repr="(1,)", name="t.short")])
        store.write([change(f"q{i}", "QUEUED", 0, submitted_at=now) for i in range(3)])  # a client batch
        heard = [notice_id(n.payload) for n in ear.notifies(timeout=1.0)]
        assert heard == ["short"]  # the outcome only
        store.write([change("q0", "FAILURE", 0, submitted_at=now, error="{}")])
        assert [notice_id(n.payload) for n in ear.notifies(timeout=5.0, stop_after=1)] == ["q0"]
    row = Registry(store).get("short")
    assert row is not None and row.state == "SUCCESS" and row.args_repr == "(1,)"  # the late row merged
