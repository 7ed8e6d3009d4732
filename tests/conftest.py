"""Shared fixtures: real services (Redis, RabbitMQ, PostgreSQL), each test isolated.

With TQ_REQUIRE_SERVICES=1 (CI) a missing service fails the test; otherwise it is skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest

REQUIRE_SERVICES = os.environ.get("TQ_REQUIRE_SERVICES") == "1"
REDIS_HOST = "127.0.0.1:6379"
# Four Redis databases from TQ_TEST_REDIS_DB_BASE (default 12): two checkouts running the suite at
# once on one Redis give each a base of its own (0, 4, 8, 12).
REDIS_DB_BASE = int(os.environ.get("TQ_TEST_REDIS_DB_BASE", "12"))
REDIS_BROKER_DB, REDIS_RESULT_DB = REDIS_DB_BASE, REDIS_DB_BASE + 1
REDIS_TRANSPORT_DB, REDIS_UNIT_DB = REDIS_DB_BASE + 2, REDIS_DB_BASE + 3


def service_missing(name: str, why: str) -> None:
    message = f"{name} is not available ({why})"
    if REQUIRE_SERVICES:
        pytest.fail(f"{message}; TQ_REQUIRE_SERVICES=1 requires it")
    pytest.skip(message)


@pytest.fixture(scope="session")
def redis_host() -> str:
    import redis

    client = redis.Redis.from_url(f"redis://{REDIS_HOST}/0", socket_connect_timeout=2)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as exc:
        service_missing("Redis", str(exc))
    finally:
        client.close()
    return REDIS_HOST


@pytest.fixture
def redis_dbs(redis_host: str) -> Iterator[tuple[str, str]]:
    """(broker URL, result URL) on this suite's own Redis databases, flushed around the test."""
    import redis

    urls = (f"redis://{redis_host}/{REDIS_BROKER_DB}", f"redis://{redis_host}/{REDIS_RESULT_DB}")

    def flush() -> None:
        for url in urls:
            client = redis.Redis.from_url(url)
            client.flushdb()
            client.close()

    flush()
    yield urls
    flush()


@pytest.fixture(scope="session")
def rabbitmq_vhost() -> Iterator[str]:
    """An AMQP URL on a vhost of this test session's own, deleted afterwards."""
    if shutil.which("rabbitmqctl") is None:
        service_missing("RabbitMQ", "rabbitmqctl not found")
    vhost = f"tq-test-{uuid.uuid4().hex[:8]}"

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60)

    created = ctl("add_vhost", vhost)
    if created.returncode != 0:
        service_missing("RabbitMQ", created.stderr.strip() or created.stdout.strip())
    ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    yield f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    ctl("delete_vhost", vhost)


@pytest.fixture
def data_dir(tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test gets its own TQ_DATA_DIR, so the development preset never touches the repo."""
    path = str(tmp_path)
    monkeypatch.setenv("TQ_DATA_DIR", path)
    return path
