"""``tq.start()`` / ``tq.shutdown()``: a worker inside the caller's process, for scripts and tests."""

from __future__ import annotations

import threading
import time

from celery import Celery

import celery_tq


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
