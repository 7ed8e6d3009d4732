"""A run past its timeout fails with TaskTimeout on every pool; none ignores it silently."""

from __future__ import annotations

import time

import pytest

from celery_tq import errors

from .conftest import Shop


@pytest.mark.parametrize("pool", ["prefork", "solo", "threads"])
def test_task_past_its_timeout_fails_with_task_timeout(embedded_or_redis_shop: Shop, pool: str) -> None:
    embedded_or_redis_shop.start_worker(pool=pool)
    started = time.monotonic()
    with pytest.raises(errors.TaskTimeout) as caught:
        embedded_or_redis_shop.app.tasks["tqshop.sleep"].apply_async((20,), timeout=1).get(timeout=30)
    assert caught.value.task_name == "tqshop.sleep"
    assert caught.value.duration == 1
    assert time.monotonic() - started < 15  # stopped long before the task's own 20 s


@pytest.mark.parametrize("pool", ["prefork", "solo", "threads"])
def test_task_swallowing_the_soft_limit_is_failed_at_the_hard_limit(redis_shop: Shop, pool: str) -> None:
    redis_shop.start_worker(pool=pool)
    with pytest.raises(errors.TaskTimeout) as caught:
        redis_shop.app.tasks["tqshop.stubborn"].apply_async((20,), timeout=1).get(timeout=30)
    assert caught.value.duration == 1


def test_task_within_its_timeout_succeeds(embedded_or_redis_shop: Shop) -> None:
    embedded_or_redis_shop.start_worker(pool="threads")
    assert (
        embedded_or_redis_shop.app.tasks["tqshop.sleep"].apply_async((0.2,), timeout=5).get(timeout=30) == 0.2
    )


def test_in_process_worker_enforces_timeouts(data_dir: str) -> None:
    from celery import Celery

    import celery_tq

    app = Celery("inproc", set_as_current=False)
    tq = celery_tq.install(app, preset="testing")

    @tq.task(name="inproc.spin", shared=False, timeout=0.5)
    def spin() -> None:
        while True:
            pass

    tq.start()
    try:
        with pytest.raises(errors.TaskTimeout):
            tq.wait_for_result(tq.submit(spin), timeout=20)
    finally:
        tq.shutdown()


def test_celery_time_limit_on_prefork_reports_the_real_limit(redis_shop: Shop) -> None:
    redis_shop.start_worker(pool="prefork")
    with pytest.raises(errors.TaskTimeout) as caught:
        redis_shop.app.tasks["tqshop.celery_limited"].delay(20).get(timeout=30)
    assert caught.value.duration == 1  # the task's soft_time_limit, not "0s"
    assert "exceeded its timeout of 1s" in str(caught.value)


@pytest.mark.parametrize("pool", ["solo", "threads"])
def test_celery_time_limits_of_a_tq_task_are_enforced_on_pools_celery_ignores_them(
    redis_shop: Shop, pool: str
) -> None:
    redis_shop.start_worker(pool=pool)
    started = time.monotonic()
    with pytest.raises(errors.TaskTimeout) as caught:
        redis_shop.app.tasks["tqshop.celery_limited"].delay(8).get(timeout=30)  # soft 1 s, hard 3 s
    assert caught.value.duration == 1
    assert time.monotonic() - started < 7  # not the task's own 8 s


@pytest.mark.parametrize("pool", ["solo", "threads"])
def test_worker_refuses_to_start_on_a_pool_that_would_ignore_a_plain_tasks_time_limit(
    redis_shop: Shop, pool: str
) -> None:
    with pytest.raises(errors.ConfigurationError, match="cannot enforce Celery's soft_time_limit") as caught:
        redis_shop.start_worker(pool=pool, env={"TQSHOP_PLAIN_LIMITED": "1"})
    assert "tqshop.plain_limited" in str(caught.value)


def test_plain_task_time_limits_are_fine_on_prefork(redis_shop: Shop) -> None:
    redis_shop.start_worker(pool="prefork", env={"TQSHOP_PLAIN_LIMITED": "1"})
