"""``check()`` and ``celery tq check`` spell out the fix for each priority trap, on the real brokers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from celery import Celery
from kombu import Connection, Queue

import celery_tq


def _codes(app: Celery) -> dict[str, str]:
    return {f.code: f.level for f in celery_tq.system_for(app).check()}


def test_existing_rabbitmq_queue_without_max_priority_is_an_error_with_the_migration(
    rabbitmq_vhost: str, data_dir: str, tmp_path: Path
) -> None:
    queue = "tq.check-406"
    with Connection(rabbitmq_vhost) as conn:
        Queue(queue).bind(conn.default_channel).declare()  # declared by someone without priority
    try:
        module = tmp_path / "legacy.py"
        module.write_text(
            "from celery import Celery\nimport celery_tq\n"
            "app = Celery('legacy')\n"
            f"app.conf.update(broker_url={rabbitmq_vhost!r}, tq_default_queue={queue!r}, "
            "task_default_queue=" + repr(queue) + ")\n"
            "celery_tq.install(app)\n"
        )
        app = Celery("legacy", set_as_current=False)
        celery_tq.install(app)
        app.conf.update(broker_url=rabbitmq_vhost, tq_default_queue=queue, task_default_queue=queue)
        findings = {f.code: f for f in celery_tq.system_for(app).check()}
        assert findings["amqp-queue-arguments"].level == "error"
        assert f"rabbitmqctl delete_queue {queue}" in findings["amqp-queue-arguments"].fix
        cli = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "legacy", "tq", "check"],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(tmp_path)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert cli.returncode == 1, cli.stdout + cli.stderr
        assert "amqp-queue-arguments" in cli.stdout
        app.close()
    finally:
        with Connection(rabbitmq_vhost) as conn:
            conn.default_channel.queue_delete(queue)


def test_rabbitmq_queue_declared_by_celery_tq_passes_the_check(rabbitmq_vhost: str, data_dir: str) -> None:
    app = Celery("fresh", set_as_current=False)
    celery_tq.install(app)
    app.conf.update(broker_url=rabbitmq_vhost)
    with app.connection_for_write() as conn:
        for queue in app.amqp.queues.values():
            queue.bind(conn.default_channel).declare()
    codes = _codes(app)
    assert "amqp-queue-arguments" not in codes
    assert not [c for c, level in codes.items() if level == "error"]
    app.close()


def test_quorum_queue_with_priority_on_rabbitmq_3_is_an_error(rabbitmq_vhost: str, data_dir: str) -> None:
    app = Celery("quorum", set_as_current=False)
    celery_tq.install(app)
    app.conf.update(
        broker_url=rabbitmq_vhost,
        task_queues=[Queue("tq.default", queue_arguments={"x-queue-type": "quorum", "x-max-priority": 10})],
    )
    assert _codes(app)["amqp-quorum-priority"] == "error"
    app.close()


def test_bands_on_rabbitmq_say_one_worker_per_band(rabbitmq_vhost: str, data_dir: str) -> None:
    app = Celery("bands", set_as_current=False)
    celery_tq.install(app)
    app.conf.update(broker_url=rabbitmq_vhost, tq_priority_bands={"tq.high": (7, 9), "tq.default": (0, 6)})
    assert _codes(app)["amqp-bands-interleave"] == "info"
    app.close()


def test_production_preset_on_rabbitmq_has_no_findings(rabbitmq_vhost: str, data_dir: str) -> None:
    """Moved from tests/unit: the checks of an AMQP broker ask the broker."""
    app = Celery("prod", broker=rabbitmq_vhost, set_as_current=False)
    assert celery_tq.install(app, preset="production").check() == []
