"""Stores for the registry tests: one fresh store of each kind per test.

PostgreSQL: database ``test`` on 127.0.0.1:5432 (user postgres), a schema of the test's own
(named in the URL's ``search_path`` so worker processes use it too), dropped afterwards.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest

from tests.conftest import service_missing

T = TypeVar("T")


def together(calls: list[Callable[[], T]]) -> list[T]:
    """Run ``calls`` in threads of their own, released at once; their results, in order."""
    start = threading.Barrier(len(calls))

    def run(call: Callable[[], T]) -> T:
        start.wait()
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
STORE_KINDS = ["memory", "sqlite", "postgresql", "redis"]


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A SQLAlchemy URL whose connections use a schema of this test's own."""
    import psycopg

    schema = f"tq_test_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(PG_DSN, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
    except psycopg.OperationalError as exc:
        service_missing("PostgreSQL", str(exc).strip())
    yield f"{PG_DSN}?options=-csearch_path%3D{schema}"
    from celery_tq.registry import _stores

    for key, store in list(_stores.items()):
        if schema in key[1]:
            close = getattr(store, "close", None)
            if close is not None:
                close()
            del _stores[key]
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def store_url(kind: str, request: pytest.FixtureRequest, tmp: Path) -> str:
    """The URL of a fresh, empty store of ``kind`` for this test."""
    if kind == "memory":
        return f"memory://{uuid.uuid4().hex}"
    if kind == "sqlite":
        return f"sqlite:///{tmp / 'registry.db'}"
    if kind == "postgresql":
        return str(request.getfixturevalue("pg_url"))
    _, results = request.getfixturevalue("redis_dbs")
    return str(results)
