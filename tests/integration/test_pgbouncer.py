"""The PostgreSQL connections workers hold (README, "PostgreSQL connections").

Directly: a ``celery worker -P prefork -c 2`` with the production preset holds c + 2, counted in
``pg_stat_activity`` by an ``application_name`` of the test's own. Through PgBouncer in
transaction mode: a private ``pgbouncer`` (Debian's package) on a free port pools every store
connection of three ``celery worker -c 4`` processes (15 processes, one store connection each)
into at most ``POOL`` server connections; every task still ends with its record and result.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest

from celery_tq.registry import Registry, store_for_url
from celery_tq.testing import WorkerProcess
from tests.app_module import app_module
from tests.conftest import REQUIRE_SERVICES, service_missing
from tests.ports import free_port
from tests.registry_support import PG_DSN, pg_url

__all__ = ["pg_url"]

POOL = 3
N_TASKS = 300

APP = textwrap.dedent(
    """
    import os
    from celery import Celery
    import celery_tq

    app = Celery("bouncedapp")
    celery_tq.install(app, preset="production")
    app.conf.update(broker_url=os.environ["PB_BROKER"], result_backend=os.environ["PB_BACKEND"])

    @app.task(name="pb.double", shared=False)
    def double(i):
        return 2 * i
    """
)


@pytest.fixture
def pgbouncer(pg_url: str) -> Iterator[int]:
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not Path(binary).exists():
        if REQUIRE_SERVICES:
            pytest.fail(
                "pgbouncer is not installed (apt-get install pgbouncer); TQ_REQUIRE_SERVICES=1 requires it"
            )
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer)")
    port = free_port()
    schema = pg_url.rsplit("%3D", 1)[1]  # the test's own schema: PgBouncer passes no options through
    # PgBouncer refuses to run as root: it runs as the postgres user, which must read its files.
    conf_dir = Path(tempfile.mkdtemp(prefix="tq-pgbouncer-"))
    conf_dir.chmod(0o755)
    (conf_dir / "users.txt").write_text('"postgres" ""\n')
    (conf_dir / "pgbouncer.ini").write_text(
        textwrap.dedent(
            f"""
            [databases]
            test = host=127.0.0.1 port=5432 dbname=test connect_query='SET search_path TO {schema}'
            [pgbouncer]
            listen_addr = 127.0.0.1
            listen_port = {port}
            unix_socket_dir =
            auth_type = trust
            auth_file = {conf_dir / "users.txt"}
            admin_users = postgres
            pool_mode = transaction
            default_pool_size = {POOL}
            max_client_conn = 200
            ignore_startup_parameters = extra_float_digits
            """
        )
    )
    user = ["-u", "postgres"] if os.geteuid() == 0 else []
    process = subprocess.Popen([binary, *user, str(conf_dir / "pgbouncer.ini")], stdout=subprocess.DEVNULL)
    import psycopg

    deadline = time.monotonic() + 15
    while True:
        try:
            psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/test", connect_timeout=1).close()
            break
        except psycopg.OperationalError as exc:
            if process.poll() is not None or time.monotonic() > deadline:
                service_missing("PgBouncer", str(exc))
            time.sleep(0.1)
    yield port
    process.terminate()
    process.wait(10)
    shutil.rmtree(conf_dir, ignore_errors=True)


def _app(tmp_path: Path, broker: str, backend: str) -> AbstractContextManager[tuple[Any, dict[str, str]]]:
    """The test app, imported here, and the environment its workers need."""
    return app_module(tmp_path, "bouncedapp", APP, {"PB_BROKER": broker, "PB_BACKEND": backend})


def _connections(name: str) -> int:
    import psycopg

    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
        row = conn.execute(query, (name,)).fetchone()
    return int(row[0]) if row else 0


def test_a_worker_of_concurrency_c_holds_c_plus_two_connections(
    pg_url: str, redis_dbs: tuple[str, str], tmp_path: Path
) -> None:
    name = f"tqconn{uuid.uuid4().hex[:8]}"
    broker = redis_dbs[0].replace("redis://", "tq+redis://")
    with (
        _app(tmp_path, broker, f"tq+{pg_url}&application_name={name}") as (app, env),
        WorkerProcess("bouncedapp", concurrency=2, env=env, cwd=tmp_path),
    ):
        results = [app.tasks["pb.double"].delay(i) for i in range(40)]  # a backlog: handed over
        assert [r.get(timeout=60) for r in results] == [2 * i for i in range(40)]
        client = 2  # this process: its store connection and its get() listener
        # each pool process: its store connection; the main process: the store's and the
        # hand-over's event-loop connection (the pooled one that created the tables is closed)
        held = _connections(name) - client
        assert 2 <= held <= 2 + 2, held


def _server_connections(port: int) -> int:
    import psycopg

    with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/pgbouncer", autocommit=True) as admin:
        cursor = psycopg.ClientCursor(admin)
        cursor.execute("SHOW SERVERS")
        return len(cursor.fetchall())


def test_fifteen_worker_processes_share_three_server_connections_through_pgbouncer(
    pgbouncer: int, redis_dbs: tuple[str, str], tmp_path: Path
) -> None:
    backend = f"tq+postgresql://postgres@127.0.0.1:{pgbouncer}/test?tq_pgbouncer=1"
    broker = redis_dbs[0].replace("redis://", "tq+redis://")
    with _app(tmp_path, broker, backend) as (app, env):
        workers = [
            WorkerProcess("bouncedapp", concurrency=4, env=env, cwd=tmp_path, hostname=f"pb{n}@%h").start()
            for n in range(3)
        ]
        try:
            results = [app.tasks["pb.double"].delay(i) for i in range(N_TASKS)]
            most = 0
            for i, result in enumerate(results):
                assert result.get(timeout=60) == 2 * i
                if i % 50 == 0:
                    most = max(most, _server_connections(pgbouncer))
        finally:
            for worker in workers:
                worker.stop()
        registry = Registry(store_for_url(backend))
        assert registry.counts() == {"SUCCESS": N_TASKS}
        assert 0 < most <= POOL  # 15 pool processes + 3 main processes + this client, 3 server connections
