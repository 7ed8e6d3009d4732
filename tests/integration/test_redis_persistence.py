"""A Redis broker that keeps nothing on disk is said so by `tq check` and the worker's log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from celery_tq.testing import WorkerProcess
from tests.private_redis import PrivateRedis

from .conftest import APPS

ROOT = Path(__file__).parents[2]


@pytest.fixture(params=[False, True], ids=["no persistence", "aof"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, bool]]:
    server = PrivateRedis(tmp_path, aof=request.param)
    server.start()
    yield f"tq+{server.url}/0", request.param
    server.kill()


def test_check_and_worker_log_warn_when_the_redis_broker_keeps_nothing_on_disk(
    broker: tuple[str, bool], data_dir: str
) -> None:
    url, persistent = broker
    env = {
        **os.environ,
        "TQSHOP_BROKER_URL": url,
        "TQSHOP_RESULT_BACKEND": f"{url.removeprefix('tq+').rsplit('/', 1)[0]}/1".replace(
            "redis://", "tq+redis://"
        ),
        "TQ_DATA_DIR": data_dir,
        "PYTHONPATH": f"{APPS}:{ROOT}",
    }
    check = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tqshop", "tq", "check", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    codes = [finding["code"] for finding in json.loads(check.stdout)]
    assert ("redis-no-persistence" in codes) is not persistent, check.stdout
    with WorkerProcess("tqshop", env=env) as worker:  # started: past its bootsteps
        log = worker.log
    assert ("keeps nothing on disk" in log) is not persistent
