"""Every error class crosses a real worker and JSON and reaches the caller intact."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from celery.exceptions import TaskRevokedError

from celery_tq import errors
from celery_tq.system import system_for
from tests.waiting import wait_for

from .conftest import Shop

ERROR_ARGS: dict[str, list[Any]] = {
    "ExecutionFailed": ["tqshop.raise_error", "ValueError: bad"],
    "TaskTimeout": ["tqshop.raise_error", 2.5],
    "ResourceUnavailable": ["payments-db"],
    "IoError": ["write", "/var/data/invoice.pdf"],
    "InvalidInput": ["order_id must be positive"],
    "WorkerLost": ["tqshop.raise_error", "signal 9"],
    "Cancelled": ["tqshop.raise_error"],
    "StorageError": ["registry unreachable", "abc-123"],
    "ConfigurationError": ["bad band table"],
    "MetadataError": ["priority 12 is out of range"],
}


def test_every_error_class_reaches_the_caller_with_fields_context_cause_and_traceback(
    shop: Shop,
) -> None:
    shop.start_worker()
    for cls_name, args in ERROR_ARGS.items():
        result = shop.app.tasks["tqshop.raise_error"].delay(cls_name, args)
        with pytest.raises(getattr(errors, cls_name)) as caught:
            result.get(timeout=30)
        exc = caught.value
        assert type(exc) is getattr(errors, cls_name)
        assert list(exc.args) == args
        assert exc.context == ["step 1"]
        assert isinstance(exc.__cause__, ValueError)
        assert str(exc.__cause__) == "root cause"
        assert exc.remote_traceback and "raise cls(*args) from exc" in exc.remote_traceback
        assert exc.retryable is (cls_name == "ResourceUnavailable")


def test_os_error_becomes_io_error_with_path_and_context(embedded_or_redis_shop: Shop, tmp_path: Any) -> None:
    embedded_or_redis_shop.start_worker()
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(errors.IoError) as caught:
        embedded_or_redis_shop.app.tasks["tqshop.read_file"].delay(missing).get(timeout=30)
    assert caught.value.path == missing
    assert caught.value.context == ["loading invoice 42"]
    assert isinstance(caught.value.__cause__, FileNotFoundError)


@pytest.mark.parametrize("kind", ["embedded", "redis"])
def test_retryable_error_retries_with_backoff_then_succeeds(
    kind: str, request: pytest.FixtureRequest, data_dir: str
) -> None:
    """tqshop.flaky: retry_backoff=1, retry_backoff_max=2, no jitter: 1 s, then 2 s."""
    shop: Shop = request.getfixturevalue(f"{kind}_shop")
    worker = shop.start_worker()
    result = shop.app.tasks["tqshop.flaky"].delay()
    assert result.get(timeout=30) == 2
    assert re.findall(r"Retry in ([\d.]+)s", worker.log) == ["1.0", "2.0"]
    attempts = [json.loads(line) for line in (Path(data_dir) / "attempts.jsonl").read_text().splitlines()]
    assert [a["retries"] for a in attempts] == [0, 1, 2]
    for before, retry, delay in zip(attempts, attempts[1:], (1.0, 2.0), strict=False):
        eta = datetime.fromisoformat(retry["eta"]).timestamp()
        assert eta >= before["started"] + delay  # sent with that countdown
        assert retry["started"] >= eta - 0.05  # and not run before it (timer rounding aside)


def test_connection_error_becomes_resource_unavailable_after_max_retries(
    embedded_or_redis_shop: Shop,
) -> None:
    worker = embedded_or_redis_shop.start_worker()
    with pytest.raises(errors.ResourceUnavailable) as caught:
        embedded_or_redis_shop.app.tasks["tqshop.always_unavailable"].delay().get(timeout=30)
    assert "connection refused" in caught.value.resource
    assert isinstance(caught.value.__cause__, ConnectionError)
    # The pool process logs the retry after storing it, and the retried run may end (and get()
    # return) first, in the other pool process: wait for the line, then count.
    wait_for(lambda: "Retry in" in worker.log, 10, "the retry's log line")
    assert worker.log.count("Retry in") == 1  # max_retries=1


def test_builtin_error_keeps_its_class(embedded_or_redis_shop: Shop) -> None:
    embedded_or_redis_shop.start_worker()
    with pytest.raises(KeyError) as caught:
        embedded_or_redis_shop.app.tasks["tqshop.builtin_error"].delay().get(timeout=30)
    assert caught.value.args == ("missing-key",)
    assert "builtin_error" in caught.value.remote_traceback  # type: ignore[attr-defined]


def test_error_class_the_caller_cannot_import_arrives_as_execution_failed(
    embedded_or_redis_shop: Shop,
) -> None:
    embedded_or_redis_shop.start_worker()
    with pytest.raises(errors.ExecutionFailed) as caught:
        embedded_or_redis_shop.app.tasks["tqshop.private_error"].delay().get(timeout=30)
    assert caught.value.task_name == "tqshop.private_error"
    assert "tqshop_private.PrivateError" in caught.value.error
    assert "secret sauce" in caught.value.error


@pytest.mark.parametrize("task", ["tqshop.card_expired", "tqshop.plain_card_expired"])
def test_error_class_with_its_own_init_arrives_as_execution_failed_with_original_type(
    embedded_shop: Shop, task: str
) -> None:
    embedded_shop.start_worker(concurrency=1)
    result = embedded_shop.app.tasks[task].delay(5)
    with pytest.raises(errors.ExecutionFailed) as caught:
        result.get(timeout=30)
    exc = caught.value
    assert exc.original_type == "tqshop.CardExpired"  # type: ignore[attr-defined]
    assert "card for order 5 expired in month 3" in exc.error
    assert "Unpickleable" not in exc.error
    assert exc.remote_traceback and "raise CardExpired(order_id, 3)" in exc.remote_traceback
    record = system_for(embedded_shop.app).registry.get(result.id)
    assert record is not None and record.error is not None
    assert record.error["type"] == "ExecutionFailed"
    assert "Unpickleable" not in json.dumps(record.error)
    assert record.error["message"].count("ExecutionFailed") == 1


def test_worker_killed_mid_task_reaches_caller_as_worker_lost(redis_shop: Shop) -> None:
    worker = redis_shop.start_worker()
    with pytest.raises(errors.WorkerLost) as caught:
        redis_shop.app.tasks["tqshop.crash"].delay().get(timeout=30)
    assert caught.value.task_name == "tqshop.crash"
    assert worker.process is not None and worker.process.poll() is None  # the worker survived


def test_revoked_task_reaches_caller_as_cancelled_which_plain_celery_code_catches(redis_shop: Shop) -> None:
    redis_shop.start_worker(concurrency=1)
    blocker = redis_shop.app.tasks["tqshop.sleep"].delay(1.5)
    victim = redis_shop.app.tasks["tqshop.add"].delay(1, 2)
    victim.revoke()
    with pytest.raises(TaskRevokedError) as caught:  # what code written for plain Celery catches
        victim.get(timeout=30)
    assert isinstance(caught.value, errors.Cancelled)
    assert blocker.get(timeout=30) == 1.5


def test_wait_for_result_raises_the_tasks_own_error(redis_shop: Shop) -> None:
    import celery_tq

    redis_shop.start_worker()
    tq = celery_tq.system_for(redis_shop.app)
    task_id = tq.submit(redis_shop.app.tasks["tqshop.raise_error"], "InvalidInput", ["bad order"])
    with pytest.raises(errors.InvalidInput) as caught:
        tq.wait_for_result(task_id, timeout=30)
    assert caught.value.message == "bad order"
    assert isinstance(caught.value, ValueError)
