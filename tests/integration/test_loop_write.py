"""The event loop's PostgreSQL write (``registry/sql_async.py``) against a real PostgreSQL: what it
writes is what the store's own write would (text parameters of every kind of value, one row and
many), and what it cannot send or PostgreSQL refuses comes back to the caller, nothing half-done.
The hand-over on a real loop connection, PostgreSQL's and Redis's: tests/unit/test_handoff.py's
stand-in loop below, and real workers in tests/integration/test_outcome_handoff.py (Redis's own
loop write: tests/integration/test_redis_loop_write.py)."""

from __future__ import annotations

import select
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_tq.registry import Registry, store_for_url
from celery_tq.registry.loop_write import NotSent, loop_write_for
from celery_tq.registry.record import change
from celery_tq.registry.sql import SqlStore
from celery_tq.registry.sql_async import LoopWrite
from tests.registry_support import pg_url, store_url

__all__ = ["pg_url"]

ODD = 'quote " backslash \\ braces {a,b} comma, NULL spaces  é ✓'


def _store(url: str, warm: bool = True) -> SqlStore:
    store = store_for_url(f"tq+{url}")
    assert isinstance(store, SqlStore)
    if warm:
        store.write([change("warm-up", "QUEUED", 0, name="t")])  # the schema exists
    return store


def _loop_write(store: SqlStore) -> LoopWrite:
    loop_write = loop_write_for(store)
    assert loop_write is not None
    loop_write.connect()
    return loop_write


@pytest.fixture
def connected(pg_url: str) -> Iterator[tuple[SqlStore, LoopWrite]]:
    """A registry with its tables, and a loop connection to it."""
    store = _store(pg_url)
    loop_write = _loop_write(store)
    yield store, loop_write
    loop_write.close()
    store.close()


def _finish(loop_write: LoopWrite, timeout: float = 10.0) -> bool:
    while not loop_write.poll():
        assert select.select([loop_write.fileno()], [], [], timeout)[0], "no answer from PostgreSQL"
    return True


def _rows(n: int) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        task_id = f"{uuid.uuid4()}-{i}"
        rows.append(change(task_id, "STARTED", 0, name=ODD, priority=9, tags=["a", ODD]))
        rows.append(
            change(task_id, "SUCCESS", 0, result=f'{{"v": "{i}\\\\n"}}', meta="{}", runtime=0.1 + 1e-12 * i)
        )
    return rows


@pytest.mark.parametrize("tasks", [1, 3, 40])
def test_what_the_loop_writes_reads_back_as_the_stores_own_write_leaves_it(
    connected: tuple[SqlStore, LoopWrite], tasks: int
) -> None:
    store, loop_write = connected
    rows = _rows(tasks)
    loop_write.send(rows)
    assert _finish(loop_write)
    twin = [{**r, "id": r["id"] + "-twin"} for r in rows]
    store.write(twin)
    ids = list(dict.fromkeys(r["id"] for r in rows))
    got = store.read(ids)
    want = store.read([i + "-twin" for i in ids])
    for mine, theirs in zip(got, want, strict=True):
        assert mine is not None and theirs is not None
        assert mine["state"] == "SUCCESS" and mine["name"] == ODD and mine["tags"] == theirs["tags"]
        assert {k: v for k, v in mine.items() if k != "id"} == {k: v for k, v in theirs.items() if k != "id"}
    tagged = Registry(store).query(tags=[ODD], state="SUCCESS", limit=1000)  # the tag rows too
    assert sorted(r.id for r in tagged) == sorted(ids + [i + "-twin" for i in ids])


def test_a_value_libpq_cannot_send_as_text_is_refused_before_anything_is_sent(
    connected: tuple[SqlStore, LoopWrite],
) -> None:
    store, loop_write = connected
    with pytest.raises(NotSent, match="NUL"):
        loop_write.send([change("nul", "SUCCESS", 0, result="a\0b", meta="{}")])
    loop_write.send([change("after-nul", "SUCCESS", 0, result="1", meta="{}")])  # still usable
    assert _finish(loop_write)
    nul, after = store.read(["nul", "after-nul"])
    assert nul is None and after is not None and after["state"] == "SUCCESS"


def test_a_batch_postgresql_refuses_raises_and_writes_none_of_it(
    connected: tuple[SqlStore, LoopWrite],
) -> None:
    import psycopg

    store, loop_write = connected
    loop_write.send(
        [change("fine", "SUCCESS", 0, result="1", meta="{}"), change("too-big", "SUCCESS", 0, priority=99999)]
    )
    with pytest.raises(psycopg.Error, match="smallint"):
        _finish(loop_write)
    assert store.read(["fine", "too-big"]) == [None, None]  # one statement: all or nothing


def test_a_store_the_loop_cannot_write_has_no_loop_connection(tmp_path: Any) -> None:
    assert loop_write_for(store_for_url(f"sqlite:///{tmp_path / 'r.db'}")) is None
    assert loop_write_for(store_for_url(f"memory://{uuid.uuid4().hex}")) is None
    pgbouncer = store_for_url("tq+postgresql://postgres@127.0.0.1:6432/test?tq_pgbouncer=1")
    assert loop_write_for(pgbouncer) is None


@pytest.mark.parametrize("kind", ["postgresql", "redis"])
def test_the_hand_over_writes_on_the_loops_connection_and_releases_acks_after_the_commit(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    from celery_tq.worker.handoff import Handoff
    from tests.unit.test_handoff import Loop

    # a new registry: on PostgreSQL its tables are created first
    store = store_for_url(f"tq+{store_url(kind, request, tmp_path)}")
    handoff, loop = Handoff(store, retry_for=5.0), Loop()
    handoff.start(loop)
    try:
        loop.run(lambda: handoff._watched >= 0, timeout=10)  # connected by the writer thread
        sent: list[Any] = []
        loop_write = handoff._loop_write
        assert loop_write is not None
        send = loop_write.send
        loop_write.send = lambda rows, encoded: (sent.append(len(encoded) or len(rows)), send(rows, encoded))[
            1
        ]  # type: ignore[method-assign]
        acked: list[str] = []
        for i in range(30):
            rows = [
                change(f"h{i}", "STARTED", 0, name="t"),
                change(f"h{i}", "SUCCESS", 0, result="1", meta="{}"),
            ]
            assert handoff.send(handoff.datagram(f"h{i}", rows))
            assert handoff.hold(f"h{i}", lambda i=i: acked.append(f"h{i}"))  # type: ignore[misc]
            assert f"h{i}" not in acked  # not before its commit
        loop.run(lambda: len(acked) == 30, timeout=10)
        # batched, all on the loop's connection (Redis: each outcome's calls encoded by its sender)
        assert sum(sent) == (60 if kind == "postgresql" else 30) and len(sent) < 30
        assert [
            r is not None and r["state"] == "SUCCESS" for r in store.read([f"h{i}" for i in range(30)])
        ] == [True] * 30
        # the connection lost: the batch goes to the writer thread, the acks still follow the write
        loop_write.close()
        rows = [change("after", "SUCCESS", 0, result="1", meta="{}")]
        assert handoff.send(handoff.datagram("after", rows))
        assert handoff.hold("after", lambda: acked.append("after"))
        loop.run(lambda: "after" in acked, timeout=10)
        assert store.read(["after"])[0] is not None
        loop.run(lambda: handoff._watched >= 0 and loop_write.connected, timeout=10)  # reconnected
    finally:
        handoff.stop()
        if isinstance(store, SqlStore):
            store.close()
