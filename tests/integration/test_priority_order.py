"""Priority 0..9 (higher = more urgent, FIFO within a level) holds on every broker, through real workers."""

from __future__ import annotations

import itertools
import json
import random
import time
from pathlib import Path

import pytest
from celery import Celery

import celery_tq
from celery_tq import Priority, errors

from .conftest import Shop, tqshop


def _order(data_dir: str) -> list[tuple[str, int]]:
    path = Path(data_dir) / "order.log"
    if not path.exists():
        return []
    return [(label, int(p)) for label, p in (line.split() for line in path.read_text().splitlines())]


def _wait_for_lines(data_dir: str, count: int, timeout: float = 60) -> list[tuple[str, int]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = _order(data_dir)
        if len(lines) >= count:
            return lines
        time.sleep(0.05)
    raise AssertionError(f"only {len(_order(data_dir))} of {count} tasks ran")


def _violations(ran: list[tuple[str, int]], sent: list[tuple[str, int]]) -> int:
    """Adjacent pairs run out of (priority desc, then send order)."""
    rank = {label: (-p, i) for i, (label, p) in enumerate(sent)}
    return sum(1 for a, b in itertools.pairwise(ran) if rank[a[0]] > rank[b[0]])


def test_queued_tasks_run_in_strict_priority_order_fifo_within_a_level(shop: Shop, data_dir: str) -> None:
    rng = random.Random(42)
    record = shop.app.tasks["tqshop.record"]
    sent = [(f"t{i:03d}", rng.randint(0, 9)) for i in range(120)]
    for label, priority in sent:
        record.apply_async((label,), priority=priority)
    shop.start_worker(concurrency=1)
    ran = _wait_for_lines(data_dir, len(sent))
    assert _violations(ran, sent) == 0
    assert ran == sorted(sent, key=lambda t: (-t[1], sent.index(t)))


def test_critical_task_overtakes_a_low_backlog_within_concurrency_plus_one(shop: Shop, data_dir: str) -> None:
    record = shop.app.tasks["tqshop.record"]
    for i in range(20):
        record.apply_async((f"low{i:02d}", 0.3), priority=Priority.LOW)
    shop.start_worker(concurrency=1)
    _wait_for_lines(data_dir, 1)
    record.apply_async(("critical",), priority=Priority.CRITICAL).get(timeout=60)
    ran = [label for label, _ in _order(data_dir)]
    assert ran.index("critical") <= 1 + 1  # at most concurrency + 1 LOW tasks started before it


def _received_while_busy(shop: Shop, data_dir: str, expected: int, env: dict[str, str] | None = None) -> int:
    """Tasks a -c 1 worker has received while it runs the first of a backlog of slow ones: once
    ``expected`` arrived, a control round trip gives any further one time to show."""
    record = shop.app.tasks["tqshop.record"]
    for i in range(4):
        record.apply_async((f"slow{i}", 3.0), priority=Priority.LOW)
    worker = shop.start_worker(concurrency=1, env=env or {})
    _wait_for_lines(data_dir, 1)
    deadline = time.monotonic() + 20  # the deliveries it should hold have arrived; the first runs 3 s
    while worker.log.count("] received") < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    # Its own connection, closed here: a pooled one left mid-BRPOP on Redis would hang the
    # after-fork cleanup of processes this test run forks later.
    with shop.app.connection_for_write() as conn:
        replies = shop.app.control.ping(timeout=1.0, connection=conn)
    assert replies, "a busy worker still answers control commands"
    received = worker.log.count("] received")
    assert len(_order(data_dir)) == 1, "the first task should still be running"
    worker.stop()
    return received


def test_a_busy_worker_holds_one_task_beyond_its_concurrency(shop: Shop, data_dir: str) -> None:
    """tq_prefetch_extra=1: the next task is already in the worker when a process finishes, and
    the busy worker still answers control commands (the embedded broker's too: its worker polls
    from its event loop)."""
    assert _received_while_busy(shop, data_dir, 1 + 1) == 1 + 1


def test_prefetch_extra_zero_holds_only_what_runs(rabbitmq_shop: Shop, data_dir: str) -> None:
    env = {"TQSHOP_CONF": json.dumps({"tq_prefetch_extra": 0})}
    assert _received_while_busy(rabbitmq_shop, data_dir, 1, env) == 1


def test_send_task_by_unregistered_name_runs_after_high_and_before_low(shop: Shop, data_dir: str) -> None:
    record = shop.app.tasks["tqshop.record"]
    for i in range(3):
        record.apply_async((f"low{i}",), priority=Priority.LOW)
    client = Celery("client", set_as_current=False)
    celery_tq.install(client, preset="development")
    client.conf.update(broker_url=shop.broker_url, result_backend=shop.result_backend)
    try:
        client.send_task("tqshop.record", ("by-name",))
    finally:
        client.close()
    for i in range(3):
        record.apply_async((f"high{i}",), priority=Priority.HIGH)
    shop.start_worker(concurrency=1)
    ran = [label for label, _ in _wait_for_lines(data_dir, 7)]
    assert ran == ["high0", "high1", "high2", "by-name", "low0", "low1", "low2"]


BANDS = {"tq.high": [7, 9], "tq.default": [0, 6]}


def test_dedicated_band_worker_serves_high_while_low_floods_the_default_band(
    shop: Shop, data_dir: str
) -> None:
    app = tqshop.make_app(shop.broker_url, shop.result_backend, tq_priority_bands=BANDS)
    env = {"TQSHOP_CONF": json.dumps({"tq_priority_bands": BANDS})}
    record = app.tasks["tqshop.record"]
    for i in range(40):
        record.apply_async((f"low{i:02d}", 0.2), priority=Priority.LOW)
    shop.start_worker(concurrency=1, queues=["tq.default"], env=env)
    shop.start_worker(concurrency=1, queues=["tq.high"], env=env)
    before = len(_wait_for_lines(data_dir, 1))  # LOW tasks started while the band worker started
    result = record.apply_async(("high",), priority=Priority.HIGH)
    assert result.get(timeout=60) == "high"
    ran = [label for label, _ in _order(data_dir)]
    # The flood (40 x 0.2 s) is not ahead of it: at most a few LOW tasks (0.2 s each) start
    # between the send and HIGH's start, whatever the workers' start-up took.
    assert ran.index("high") - before <= 5, ran
    app.close()


def test_worker_without_queues_consumes_every_band(shop: Shop) -> None:
    app = tqshop.make_app(shop.broker_url, shop.result_backend, tq_priority_bands=BANDS)
    shop.start_worker(env={"TQSHOP_CONF": json.dumps({"tq_priority_bands": BANDS})})
    echo = app.tasks["tqshop.echo_meta"]
    assert echo.apply_async(("h",), priority=9).get(timeout=60)["queue"] == "tq.high"
    assert echo.apply_async(("l",), priority=1).get(timeout=60)["queue"] == "tq.default"
    assert echo.apply_async(("q",), priority=9, queue="tq.default").get(timeout=60)["queue"] == "tq.default"
    app.close()


@pytest.mark.parametrize("priority", [10, -1, 99])
def test_out_of_range_priorities_are_refused(shop: Shop, priority: int) -> None:
    with pytest.raises(errors.MetadataError):
        shop.app.tasks["tqshop.record"].apply_async(("x",), priority=priority)
