"""Which ``STARTED`` the tq backend buffers: only the one Celery's tracer stores as a run begins
(it travels with the run's outcome); every other store call is written before it returns."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from celery import Celery
from celery.app.trace import build_tracer

import celery_tq.backend as backend_module


def _app() -> Celery:
    app = Celery("started", set_as_current=False)
    app.conf.update(result_backend=f"tq+memory://{uuid.uuid4().hex}", task_track_started=True)
    return app


@pytest.fixture
def buffered(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """``(task id, state)`` of each row the backend hands to the background writer."""
    rows: list[tuple[str, str]] = []
    enqueue = backend_module.enqueue

    def recording(store: Any, row: Any) -> None:
        rows.append((row["id"], row["state"]))
        enqueue(store, row)

    monkeypatch.setattr(backend_module, "enqueue", recording)
    return rows


def test_a_run_buffers_the_tracers_started_while_update_state_is_written_at_once(
    buffered: list[tuple[str, str]],
) -> None:
    app = _app()
    seen: dict[str, Any] = {}

    @app.task(name="started.report", bind=True, shared=False)
    def report(self: Any) -> int:
        self.update_state(state="STARTED", meta={"step": 1})
        seen["started"] = app.backend.store.read([self.request.id])[0]  # the store itself, no flush
        self.update_state(state="PROGRESS", meta={"step": 2})
        seen["progress"] = app.backend.store.read([self.request.id])[0]
        return 3

    tracer = build_tracer(report.name, report, hostname="w1@host", eager=False, app=app)
    tracer("run-1", (), {}, {"id": "run-1", "hostname": "w1@host", "delivery_info": {}})
    # Celery's test worker and the in-process one give the request another hostname than the tracer
    tracer("run-2", (), {}, {"id": "run-2", "hostname": "host", "delivery_info": {}})

    assert buffered == [("run-1", "STARTED"), ("run-2", "STARTED")]  # the tracer's own, only
    assert seen["started"]["state"] == "STARTED" and '"step": 1' in seen["started"]["meta"]
    assert seen["progress"]["state"] == "PROGRESS" and '"step": 2' in seen["progress"]["meta"]
    assert app.AsyncResult("run-1").get(timeout=5) == 3


def test_store_calls_outside_a_run_are_written_before_they_return(buffered: list[tuple[str, str]]) -> None:
    app = _app()

    @app.task(name="started.noop", shared=False)
    def noop() -> None:
        return None

    backend = app.backend
    backend.store_result("by-hand", {"hostname": "other@host"}, "STARTED")  # Celery's own tests do
    backend.mark_as_started("marked", pid=1, hostname="other@host")
    noop.update_state(task_id="from-client", state="STARTED", meta={"pid": 1, "hostname": "x@y"})
    backend.store_result("progress", {"done": 1}, "PROGRESS")

    assert buffered == []
    rows = backend.store.read(["by-hand", "marked", "from-client", "progress"])
    assert [r["state"] if r else None for r in rows] == ["STARTED", "STARTED", "STARTED", "PROGRESS"]
    assert app.AsyncResult("by-hand").info == {"hostname": "other@host"}


def test_a_run_still_going_shows_celerys_started_meta_once_written() -> None:
    """The tracer's STARTED is built lazily: written on its own (a long run), it carries the meta
    Celery's backends store (``info`` is ``{pid, hostname}``, with the extended request fields)."""
    from celery_tq.registry.writer import flush_pending

    app = _app()
    app.conf.result_extended = True
    seen: dict[str, Any] = {}

    @app.task(name="started.long", bind=True, shared=False)
    def long(self: Any, x: int) -> int:
        flush_pending(app.backend.store)  # the background writer's turn, while the run goes on
        result = app.AsyncResult(self.request.id)
        seen.update(state=result.state, info=result.info, name=result.name, args=result.args)
        return x

    tracer = build_tracer(long.name, long, hostname="w1@host", eager=False, app=app)
    tracer(
        "run-long",
        (5,),
        {},
        {"id": "run-long", "task": long.name, "hostname": "w1@host", "delivery_info": {}},
    )

    assert seen["state"] == "STARTED"
    assert seen["info"]["hostname"] == "w1@host" and isinstance(seen["info"]["pid"], int)
    assert (seen["name"], seen["args"]) == ("started.long", [5])
    assert app.AsyncResult("run-long").get(timeout=5) == 5
