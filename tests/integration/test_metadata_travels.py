"""Metadata travels with every way of sending a task, and means the same on every broker."""

from __future__ import annotations

import json
from pathlib import Path

from celery import Celery, chain, group

import celery_tq
from celery_tq import Priority

from .conftest import Shop


def _expected_broker_priority(kind: str, priority: int) -> int:
    return 9 - priority if kind == "redis" else priority


def test_worker_sees_effective_metadata_for_apply_async_delay_and_signatures(shop: Shop) -> None:
    shop.start_worker()
    echo = shop.app.tasks["tqshop.echo_meta"]

    by_default = echo.delay("d").get(timeout=30)
    assert (by_default["priority"], by_default["tags"], by_default["timeout"]) == (7, ["billing"], 30)

    per_call = echo.apply_async(("a",), priority=9, tags={"vip"}, timeout=10).get(timeout=30)
    assert (per_call["priority"], per_call["tags"], per_call["timeout"]) == (9, ["billing", "vip"], 10)
    assert per_call["broker_priority"] == _expected_broker_priority(shop.kind, 9)
    assert per_call["queue"] == "tq.default"

    signature = echo.s("s").set(priority=Priority.LOW, tags={"vip"}).delay().get(timeout=30)
    assert (signature["priority"], signature["tags"]) == (2, ["billing", "vip"])
    assert signature["broker_priority"] == _expected_broker_priority(shop.kind, 2)


def test_canvas_chain_and_group_carry_metadata(shop: Shop) -> None:
    shop.start_worker()
    echo = shop.app.tasks["tqshop.echo_meta"]
    last = chain(echo.s(1).set(priority=9, tags={"first"}), echo.s()).apply_async().get(timeout=30)
    assert last["priority"] == 7  # the second link keeps its own default
    assert last["value"]["priority"] == 9 and last["value"]["tags"] == ["billing", "first"]

    results = group(echo.s(i).set(priority=i) for i in (0, 4, 8)).apply_async().get(timeout=30)
    assert [r["priority"] for r in results] == [0, 4, 8]


def test_send_task_by_a_name_the_client_never_registered_gets_normal_priority(shop: Shop) -> None:
    shop.start_worker()
    client = Celery("client", set_as_current=False)
    celery_tq.install(client, preset="development")
    client.conf.update(broker_url=shop.broker_url, result_backend=shop.result_backend)
    try:
        result = client.send_task("tqshop.echo_meta", ("by-name",), tags={"ext"}).get(timeout=30)
    finally:
        client.close()
    assert result["priority"] == Priority.NORMAL
    assert result["tags"] == ["ext"]
    assert result["broker_priority"] == _expected_broker_priority(shop.kind, 5)


def test_retry_keeps_the_abstract_priority(shop: Shop, data_dir: str) -> None:
    """Each retry is a new message: it carries priority 8 again (on Redis: broker priority 1)."""
    shop.start_worker()
    result = shop.app.tasks["tqshop.flaky"].apply_async(priority=8)
    assert result.get(timeout=30) == 2
    attempts = [json.loads(line) for line in (Path(data_dir) / "attempts.jsonl").read_text().splitlines()]
    assert [a["retries"] for a in attempts if a["id"] == result.id] == [0, 1, 2]
    assert {(a["priority"], a["broker_priority"]) for a in attempts} == {
        (8, _expected_broker_priority(shop.kind, 8))
    }


def test_plain_celery_task_of_the_same_app_still_runs(shop: Shop) -> None:
    shop.start_worker()
    assert shop.app.tasks["tqshop.plain"].delay(21).get(timeout=30) == 42
