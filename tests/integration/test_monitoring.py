"""``celery tq status`` and ``celery tq exporter`` agree with the registry and the broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import celery_tq
from celery_tq import Priority
from celery_tq.registry import store_for_url
from celery_tq.registry.record import change
from tests.conftest import REDIS_RESULT_DB
from tests.ports import free_port

from .conftest import APPS, Shop

ROOT = Path(__file__).parents[2]


def _env(shop: Shop, data_dir: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "TQSHOP_BROKER_URL": shop.broker_url,
        "TQSHOP_RESULT_BACKEND": shop.result_backend,
        "TQ_DATA_DIR": data_dir,
        "PYTHONPATH": f"{APPS}:{ROOT}",
        **extra,
    }


def _tq(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tqshop", "tq", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


# beside Celery's own redis results
REDIS_REGISTRY = {"tq_registry_url": f"redis://127.0.0.1:6379/{REDIS_RESULT_DB}"}


@pytest.fixture(params=["embedded", "redis"])
def monitored(request: pytest.FixtureRequest) -> Shop:
    """Embedded: the tq+sqlite backend is the registry; Redis: Celery's backend + a Redis registry."""
    if request.param == "embedded":
        shop: Shop = request.getfixturevalue("embedded_shop")
        return shop
    shop = request.getfixturevalue("redis_shop")
    shop.app.conf.update(REDIS_REGISTRY)
    return shop


def _conf(shop: Shop) -> dict[str, str]:
    return {"TQSHOP_CONF": json.dumps(REDIS_REGISTRY)} if shop.kind == "redis" else {}


def test_status_shows_queue_depth_per_priority_and_agrees_with_the_registry(
    monitored: Shop, data_dir: str
) -> None:
    shop = monitored
    for _ in range(3):
        shop.app.tasks["tqshop.add"].apply_async((1, 2), priority=Priority.CRITICAL)
    for _ in range(2):
        shop.app.tasks["tqshop.add"].apply_async((1, 2), priority=Priority.LOW)
    env = _env(shop, data_dir, **_conf(shop))
    queued = _tq(env, "status", "--once", "--json")
    assert queued.returncode == 0, queued.stderr
    snap = json.loads(queued.stdout)
    depth = {(q["queue"], q["priority"]): q["messages"] for q in snap["queues"]}
    assert depth[("tq.default", 9)] == 3 and depth[("tq.default", 2)] == 2
    assert snap["counts"] == {"QUEUED": 5}
    assert set(snap["oldest_waiting"]) == {"9", "2"}

    shop.start_worker(env=_conf(shop))
    failed = shop.app.tasks["tqshop.slow_fail"].apply_async((0.01,), tags={"vip"})
    with pytest.raises(celery_tq.errors.InvalidInput):
        failed.get(timeout=30)
    shop.app.tasks["tqshop.add"].apply_async((2, 2)).get(timeout=30)
    registry = celery_tq.system_for(shop.app).registry
    deadline = time.monotonic() + 20
    while registry.counts().get("SUCCESS", 0) < 6 and time.monotonic() < deadline:
        time.sleep(0.1)
    after = json.loads(_tq(env, "status", "--once", "--json").stdout)
    assert after["counts"] == registry.counts() == {"SUCCESS": 6, "FAILURE": 1}
    assert after["failures_by_tag"] == {"billing": 1, "vip": 1}
    assert sum(q["messages"] for q in after["queues"]) == 0
    assert {"9", "2", "5"} <= set(after["queue_wait_ms"])
    human = _tq(env, "status", "--once")
    assert human.returncode == 0 and "Failures by tag" in human.stdout


def test_status_on_an_empty_registry_or_a_wrong_broker_is_one_line_and_exit_1(
    redis_shop: Shop, data_dir: str
) -> None:
    empty = _tq(_env(redis_shop, data_dir, **_conf(redis_shop)), "status", "--once")
    assert empty.returncode == 1
    assert len(empty.stderr.strip().splitlines()) == 1 and "no task recorded" in empty.stderr
    wrong = _tq(_env(redis_shop, data_dir, TQSHOP_BROKER_URL="redis://127.0.0.1:1/0"), "status", "--once")
    assert wrong.returncode == 1
    assert len(wrong.stderr.strip().splitlines()) == 1, wrong.stderr


def _scrape(port: int) -> str:
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                return str(response.read().decode())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _parse(text: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("tq_"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values


def _exporter_metrics(env: dict[str, str]) -> dict[str, float]:
    """Start ``celery tq exporter`` with ``env``, scrape it once, stop it: the samples."""
    return _parse(_exporter_text(env))


def _exporter_text(env: dict[str, str]) -> str:
    """Start ``celery tq exporter`` with ``env``, scrape it once, stop it: the whole page."""
    port = free_port()
    exporter = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tqshop", "tq", "exporter", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        text = _scrape(port)
    finally:
        exporter.terminate()
        exporter.wait(10)
    return text


def test_exporter_metrics_agree_with_the_registry(redis_shop: Shop, data_dir: str) -> None:
    redis_shop.app.conf.update(REDIS_REGISTRY)
    redis_shop.start_worker(env=_conf(redis_shop))
    redis_shop.app.tasks["tqshop.add"].apply_async((1, 1), priority=9).get(timeout=30)
    with pytest.raises(celery_tq.errors.InvalidInput):
        redis_shop.app.tasks["tqshop.slow_fail"].apply_async((0.01,), tags={"vip"}).get(timeout=30)
    old = time.time() - 2 * 3600  # a vip failure from before the window: not counted
    store_for_url(REDIS_REGISTRY["tq_registry_url"]).write(
        [
            change(
                "old-failure", "FAILURE", 0, submitted_at=old, finished_at=old, name="tqshop.x", tags=["vip"]
            )
        ]
    )
    conf = json.dumps({"tq_metric_tags": ["vip"], **REDIS_REGISTRY})
    text = _exporter_text(_env(redis_shop, data_dir, TQSHOP_CONF=conf))
    metrics = _parse(text)
    assert metrics["tq_up"] == 1
    assert metrics["tq_refused_messages_total"] == 0
    assert metrics['tq_tasks{name="tqshop.add",state="SUCCESS"}'] == 1
    assert metrics['tq_tasks{name="tqshop.slow_fail",state="FAILURE"}'] == 1
    assert metrics['tq_recent_task_failures_by_tag{tag="vip"}'] == 1
    assert "# TYPE tq_recent_task_failures_by_tag gauge" in text  # it goes down: not a counter
    assert (
        "# HELP tq_recent_task_failures_by_tag Tasks submitted in the last 3600 s that ended in FAILURE"
        in text
    )
    assert "failures_by_tag_total" not in text
    assert not any('tag="billing"' in key for key in metrics)  # not in the allowlist
    assert metrics['tq_queue_depth{priority="9",queue="tq.default"}'] == 0
    assert metrics['tq_queue_wait_seconds_count{priority="9"}'] == 1
