"""The PostgreSQL connections a worker holds (README, "PostgreSQL connections"): a real
``celery worker -P prefork -c 2`` with the production preset, counted in ``pg_stat_activity`` by
an ``application_name`` of this test's own, after it ran tasks that its pool handed over."""

from __future__ import annotations

import os
import sys
import textwrap
import uuid
from pathlib import Path

from celery_tq.testing import WorkerProcess
from tests.registry_support import PG_DSN, pg_url

__all__ = ["pg_url"]

ROOT = Path(__file__).parents[2]

APP = textwrap.dedent(
    """
    import os, time
    from celery import Celery
    import celery_tq

    app = Celery("connapp")
    celery_tq.install(app, preset="production")
    app.conf.update(broker_url=os.environ["CONN_BROKER"], result_backend=os.environ["CONN_BACKEND"])

    @app.task(name="conn.work", shared=False)
    def work(i):
        time.sleep(0.02)
        return i
    """
)


def _connections(name: str) -> int:
    import psycopg

    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (name,)
        ).fetchone()
    return int(row[0]) if row else 0


def test_a_worker_of_concurrency_c_holds_c_plus_two_connections(
    pg_url: str, redis_dbs: tuple[str, str], tmp_path: Path
) -> None:
    name = f"tqconn{uuid.uuid4().hex[:8]}"
    broker = redis_dbs[0].replace("redis://", "tq+redis://")
    backend = f"tq+{pg_url}&application_name={name}"
    (tmp_path / "connapp.py").write_text(APP)
    env = {"CONN_BROKER": broker, "CONN_BACKEND": backend, "PYTHONPATH": f"{tmp_path}:{ROOT}"}
    os.environ.update(CONN_BROKER=broker, CONN_BACKEND=backend)
    sys.path.insert(0, str(tmp_path))
    try:
        import connapp  # type: ignore[import-not-found]

        work = connapp.app.tasks["conn.work"]
        with WorkerProcess("connapp", concurrency=2, env=env, cwd=tmp_path):
            results = [work.delay(i) for i in range(40)]  # a backlog: the pool hands outcomes over
            assert [r.get(timeout=60) for r in results] == list(range(40))
            client = 2  # this process: its store connection and its get() listener
            # each pool process: its store connection; the main process: the store's and the
            # hand-over's event-loop connection (the pooled one that created the tables is closed)
            held = _connections(name) - client
            assert 2 <= held <= 2 + 2, held
        connapp.app.close()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("connapp", None)
