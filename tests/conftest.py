"""Shared fixtures: real services (Redis, RabbitMQ, PostgreSQL), each test isolated.

With TQ_REQUIRE_SERVICES=1 (CI) a missing service fails the test; otherwise it is skipped.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

REQUIRE_SERVICES = os.environ.get("TQ_REQUIRE_SERVICES") == "1"
REDIS_HOST = "127.0.0.1:6379"


def _redis_db_base() -> int:
    """The first of this test process's two Redis databases (base and base + 1).

    A plain pytest run uses TQ_TEST_REDIS_DB_BASE (default 12). Under pytest-xdist (``make test``)
    worker ``gwN`` takes the N-th base of TQ_TEST_REDIS_DB_BASES (default ``0,2,4,6``): as many
    workers as bases, and two checkouts running the suite at once on one Redis give each a set of
    its own (``0,2,4,6`` and ``8,10,12,14``).
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1", ... set by pytest-xdist
    if worker is None:
        return int(os.environ.get("TQ_TEST_REDIS_DB_BASE", "12"))
    bases = [int(b) for b in os.environ.get("TQ_TEST_REDIS_DB_BASES", "0,2,4,6").split(",") if b.strip()]
    index = int(worker.removeprefix("gw"))
    if index >= len(bases):
        raise pytest.UsageError(
            f"xdist worker {worker} has no Redis database base: TQ_TEST_REDIS_DB_BASES={bases} "
            f"names {len(bases)}, so run at most -n {len(bases)}"
        )
    return bases[index]


REDIS_DB_BASE = _redis_db_base()
# The worker processes and modules that read the variable (tests/fleet/scenario.py) see the same.
os.environ["TQ_TEST_REDIS_DB_BASE"] = str(REDIS_DB_BASE)
# No test uses redis_dbs and the transport/unit databases at once: two databases per process.
REDIS_BROKER_DB, REDIS_RESULT_DB = REDIS_DB_BASE, REDIS_DB_BASE + 1
REDIS_TRANSPORT_DB, REDIS_UNIT_DB = REDIS_BROKER_DB, REDIS_RESULT_DB


@contextlib.contextmanager
def _turn(directory: Path, exclusive: bool) -> Iterator[None]:
    """Readers-writer lock of one parallel run: tests marked ``exclusive`` run alone.

    Every test holds ``room`` shared while it runs; an exclusive one holds it exclusively. The
    ``gate`` stops new tests from entering while an exclusive one waits for the room to empty.
    """
    with open(directory / "tq-gate.lock", "a") as gate, open(directory / "tq-room.lock", "a") as room:
        if exclusive:
            fcntl.flock(gate, fcntl.LOCK_EX)
            fcntl.flock(room, fcntl.LOCK_EX)
        else:
            fcntl.flock(gate, fcntl.LOCK_SH)
            fcntl.flock(room, fcntl.LOCK_SH)
            fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(room, fcntl.LOCK_UN)
            if exclusive:
                fcntl.flock(gate, fcntl.LOCK_UN)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, None, None]:
    """Under pytest-xdist, a test marked ``exclusive`` (timing-sensitive: tests/fleet) waits for the
    tests running in the other workers to end, and none starts until it has ended. Outermost
    hook wrapper: the wait is before pytest-timeout's clock starts, and covers the fixtures."""
    basetemp = item.config.option.basetemp  # <the run's basetemp>/popen-gwN under xdist
    if "PYTEST_XDIST_WORKER" not in os.environ or not basetemp:
        yield
        return
    with _turn(Path(basetemp).parent, item.get_closest_marker("exclusive") is not None):
        yield


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
