"""The event loop's Redis write (``registry/redis_async.py``) against a real Redis: what it writes
is what the store's own write would (one task and many, odd values, tags), its replies are read
without blocking, and an error reply, a flushed script or a lost connection comes back to the
caller with every reply accounted for. The hand-over on it: tests/integration/test_loop_write.py
(a stand-in loop) and tests/integration/test_outcome_handoff.py (real workers)."""

from __future__ import annotations

import select
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from celery_tq.registry import Registry, store_for_url
from celery_tq.registry.loop_write import NotSent, loop_write_for
from celery_tq.registry.record import change
from celery_tq.registry.redis import RedisStore
from celery_tq.registry.redis_async import CLIENT_NAME, RedisLoopWrite
from tests.private_redis import PrivateRedis

ODD = 'quote " backslash \\ braces {a,b} comma, NULL \r\n spaces  é ✓ \x00 nul'


def _loop_write(store: RedisStore) -> RedisLoopWrite:
    loop_write = loop_write_for(store)
    assert isinstance(loop_write, RedisLoopWrite)
    loop_write.connect()
    return loop_write


@pytest.fixture
def connected(redis_dbs: tuple[str, str]) -> Iterator[tuple[RedisStore, RedisLoopWrite]]:
    store = store_for_url(f"tq+{redis_dbs[1]}")
    assert isinstance(store, RedisStore)
    loop_write = _loop_write(store)
    yield store, loop_write
    loop_write.close()


def _finish(loop_write: RedisLoopWrite, timeout: float = 10.0) -> bool:
    while not loop_write.poll():
        assert select.select([loop_write.fileno()], [], [], timeout)[0], "no answer from Redis"
    return True


def _rows(prefix: str, n: int) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        task_id = f"{prefix}{i}"
        rows += [
            change(task_id, "STARTED", 0, name="odd.task", tags=["t-" + ODD[:6], "billing"], worker="w@h"),
            change(task_id, "SUCCESS", 0, result=f'{{"v": "{i}"}}', meta=ODD, args_repr=ODD),
        ]
    return rows


def _without_id(row: dict[str, Any] | None) -> dict[str, Any]:
    assert row is not None
    return {k: v for k, v in row.items() if k != "id"}


@pytest.mark.parametrize("tasks", [1, 3, 40])
def test_what_the_loop_writes_reads_back_as_the_stores_own_write_leaves_it(
    connected: tuple[RedisStore, RedisLoopWrite], tasks: int
) -> None:
    store, loop_write = connected
    prefix = uuid.uuid4().hex[:8]
    for who in ("loop", "own"):  # both start from a QUEUED record, as tasks sent by apply_async do
        store.write(
            [change(f"{prefix}{who}{i}", "QUEUED", 0, name="odd.task", queue="q") for i in range(tasks)]
        )
    # a pool process encodes its outcome; the loop joins the parts and sends them at once
    parts = [loop_write.encode(_rows(f"{prefix}loop", tasks)[2 * i : 2 * i + 2]) for i in range(tasks)]
    loop_write.send((), parts)
    assert _finish(loop_write)
    store.write(_rows(f"{prefix}own", tasks))
    mine = store.read([f"{prefix}loop{i}" for i in range(tasks)])
    twins = store.read([f"{prefix}own{i}" for i in range(tasks)])
    assert [_without_id(r) for r in mine] == [_without_id(r) for r in twins]
    assert mine[0] is not None and mine[0]["meta"] == ODD and mine[0]["state"] == "SUCCESS"
    registry = Registry(store)
    tagged = {r.id for r in registry.query(tags=["billing"], limit=1000)}
    assert {f"{prefix}loop{i}" for i in range(tasks)} <= tagged
    assert registry.counts(tags=["t-" + ODD[:6]]).get("SUCCESS", 0) >= 2 * tasks


def test_rows_without_encoded_parts_are_encoded_by_the_loop(
    connected: tuple[RedisStore, RedisLoopWrite],
) -> None:
    store, loop_write = connected
    loop_write.send([change("plain-rows", "SUCCESS", 0, result="1", meta="{}")], ())
    assert _finish(loop_write)
    row = store.read(["plain-rows"])[0]
    assert row is not None and row["state"] == "SUCCESS"


def test_an_error_reply_is_raised_once_every_reply_is_in_and_the_connection_goes_on(
    connected: tuple[RedisStore, RedisLoopWrite],
) -> None:
    store, loop_write = connected
    good = loop_write.encode([change("ok-1", "SUCCESS", 0, result="1", meta="{}")])
    bad = loop_write.encode([{**change("bad-1", "SUCCESS", 0), "progress": "not a number"}])
    after = loop_write.encode([change("ok-2", "SUCCESS", 0, result="2", meta="{}")])
    loop_write.send((), [good, bad, after])
    with pytest.raises(redis.ResponseError):
        _finish(loop_write)
    first, _, last = store.read(["ok-1", "bad-1", "ok-2"])  # the calls around the refused one ran
    assert first is not None and last is not None
    assert loop_write.connected  # every reply was read: the next batch goes on the same connection
    loop_write.send((), [loop_write.encode([change("ok-3", "SUCCESS", 0, result="3", meta="{}")])])
    assert _finish(loop_write)
    assert store.read(["ok-3"])[0] is not None


def test_a_busy_connection_takes_no_second_batch(connected: tuple[RedisStore, RedisLoopWrite]) -> None:
    _, loop_write = connected
    loop_write.send([change("first", "SUCCESS", 0, result="1", meta="{}")], ())
    with pytest.raises(NotSent, match="no idle connection"):
        loop_write.send([change("second", "SUCCESS", 0, result="1", meta="{}")], ())
    assert _finish(loop_write)


def test_a_killed_connection_and_a_flushed_script_come_back_to_the_store_s_own_write(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        store = store_for_url(f"tq+{server.url}/0")
        assert isinstance(store, RedisStore)
        loop_write = _loop_write(store)
        admin = redis.Redis(port=server.port)
        (mine,) = [c for c in admin.client_list() if c["name"] == CLIENT_NAME]
        admin.client_kill_filter(_id=mine["id"])
        rows = [change("lost", "SUCCESS", 0, result="1", meta="{}")]
        with pytest.raises((NotSent, redis.ConnectionError)):
            loop_write.send(rows, ())
            _finish(loop_write)
        assert loop_write.closed
        store.write(rows)  # what the hand-over does with a batch the loop could not write
        assert store.read(["lost"])[0] is not None
        # SCRIPT FLUSH: the loop's calls are refused (NOSCRIPT), the store's own write loads the
        # script again, and a new connection loads it too
        loop_write = _loop_write(store)
        admin.script_flush()
        loop_write.send([change("flushed", "SUCCESS", 0, result="1", meta="{}")], ())
        with pytest.raises(redis.ResponseError, match="NOSCRIPT"):
            _finish(loop_write)
        store.write([change("flushed", "SUCCESS", 0, result="1", meta="{}")])
        loop_write.send([change("flushed-2", "SUCCESS", 0, result="1", meta="{}")], ())
        assert _finish(loop_write)
        assert [r is not None for r in store.read(["flushed", "flushed-2"])] == [True, True]
        loop_write.close()
        admin.close()
    finally:
        server.stop()


def test_tls_keeps_the_pool_processes_own_write() -> None:
    tls = store_for_url("tq+rediss://127.0.0.1:6390/0")
    assert isinstance(tls, RedisStore)
    assert loop_write_for(tls) is None and not tls.batches_outcomes
    plain = store_for_url("tq+redis://127.0.0.1:6390/0")
    assert isinstance(plain, RedisStore) and plain.batches_outcomes
