"""Pool processes hand outcomes to the worker's main process; acks wait until they are durable.

Real ``celery worker -P prefork -c 2`` processes, production preset, ``tq+redis://`` broker, the
registry on PostgreSQL and on Redis (each written from the main process's event loop), reached by
the worker through a TCP proxy the test cuts. Tasks use Celery's own task class (``@app.task``),
so Celery's request class is the one that waits.
"""

from __future__ import annotations

import os
import signal
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis

from celery_tq.registry import Registry, store_for_url
from celery_tq.registry.redis_async import CLIENT_NAME
from celery_tq.testing import WorkerProcess
from celery_tq.worker.handoff import UNRECORDED
from tests.app_module import app_module
from tests.registry_support import pg_url, store_url
from tests.tcp_proxy import TcpProxy
from tests.waiting import wait_for

__all__ = ["pg_url"]


APP = textwrap.dedent(
    """
    import os, time
    from celery import Celery
    import celery_tq

    app = Celery("handapp")
    celery_tq.install(app, preset="production")
    app.conf.update(
        broker_url=os.environ["HAND_BROKER"],
        result_backend=os.environ["HAND_BACKEND"],
        task_retry_on_worker_lost=False,
        tq_store_retry_timeout=600,
        tq_hand_over_outcomes=True,
        broker_transport_options={
            "priority_steps": list(range(10)), "confirm_publish": True,
            "heartbeat_ttl": 3, "heartbeat_interval": 0.5, "recover_interval": 1,
        },
    )

    @app.task(name="hand.work", shared=False)
    def work(i, seconds=0.01):
        time.sleep(seconds)
        return {"i": i, "pid": os.getpid()}
    """
)

Hand = tuple[object, Registry, dict[str, str], str]  # app, registry, worker env, store URL


@pytest.fixture(params=["postgresql", "redis"])
def hand(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Hand]:
    broker = request.getfixturevalue("redis_dbs")[0].replace("redis://", "tq+redis://")
    url = store_url(request.param, request, tmp_path)
    backend = f"tq+{url}"
    env = {"HAND_BROKER": broker, "HAND_BACKEND": backend}
    with app_module(tmp_path, "handapp", APP, env) as (app, worker_env):
        yield app, Registry(store_for_url(backend)), worker_env, url


def _states(registry: Registry, ids: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for task_id in ids:
        record = registry.get(task_id)
        key = "missing" if record is None else record.state
        counts[key] = counts.get(key, 0) + 1
    return counts


def test_a_task_whose_record_cannot_be_written_is_not_acked_and_runs_again_after_kill_9(
    hand: Hand, tmp_path: Path
) -> None:
    app, registry, env, url = hand
    work = app.tasks["hand.work"]  # type: ignore[attr-defined]
    port = urlsplit(url).port
    assert port is not None
    with TcpProxy(port) as proxy:
        proxied = url.replace(f":{port}/", f":{proxy.port}/")
        first = WorkerProcess(
            "handapp", concurrency=2, env={**env, "HAND_BACKEND": f"tq+{proxied}"}, cwd=tmp_path
        )
        first.start()
        try:
            assert work.delay(-1).get(timeout=30)["i"] == -1  # the worker's links to the store are up
            # A task that reaches an idle worker is written by its own pool process; a long one
            # keeps the worker busy, so the 20 below are handed over (and it is not among them).
            busy = work.delay(-2, 5.0)
            wait_for(lambda: (r := registry.get(busy.id)) is not None and r.state == "STARTED", 30, "STARTED")
            proxy.stop()  # every link cut, and nothing listens: the store is unreachable from the worker
            ids = [work.delay(i).id for i in range(20)]
            wait_for(lambda: first.log.count("succeeded in") >= 1 + 3, 60, "tasks to run")
            time.sleep(2.0)  # what the worker would ack or take next, it has by now
            ran = first.log.count("succeeded in") - 1
            # Its pool processes stop running tasks: each has run at most UNRECORDED whose outcomes
            # are not written (the long task's process once it is done), fewer than the 20 sent.
            assert 3 <= ran <= 2 * UNRECORDED + 1, first.log[-3000:]
            assert _states(registry, ids) == {"QUEUED": 20}  # nothing written...
        finally:
            first.kill()  # ...and nothing acked: the broker hands all 20 out again
    second = WorkerProcess("handapp", concurrency=2, env=env, cwd=tmp_path).start()
    try:
        wait_for(lambda: _states(registry, ids) == {"SUCCESS": 20}, 90, "every task to end SUCCESS")
        assert [work.AsyncResult(t).get(timeout=5)["i"] for t in ids] == list(range(20))
    finally:
        second.stop()


# A task given to a pool process a moment before the shutdown, whose start the main process has not
# seen yet, is dropped from the pool's books by Celery's warm shutdown (``Consumer.on_close``
# flushes the pool) and runs anyway; its message is never acked and the next worker gets it again,
# redelivered (plain Celery runs it twice too). The hand-over's request skips such a message, its
# task already ended, for Celery's own tasks too (this test's ``@app.task``): each task runs once.
def test_a_warm_shutdown_writes_and_acks_what_its_pool_finished(hand: Hand, tmp_path: Path) -> None:
    app, registry, env, url = hand
    work = app.tasks["hand.work"]  # type: ignore[attr-defined]
    ids = [work.delay(i, 0.02).id for i in range(200)]
    first = WorkerProcess("handapp", concurrency=2, env=env, cwd=tmp_path).start()
    try:
        assert first.process is not None
        wait_for(lambda: registry.counts().get("SUCCESS", 0) >= 50, 60, "50 tasks done")
        if url.startswith("redis://"):  # the main process writes on a connection of its own
            client = redis.Redis.from_url(url)
            db = client.connection_pool.connection_kwargs.get("db", 0)
            assert any(c["name"] == CLIENT_NAME and int(c["db"]) == db for c in client.client_list())
            client.close()
        os.kill(first.process.pid, signal.SIGTERM)  # warm shutdown: the pool finishes its tasks
        first.process.wait(60)
    finally:
        first.stop()  # its log closed; and a failed wait above leaves no worker consuming
    done_then = registry.counts().get("SUCCESS", 0)
    second = WorkerProcess("handapp", concurrency=2, env=env, cwd=tmp_path).start()
    try:
        wait_for(lambda: _states(registry, ids) == {"SUCCESS": 200}, 120, "every task to end SUCCESS")
    finally:
        second.stop()
    records = [registry.get(t) for t in ids]
    twice = [(r.id, r.deliveries, r.worker) for r in records if r is not None and r.deliveries != 1]
    # (if one ever does run twice: the log lines that name it, and the errors, say which worker
    # ran it when)
    logs = ""
    for name, worker in (("first", first), ("second", second)):
        lines = [
            line for line in worker.log.splitlines() if "ERROR" in line or any(t[0] in line for t in twice)
        ]
        logs += f"--- {name} worker\n" + "\n".join(lines)[-4000:] + "\n"
    assert done_then >= 50
    assert twice == [], logs  # each task ran once: what the first worker finished, it wrote and acked
