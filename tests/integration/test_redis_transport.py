"""tq+redis:// with real ``celery worker`` processes: crashes, ETA, events, Redis restart, frozen link.

Tests that do not hurt Redis use db 14 of the shared server (flushed around each test); the
ones that kill, restart or freeze it run a private ``redis-server`` on a free port.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from celery_tq.transport import register_transports
from tests.conftest import REDIS_TRANSPORT_DB, REDIS_UNIT_DB
from tests.integration.redis_runs import Run, check_complete, send
from tests.ports import free_port
from tests.private_redis import PrivateRedis
from tests.tcp_proxy import PROXY

DB = REDIS_TRANSPORT_DB
N_TASKS = 2000

PROD_APP = """
import celery_tq
from celery import Celery

app = Celery("rtprod", set_as_current=False)
tq = celery_tq.install(app, preset="production")

@tq.task(name="rt.hello")
def hello(x):
    return x
"""


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Callable[[bool], PrivateRedis]]:
    servers: list[PrivateRedis] = []

    def make(aof: bool) -> PrivateRedis:
        server = PrivateRedis(tmp_path, aof)
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def shared_db(redis_host: str) -> Iterator[str]:
    client = redis.Redis.from_url(f"redis://{redis_host}/{DB}")
    client.flushdb()
    yield f"tq+redis://{redis_host}/{DB}"
    client.flushdb()
    client.close()


def test_kill_9_of_a_prefork_child_loses_nothing(shared_db: str, run_factory: Callable[..., Run]) -> None:
    victim = N_TASKS // 4
    run = run_factory(shared_db, env={"RT_VICTIM": str(victim)})
    send(shared_db, N_TASKS, sleep=0.001)
    run.worker()
    marker = Path(f"{run.out}.victim")
    deadline = time.monotonic() + 60
    while (not marker.exists() or not marker.read_text()) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(int(marker.read_text()), signal.SIGKILL)  # the child running task `victim`
    records = run.wait_done(N_TASKS, timeout=90)
    check_complete(records, N_TASKS, window=2 * 4)
    assert (victim, True) in records, "the requeued task did not run again marked redelivered"


def test_kill_9_of_the_whole_worker_loses_nothing(shared_db: str, run_factory: Callable[..., Run]) -> None:
    run = run_factory(shared_db)
    send(shared_db, N_TASKS, sleep=0.001)
    first = run.worker()
    run.wait_count(N_TASKS // 4)
    first.kill()
    done_at_kill = {i for i, _ in run.records()}
    run.worker()  # recovers the dead worker's processing list once its heartbeat expires
    records = run.wait_done(N_TASKS, timeout=90)
    check_complete(records, N_TASKS, window=2 * 4)
    redelivered = {i for i, r in records if r}
    assert redelivered, "the recovered tasks were not marked redelivered"
    assert len(redelivered - done_at_kill) <= 2 * 4


def test_eta_task_not_run_twice_while_its_worker_lives(
    shared_db: str, run_factory: Callable[..., Run]
) -> None:
    run = run_factory(shared_db)
    run.worker(concurrency=1)
    run.worker(concurrency=1)  # a second consumer that would get a redelivered copy
    send(shared_db, 1, countdown=30)
    run.wait_done(1, timeout=60)
    # A later task, due after heartbeat_ttl + recover_interval: once it ran, a wrong redelivered
    # copy of the first (due at the same ETA) would have run too.
    send(shared_db, 1, first=1, countdown=4)
    records = run.wait_done(2, timeout=60)
    assert records == [(0, False), (1, False)], records


def test_events_inspect_ping_with_the_production_preset(
    shared_db: str, redis_host: str, run_factory: Callable[..., Run]
) -> None:
    env = {"TQ_BROKER_URL": shared_db, "TQ_RESULT_BACKEND": f"redis://{redis_host}/{REDIS_UNIT_DB}"}
    run = run_factory(shared_db, source=PROD_APP, env=env)
    run.worker()
    register_transports()
    app = Celery("client", set_as_current=False, broker=shared_db)
    try:
        replies = app.control.inspect(timeout=5).ping() or {}
        assert [reply for reply in replies.values()] == [{"ok": "pong"}]
        assert len(app.control.ping(timeout=5)) == 1
        seen: list[dict[str, Any]] = []
        with app.connection() as conn:
            receiver = app.events.Receiver(conn, handlers={"*": seen.append})
            thread = threading.Thread(target=receiver.capture, kwargs={"limit": None, "wakeup": False})
            thread.daemon = True
            thread.start()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not any(e["type"] == "task-succeeded" for e in seen):
                app.send_task("rt.hello", args=(1,), queue="tq.default", ignore_result=True)
                time.sleep(1)
            receiver.should_stop = True
            thread.join(10)
        assert any(e["type"] == "task-succeeded" for e in seen), sorted({e["type"] for e in seen})
    finally:
        app.close()


def test_redis_restart_with_aof_loses_nothing(
    private_redis: Callable[[bool], PrivateRedis], run_factory: Callable[..., Run]
) -> None:
    server = private_redis(True)
    broker = f"tq+redis://127.0.0.1:{server.port}/0"
    n = 400
    run = run_factory(broker)
    send(broker, n, sleep=0.005)
    run.worker()
    run.wait_count(n // 4)
    server.kill()
    time.sleep(2)
    server.start()
    records = run.wait_done(n, timeout=90)
    # Celery drops its reserved copies on reconnect: up to two prefetch windows run again
    check_complete(records, n, window=2 * 2 * 4)


def test_frozen_worker_link_loses_nothing(
    private_redis: Callable[[bool], PrivateRedis], run_factory: Callable[..., Run], tmp_path: Path
) -> None:
    server = private_redis(False)
    port = free_port()
    script = tmp_path / "proxy.py"
    script.write_text(PROXY)
    proxy = subprocess.Popen(
        [sys.executable, str(script), str(port), str(server.port)], stdout=subprocess.PIPE
    )
    try:
        assert proxy.stdout is not None and proxy.stdout.readline().strip() == b"ready"
        n = 300
        direct = f"tq+redis://127.0.0.1:{server.port}/0"
        run = run_factory(f"tq+redis://127.0.0.1:{port}/0")
        send(direct, n, sleep=0.01)
        run.worker()
        run.wait_count(n // 4)
        proxy.send_signal(signal.SIGUSR1)  # every link open now hangs; new ones work
        records = run.wait_done(n, timeout=120)
        check_complete(records, n, window=3 * 2 * 4)
    finally:
        proxy.kill()
        proxy.wait(10)
        if proxy.stdout is not None:
            proxy.stdout.close()
