"""Queue depths on RabbitMQ: a queue that does not exist yet never hides the ones after it."""

from __future__ import annotations

import json
from pathlib import Path

from celery_tq import Priority

from .conftest import Shop, tqshop
from .test_monitoring import _env, _exporter_metrics, _tq

BANDS = {"tq.high": [7, 9], "tq.default": [3, 6], "tq.low": [0, 2]}


def test_status_and_exporter_count_every_queue_after_a_missing_one_on_rabbitmq(
    rabbitmq_shop: Shop, data_dir: str
) -> None:
    shop = rabbitmq_shop
    registry = f"sqlite:///{Path(data_dir) / 'registry.db'}"  # beside Celery's own db results
    # An app of its own: tq_* settings are read once, when an app's configuration is built
    # (the fixture's app has built its own already).
    bands = {k: tuple(v) for k, v in BANDS.items()}
    app = tqshop.make_app(
        shop.broker_url, shop.result_backend, tq_priority_bands=bands, tq_registry_url=registry
    )
    try:
        for _ in range(4):  # only tq.low is declared: tq.high and tq.default answer 404 first
            app.tasks["tqshop.add"].apply_async((1, 2), priority=Priority.LOW)
    finally:
        app.close()
    conf = json.dumps({"tq_priority_bands": BANDS, "tq_registry_url": registry})
    env = _env(shop, str(Path(data_dir)), TQSHOP_CONF=conf)

    status = _tq(env, "status", "--once", "--json")
    assert status.returncode == 0, status.stderr
    depth = {q["queue"]: q["messages"] for q in json.loads(status.stdout)["queues"]}
    assert depth == {"tq.high": 0, "tq.default": 0, "tq.low": 4}

    metrics = _exporter_metrics(env)
    assert metrics["tq_up"] == 1
    assert metrics['tq_queue_depth{priority="",queue="tq.low"}'] == 4
    assert metrics['tq_queue_depth{priority="",queue="tq.high"}'] == 0
