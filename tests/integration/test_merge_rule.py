"""One table of write orders, checked against every store: the merge rule has one meaning.

The rule lives three times (Python for the memory store and batch folding, SQL for SQLite and
PostgreSQL, Lua for Redis); each case below is written one write at a time, and as one batch,
to each store, and the record must read the same everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from celery_tq.registry import Registry, Store, store_for_url
from celery_tq.registry.record import Row, change
from tests.registry_support import STORE_KINDS, pg_url, store_url

__all__ = ["pg_url"]

T0 = 1000.0


def w(state: str, retries: int = 0, at: float = 0.0, **fields: Any) -> Row:
    if state == "STARTED":  # one run per worker name: what a run's STARTED write carries
        fields.update(run_id=f"run-{fields.get('worker') or 'x'}", deliveries=1)
    return change("t", state, retries, submitted_at=T0 + at, **fields)


# (case, writes in arrival order, expected (state, retries, worker, meta, deliveries))
CASES: list[tuple[str, list[Row], tuple[str, int, str | None, str | None, int]]] = [
    (
        "a lifecycle in order",
        [w("QUEUED"), w("STARTED", worker="a"), w("SUCCESS")],
        ("SUCCESS", 0, "a", None, 1),
    ),
    (
        "a late STARTED never hides the outcome",
        [w("QUEUED"), w("SUCCESS"), w("STARTED", worker="a")],
        ("SUCCESS", 0, "a", None, 1),
    ),
    (
        "a late QUEUED never hides STARTED",
        [w("STARTED", worker="a"), w("QUEUED")],
        ("STARTED", 0, "a", None, 1),
    ),
    # the attempt's facts (worker, started_at) belong to the attempt: the next one starts empty
    (
        "a retry moves to the next attempt",
        [w("STARTED", worker="a"), w("RETRY", 1)],
        ("RETRY", 1, None, None, 1),
    ),
    (
        "the next attempt's start replaces the worker",
        [w("STARTED", worker="a"), w("RETRY", 1), w("STARTED", 1, worker="b")],
        ("STARTED", 1, "b", None, 2),
    ),
    (
        "a RETRY of a cancelled run never outranks the redelivered run's success",
        [w("STARTED", worker="a"), w("RETRY", 1), w("STARTED", worker="b"), w("SUCCESS", worker="b")],
        ("SUCCESS", 0, "b", None, 2),
    ),
    (
        "the same, with the RETRY arriving last",
        [w("STARTED", worker="b"), w("SUCCESS", worker="b"), w("RETRY", 1)],
        ("SUCCESS", 0, "b", None, 1),
    ),
    ("the first terminal state stays", [w("SUCCESS"), w("FAILURE")], ("SUCCESS", 0, None, None, 0)),
    (
        "a terminal state of a later attempt wins",
        [w("FAILURE"), w("SUCCESS", 1)],
        ("SUCCESS", 1, None, None, 0),
    ),
    (
        "a custom state follows STARTED",
        [w("STARTED", worker="a"), w("PROGRESS", meta='{"n": 1}')],
        ("PROGRESS", 0, "a", '{"n": 1}', 1),
    ),
    (
        "a second progress update replaces the first",
        [w("PROGRESS", meta='{"n": 1}'), w("PROGRESS", meta='{"n": 2}')],
        ("PROGRESS", 0, None, '{"n": 2}', 0),
    ),
    (
        "a late STARTED never hides progress",
        [w("PROGRESS", meta='{"n": 1}'), w("STARTED", worker="a")],
        ("PROGRESS", 0, "a", '{"n": 1}', 1),
    ),
    (
        "the outcome follows progress",
        [w("PROGRESS", meta='{"n": 1}'), w("SUCCESS")],
        ("SUCCESS", 0, None, None, 0),
    ),
    (
        "progress after the outcome is ignored",
        [w("SUCCESS"), w("PROGRESS", meta='{"n": 9}')],
        ("SUCCESS", 0, None, None, 0),
    ),
    (
        "REVOKED before the start is final",
        [w("QUEUED"), w("REVOKED"), w("STARTED", worker="a")],
        ("REVOKED", 0, "a", None, 1),
    ),
    # deliveries: each run's STARTED counts once (a run is named by its worker here)
    (
        "a redelivered run counts a second delivery and is the record's run",
        [w("QUEUED"), w("STARTED", worker="a"), w("STARTED", worker="b"), w("SUCCESS")],
        ("SUCCESS", 0, "b", None, 2),
    ),
    (
        "a STARTED write retried after a store error counts once",
        [w("QUEUED"), w("STARTED", worker="a"), w("STARTED", worker="a"), w("SUCCESS")],
        ("SUCCESS", 0, "a", None, 1),
    ),
    (
        "the same, with the retried write arriving after the outcome",
        [w("STARTED", worker="a"), w("SUCCESS"), w("STARTED", worker="a")],
        ("SUCCESS", 0, "a", None, 1),
    ),
    (
        "a run whose process died runs again as the next attempt",
        [
            w("STARTED", worker="a"),
            w("RETRY", 1),
            w("QUEUED", 1),
            w("STARTED", 1, worker="b"),
            w("SUCCESS", 1),
        ],
        ("SUCCESS", 1, "b", None, 2),
    ),
]


@pytest.fixture(params=STORE_KINDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    return store_for_url(store_url(request.param, request, tmp_path))


@pytest.mark.parametrize(("case", "writes", "expected"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("batched", [False, True], ids=["one by one", "one batch"])
def test_every_store_merges_writes_by_the_same_rule(
    store: Store,
    case: str,
    writes: list[Row],
    expected: tuple[str, int, str | None, str | None, int],
    batched: bool,
) -> None:
    if batched:
        store.write(writes)
    else:
        for write in writes:
            store.write([write])
    record = Registry(store).get("t")
    assert record is not None
    row = store.read(["t"])[0]
    assert row is not None
    assert (record.state, record.retries, record.worker, row.get("meta"), record.deliveries) == expected
    assert record.submitted_at is not None and record.submitted_at.timestamp() == T0


def test_queries_and_counts_see_custom_states(store: Store) -> None:
    store.write([change("p", "PROGRESS", 0, submitted_at=T0, tags=["import"], meta='{"done": 3}')])
    store.write([change("s", "SUCCESS", 0, submitted_at=T0 + 1, tags=["import"])])
    registry = Registry(store)
    assert [r.id for r in registry.query(state="PROGRESS", tags={"import"})] == ["p"]
    assert registry.counts(tags={"import"}) == {"PROGRESS": 1, "SUCCESS": 1}
    assert registry.counts() == {"PROGRESS": 1, "SUCCESS": 1}


@pytest.mark.parametrize("batched", [False, True], ids=["one by one", "one batch"])
def test_a_redelivered_run_leaves_its_own_times_in_the_record(store: Store, batched: bool) -> None:
    writes = [
        w("QUEUED"),
        w("STARTED", worker="a", started_at=T0 + 1),
        w("STARTED", worker="b", started_at=T0 + 5),
        w("SUCCESS", finished_at=T0 + 6),
    ]
    for batch in [writes] if batched else [[write] for write in writes]:
        store.write(batch)
    record = Registry(store).get("t")
    assert record is not None
    assert (record.deliveries, record.worker, record.runtime) == (2, "b", 1.0)
    assert record.started_at is not None and record.started_at.timestamp() == T0 + 5


def test_the_postgresql_upsert_stays_short_enough_for_psycopg_to_cache_it() -> None:
    from celery_tq.registry.sql_merge import task_upsert

    # psycopg 3 parses a statement again on every execution past 4096 bytes (_queries.py)
    assert len(task_upsert("postgresql", 1).encode()) <= 4096


def test_postgresql_writes_batches_of_every_size_with_two_prepared_statements(pg_url: str) -> None:
    from celery_tq.registry.sql import SqlStore

    store = store_for_url(pg_url)
    assert isinstance(store, SqlStore)
    sizes = [1, 3, 7, 1, 2, 5, 1, 4, 6, 1, 3, 7, 1, 2, 5, 1, 4, 6, 1, 8]
    for n, size in enumerate(sizes):
        store.write(
            [
                change(f"b{n}-{i}", "SUCCESS", 0, submitted_at=T0 + i, priority=i, runtime=0.1)
                for i in range(size)
            ]
        )
    prepared = store.direct.run(
        lambda conn: conn.execute(
            "SELECT statement FROM pg_prepared_statements WHERE statement LIKE '%INSERT INTO tq_tasks%'"
        ).fetchall()
    )
    # psycopg prepares a statement once it has run it five times: one row, and every larger size, shared one
    assert len(prepared) == 2
    records = Registry(store).query(limit=1000)
    assert len(records) == sum(sizes)
    assert {r.priority for r in records} == set(range(max(sizes)))
