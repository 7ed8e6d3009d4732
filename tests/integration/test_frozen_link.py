"""A half-open broker link (frozen, no FIN) with task events on: the worker notices, reconnects
and goes on by itself, losing nothing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.ports import free_port
from tests.tcp_proxy import PROXY

from .conftest import Shop


def test_worker_resumes_by_itself_after_its_rabbitmq_link_freezes(
    rabbitmq_shop: Shop, tmp_path: Path
) -> None:
    port = free_port()
    script = tmp_path / "proxy.py"
    script.write_text(PROXY)
    proxy = subprocess.Popen([sys.executable, str(script), str(port), "5672"], stdout=subprocess.PIPE)
    try:
        assert proxy.stdout is not None and proxy.stdout.readline().strip() == b"ready"
        proxied = rabbitmq_shop.broker_url.replace(":5672/", f":{port}/")
        conf = json.dumps({"broker_heartbeat": 10})
        rabbitmq_shop.start_worker(env={"TQSHOP_BROKER_URL": proxied, "TQSHOP_CONF": conf})
        add = rabbitmq_shop.app.tasks["tqshop.add"]
        assert add.delay(1, 1).get(timeout=30) == 2
        proxy.send_signal(signal.SIGUSR1)  # every link open now hangs; new ones work
        frozen_at = time.monotonic()
        results = [add.delay(i, 1) for i in range(5)]
        assert [r.get(timeout=90) for r in results] == [i + 1 for i in range(5)]
        resumed = time.monotonic() - frozen_at
        print(f"resumed {resumed:.1f} s after the freeze")
        assert resumed < 60
    finally:
        proxy.kill()
        proxy.wait(10)
        if proxy.stdout is not None:
            proxy.stdout.close()


def test_worker_resumes_by_itself_after_its_redis_link_freezes(tmp_path: Path, data_dir: str) -> None:
    from celery_tq.testing import WorkerProcess
    from tests.integration.conftest import APPS, tqshop
    from tests.private_redis import PrivateRedis

    server = PrivateRedis(tmp_path, False)
    server.start()
    port = free_port()
    script = tmp_path / "proxy.py"
    script.write_text(PROXY)
    proxy = subprocess.Popen(
        [sys.executable, str(script), str(port), str(server.port)], stdout=subprocess.PIPE
    )
    direct, results = f"tq+redis://127.0.0.1:{server.port}/0", f"tq+redis://127.0.0.1:{server.port}/1"
    app = tqshop.make_app(direct, results)
    env = {
        "TQSHOP_BROKER_URL": f"tq+redis://127.0.0.1:{port}/0",
        "TQSHOP_RESULT_BACKEND": results,
        "TQ_DATA_DIR": data_dir,
        "PYTHONPATH": f"{APPS}:{Path(__file__).parents[2]}",
    }
    worker = WorkerProcess("tqshop", concurrency=2, env=env)
    try:
        assert proxy.stdout is not None and proxy.stdout.readline().strip() == b"ready"
        worker.start()
        add = app.tasks["tqshop.add"]
        assert add.delay(1, 1).get(timeout=30) == 2
        proxy.send_signal(signal.SIGUSR1)  # every link open now hangs; new ones work
        frozen_at = time.monotonic()
        pending = [add.delay(i, 1) for i in range(5)]
        assert [r.get(timeout=150) for r in pending] == [i + 1 for i in range(5)]
        resumed = time.monotonic() - frozen_at
        print(f"resumed {resumed:.1f} s after the freeze")
        assert resumed < 60
    finally:
        worker.stop()
        app.close()
        proxy.kill()
        proxy.wait(10)
        if proxy.stdout is not None:
            proxy.stdout.close()
        server.stop()


def test_closing_a_consumer_whose_redis_link_froze_requeues_what_it_held(tmp_path: Path) -> None:
    """Celery's reconnect and cold shutdown close the connection of a link gone silent, after
    bounding its sockets (``bound_open_broker_sockets``); the requeue of what the consumer held
    goes over a link of its own with the heartbeat's short timeouts, so it neither waits for
    ``socket_timeout`` nor leaves the message to the heartbeat's expiry."""
    import redis
    from celery.utils.threads import bound_open_broker_sockets
    from kombu import Connection, Consumer, Producer, Queue

    from celery_tq.transport import register_transports
    from tests.private_redis import PrivateRedis
    from tests.tcp_proxy import TcpProxy

    register_transports()
    server = PrivateRedis(tmp_path, False)
    server.start()
    queue = Queue("frozen-close")
    try:
        with (
            TcpProxy(server.port) as proxy,
            Connection(f"tq+redis://127.0.0.1:{server.port}/0") as direct,
            Connection(f"tq+redis://127.0.0.1:{proxy.port}/0") as proxied,
        ):
            Producer(direct).publish({"n": 1}, routing_key=queue.name, declare=[queue])
            held: list[object] = []
            consumer = Consumer(
                proxied, queues=[queue], accept=["json"], callbacks=[lambda b, m: held.append(m)]
            )
            consumer.consume()
            proxied.drain_events(timeout=10)
            assert len(held) == 1  # delivered, not acked: in the consumer's processing list
            proxy.freeze()  # every link open now hangs; new ones work
            bound_open_broker_sockets(proxied, 5.0)  # what Celery does before closing
            closing = threading.Thread(target=proxied.close, daemon=True)
            closing.start()
            closing.join(60)
            assert not closing.is_alive()
            waiting = redis.Redis(port=server.port).llen(queue.name)
            assert waiting == 1, "the held message was not requeued when the connection closed"
    finally:
        server.kill()
