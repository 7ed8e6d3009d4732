"""Records forged in a ``tq+redis://`` store (anyone who can write to it): the caller's ``get()``
raises a typed ``Exception``, never a ``BaseException`` such as ``SystemExit``."""

from __future__ import annotations

import json
import uuid

import pytest
import redis as redis_client
from celery import Celery
from celery.result import AsyncResult

import celery_tq
from celery_tq.errors import ExecutionFailed, StorageError
from tests.conftest import REDIS_UNIT_DB


def test_forged_records_in_the_tq_store_end_in_typed_errors(redis_host: str) -> None:
    url = f"redis://{redis_host}/{REDIS_UNIT_DB}"
    app = Celery("forged", set_as_current=False)
    celery_tq.install(app, preset="testing")
    app.conf.update(result_backend=f"tq+{url}")
    client = redis_client.Redis.from_url(url)
    deep = '{"exc_type": "ValueError", "exc_module": "builtins", "tq": ' + '{"cause": ' * 3000 + "null"
    deep += "}" * 3001
    forged = {
        "exit": json.dumps(
            {"result": {"exc_type": "SystemExit", "exc_module": "builtins", "exc_message": [3]}}
        ),
        "deep": '{"result": ' + deep + "}",
    }
    raised_types = {}
    try:
        for label, meta in forged.items():
            task_id = str(uuid.uuid4())
            row = {"id": task_id, "name": "x", "state": "FAILURE", "meta": meta, "retries": 0, "priority": 5}
            client.hset(f"tq:t:{task_id}", mapping={**row, "tags": "[]", "submitted_at": 1700000000.0})
            with pytest.raises(Exception) as info:  # a BaseException here would be the bug
                AsyncResult(task_id, app=app).get(timeout=5)
            raised_types[label] = type(info.value)
    finally:
        client.flushdb()
        client.close()
    assert raised_types == {"exit": ExecutionFailed, "deep": StorageError}
