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
    return change("t", state, retries, submitted_at=T0 + at, **fields)


# (case, writes in arrival order, expected (state, retries, worker, meta))
CASES: list[tuple[str, list[Row], tuple[str, int, str | None, str | None]]] = [
    (
        "a lifecycle in order",
        [w("QUEUED"), w("STARTED", worker="a"), w("SUCCESS")],
        ("SUCCESS", 0, "a", None),
    ),
    (
        "a late STARTED never hides the outcome",
        [w("QUEUED"), w("SUCCESS"), w("STARTED", worker="a")],
        ("SUCCESS", 0, "a", None),
    ),
    ("a late QUEUED never hides STARTED", [w("STARTED", worker="a"), w("QUEUED")], ("STARTED", 0, "a", None)),
    # the attempt's facts (worker, started_at) belong to the attempt: the next one starts empty
    (
        "a retry moves to the next attempt",
        [w("STARTED", worker="a"), w("RETRY", 1)],
        ("RETRY", 1, None, None),
    ),
    (
        "the next attempt's start replaces the worker",
        [w("STARTED", worker="a"), w("RETRY", 1), w("STARTED", 1, worker="b")],
        ("STARTED", 1, "b", None),
    ),
    (
        "a RETRY of a cancelled run never outranks the redelivered run's success",
        [w("STARTED", worker="a"), w("RETRY", 1), w("STARTED", worker="b"), w("SUCCESS", worker="b")],
        ("SUCCESS", 0, "b", None),
    ),
    (
        "the same, with the RETRY arriving last",
        [w("STARTED", worker="b"), w("SUCCESS", worker="b"), w("RETRY", 1)],
        ("SUCCESS", 0, "b", None),
    ),
    ("the first terminal state stays", [w("SUCCESS"), w("FAILURE")], ("SUCCESS", 0, None, None)),
    ("a terminal state of a later attempt wins", [w("FAILURE"), w("SUCCESS", 1)], ("SUCCESS", 1, None, None)),
    (
        "a custom state follows STARTED",
        [w("STARTED", worker="a"), w("PROGRESS", meta='{"n": 1}')],
        ("PROGRESS", 0, "a", '{"n": 1}'),
    ),
    (
        "a second progress update replaces the first",
        [w("PROGRESS", meta='{"n": 1}'), w("PROGRESS", meta='{"n": 2}')],
        ("PROGRESS", 0, None, '{"n": 2}'),
    ),
    (
        "a late STARTED never hides progress",
        [w("PROGRESS", meta='{"n": 1}'), w("STARTED", worker="a")],
        ("PROGRESS", 0, "a", '{"n": 1}'),
    ),
    (
        "the outcome follows progress",
        [w("PROGRESS", meta='{"n": 1}'), w("SUCCESS")],
        ("SUCCESS", 0, None, None),
    ),
    (
        "progress after the outcome is ignored",
        [w("SUCCESS"), w("PROGRESS", meta='{"n": 9}')],
        ("SUCCESS", 0, None, None),
    ),
    (
        "REVOKED before the start is final",
        [w("QUEUED"), w("REVOKED"), w("STARTED", worker="a")],
        ("REVOKED", 0, "a", None),
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
    expected: tuple[str, int, str | None, str | None],
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
    assert (record.state, record.retries, record.worker, row.get("meta")) == expected
    assert record.submitted_at is not None and record.submitted_at.timestamp() == T0


def test_queries_and_counts_see_custom_states(store: Store) -> None:
    store.write([change("p", "PROGRESS", 0, submitted_at=T0, tags=["import"], meta='{"done": 3}')])
    store.write([change("s", "SUCCESS", 0, submitted_at=T0 + 1, tags=["import"])])
    registry = Registry(store)
    assert [r.id for r in registry.query(state="PROGRESS", tags={"import"})] == ["p"]
    assert registry.counts(tags={"import"}) == {"PROGRESS": 1, "SUCCESS": 1}
    assert registry.counts() == {"PROGRESS": 1, "SUCCESS": 1}
