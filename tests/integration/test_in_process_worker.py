"""``tq.start()`` / ``tq.shutdown()``: a worker inside the caller's process, for scripts and tests."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest
from celery import Celery

import celery_tq
from celery_tq.errors import ResourceUnavailable


def _app() -> tuple[Celery, celery_tq.TaskQueueSystem]:
    app = Celery("inproc", set_as_current=False)
    return app, celery_tq.install(app, preset="testing")


def test_submit_and_wait_for_result_with_the_in_process_worker(data_dir: str) -> None:
    _, tq = _app()

    @tq.task(name="inproc.add", shared=False)
    def add(x: int, y: int) -> int:
        return x + y

    tq.start()
    try:
        assert tq.wait_for_result(tq.submit(add, 2, 3), timeout=20) == 5
        assert tq.wait_for_result(tq.submit("inproc.add", 4, 5, priority=9), timeout=20) == 9
    finally:
        tq.shutdown()


def test_shutdown_waits_for_running_tasks_and_loses_none(data_dir: str) -> None:
    app, tq = _app()
    finished: list[int] = []
    running = threading.Semaphore(0)

    @tq.task(name="inproc.slow", shared=False)
    def slow(n: int) -> int:
        running.release()
        time.sleep(1.0)
        finished.append(n)
        return n

    tq.start(concurrency=2)
    ids = [tq.submit(slow, n) for n in range(2)]
    assert running.acquire(timeout=20) and running.acquire(timeout=20)  # both are running
    tq.shutdown()
    assert sorted(finished) == [0, 1]
    assert [app.AsyncResult(i).get(timeout=5) for i in ids] == [0, 1]


def test_settings_are_read_once_so_the_band_warning_is_logged_once(
    data_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Timed runs and retries used to read (and validate) the settings again each time."""
    app = Celery("inproc", set_as_current=False)
    app.conf.update(tq_priority_bands={"tq.high": (7, 9)})  # 0..6 go to the default queue
    tq = celery_tq.install(app, preset="testing")
    attempts: list[int] = []

    @tq.task(name="inproc.timed", shared=False, timeout=10)
    def timed(n: int) -> int:
        return n

    @tq.task(name="inproc.flaky", shared=False, bind=True, max_retries=2, timeout=10)
    def flaky(self: Any) -> int:
        attempts.append(self.request.retries)
        if len(attempts) < 3:
            raise ResourceUnavailable("db")
        return len(attempts)

    with caplog.at_level(logging.WARNING, logger="celery_tq"):
        tq.start()
        try:
            assert [
                tq.wait_for_result(tq.submit(timed, n, priority=n), timeout=20) for n in range(10)
            ] == list(range(10))
            assert tq.wait_for_result(tq.submit(flaky), timeout=30) == 3
        finally:
            tq.shutdown()
    assert attempts == [0, 1, 2]
    band_warnings = [r for r in caplog.records if "tq_priority_bands leaves priorities" in r.getMessage()]
    assert len(band_warnings) == 1
