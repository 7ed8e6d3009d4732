"""The app the integration tests run in real ``celery worker`` processes.

Built by :func:`make_app` from environment variables, so the worker (``celery -A tqshop``) and
the test process share the same broker, backend and task names.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

from celery import Celery

import celery_tq
from celery_tq import Priority, errors


class CardExpired(Exception):
    """A user's error whose __init__ takes other arguments than its args: no caller can rebuild it."""

    def __init__(self, order_id: int, month: int) -> None:
        super().__init__(f"card for order {order_id} expired in month {month}")
        self.order_id, self.month = order_id, month


def _log_run(label: str, retries: int) -> None:
    """Append "<label> <pid> <retries> <time>" to $TQ_DATA_DIR/runs.log (a run, as tests count them)."""
    with open(os.path.join(os.environ["TQ_DATA_DIR"], "runs.log"), "a") as f:
        f.write(f"{label} {os.getpid()} {retries} {time.time()}\n")


def make_app(broker_url: str, result_backend: str, **conf: Any) -> Celery:
    app = Celery("tqshop", set_as_current=False)
    tq = celery_tq.install(app, preset="development")
    if os.environ.get("TQSHOP_CONF"):  # settings of one test, as JSON
        conf = {**json.loads(os.environ["TQSHOP_CONF"]), **conf}
    if os.environ.get("TQSHOP_STORE_RETRY"):
        conf.setdefault("tq_store_retry_timeout", float(os.environ["TQSHOP_STORE_RETRY"]))
    app.conf.update(broker_url=broker_url, result_backend=result_backend, **conf)

    @tq.task(
        name="tqshop.echo_meta", shared=False, bind=True, priority=Priority.HIGH, tags={"billing"}, timeout=30
    )
    def echo_meta(self: Any, value: Any = None) -> dict[str, Any]:
        meta = self.metadata
        return {
            "value": value,
            "priority": meta.priority,
            "tags": sorted(meta.tags),
            "timeout": meta.timeout,
            "broker_priority": (self.request.delivery_info or {}).get("priority"),
            "queue": (self.request.delivery_info or {}).get("routing_key"),
        }

    @tq.task(name="tqshop.add", shared=False)
    def add(x: int, y: int) -> int:
        return x + y

    @tq.task(name="tqshop.raise_error", shared=False, max_retries=0)
    def raise_error(cls_name: str, args: list[Any]) -> None:
        cls = getattr(errors, cls_name)
        with celery_tq.context("step %s", 1):
            try:
                raise ValueError("root cause")
            except ValueError as exc:
                raise cls(*args) from exc

    @tq.task(
        name="tqshop.flaky",
        shared=False,
        bind=True,
        max_retries=2,
        retry_backoff=1,
        retry_backoff_max=2,
        retry_jitter=False,  # backoff 1 s, then 2 s: the worker logs "Retry in 1s", "Retry in 2s"
    )
    def flaky(self: Any) -> int:
        """Fails twice with a retryable error; each attempt appends what its message carried to
        $TQ_DATA_DIR/attempts.jsonl."""
        attempt = {
            "id": self.request.id,
            "retries": self.request.retries,
            "priority": self.metadata.priority,
            "broker_priority": (self.request.delivery_info or {}).get("priority"),
            "eta": self.request.eta,
            "started": time.time(),
        }
        with open(os.path.join(os.environ["TQ_DATA_DIR"], "attempts.jsonl"), "a") as f:
            f.write(json.dumps(attempt) + "\n")
        if self.request.retries < 2:
            raise errors.ResourceUnavailable("payments-db")
        return self.request.retries

    @tq.task(
        name="tqshop.always_unavailable", shared=False, max_retries=1, retry_backoff=1, retry_backoff_max=1
    )
    def always_unavailable() -> None:
        raise ConnectionError("connection refused")

    @tq.task(name="tqshop.read_file", shared=False)
    def read_file(path: str) -> str:
        with celery_tq.context("loading invoice %s", 42), open(path) as f:
            return f.read()

    @tq.task(name="tqshop.sleep", shared=False)
    def sleep(seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    @tq.task(name="tqshop.stubborn", shared=False)
    def stubborn(seconds: float) -> str:
        """Swallows the soft time limit: only the hard limit stops it."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            with contextlib.suppress(Exception):
                time.sleep(0.1)
        return "finished"

    @tq.task(name="tqshop.crash", shared=False)
    def crash() -> None:
        os.kill(os.getpid(), 9)

    @tq.task(name="tqshop.busy", shared=False, bind=True)
    def busy(self: Any, label: str, seconds: float, die: bool = False) -> str:
        """Log "<label> <pid> <retries>" to $TQ_DATA_DIR/runs.log, then work (or kill its process)."""
        _log_run(label, self.request.retries)
        if die:
            os.kill(os.getpid(), 9)
        time.sleep(seconds)
        return label

    @tq.task(name="tqshop.ledger", shared=False)
    def ledger(label: str, seconds: float) -> str:
        """Append "start <label>" and, once it has worked, "done <label>" to $TQ_DATA_DIR/ledger.log."""
        path = os.path.join(os.environ["TQ_DATA_DIR"], "ledger.log")
        with open(path, "a") as f:
            f.write(f"start {label}\n")
        time.sleep(seconds)
        with open(path, "a") as f:
            f.write(f"done {label}\n")
        return label

    @tq.task(name="tqshop.celery_limited", shared=False, soft_time_limit=1, time_limit=3)
    def celery_limited(seconds: float) -> float:
        """Celery's own time limits, no tq timeout."""
        time.sleep(seconds)
        return seconds

    @tq.task(name="tqshop.private_error", shared=False)
    def private_error() -> None:
        from tqshop_private import PrivateError  # only the worker imports this module

        raise PrivateError("secret sauce", 7)

    @tq.task(name="tqshop.card_expired", shared=False)
    def card_expired(order_id: int) -> None:
        with celery_tq.context("charging order %s", order_id):
            raise CardExpired(order_id, 3)

    @app.task(name="tqshop.plain_card_expired", shared=False)
    def plain_card_expired(order_id: int) -> None:
        raise CardExpired(order_id, 3)

    @tq.task(name="tqshop.builtin_error", shared=False)
    def builtin_error() -> None:
        raise KeyError("missing-key")

    @tq.task(name="tqshop.record", shared=False, bind=True)
    def record(self: Any, label: str, seconds: float = 0.0) -> str:
        """Append ``label`` to $TQ_DATA_DIR/order.log when the task starts (order tests)."""
        with open(os.path.join(os.environ["TQ_DATA_DIR"], "order.log"), "a") as f:
            f.write(f"{label} {self.metadata.priority}\n")
        time.sleep(seconds)
        return label

    @app.task(name="tqshop.plain", shared=False)
    def plain(x: int) -> int:
        return x * 2

    @app.task(name="tqshop.plain_busy", shared=False, bind=True, acks_late=True)
    def plain_busy(self: Any, label: str, seconds: float) -> str:
        """``busy`` as a plain Celery task (Celery's own request class)."""
        _log_run(label, self.request.retries)
        time.sleep(seconds)
        return label

    # Registry tests.
    @tq.task(name="tqshop.slow_fail", shared=False, tags={"billing"})
    def slow_fail(seconds: float) -> None:
        time.sleep(seconds)
        raise errors.InvalidInput("card declined")

    @tq.task(name="tqshop.retry_once", shared=False, bind=True)
    def retry_once(self: Any) -> int:
        """Retries once, 1.5 s later, so the RETRY state stays visible that long."""
        if self.request.retries < 1:
            raise self.retry(countdown=1.5)
        return int(self.request.retries)

    @tq.task(name="tqshop.progress", shared=False, bind=True)
    def progress(self: Any, seconds: float) -> str:
        """Reports a custom PROGRESS state (Celery's documented way), then finishes."""
        self.update_state(state="PROGRESS", meta={"done": 1, "of": 2})
        time.sleep(seconds)
        return "finished"

    @tq.task(name="tqshop.unserializable", shared=False)
    def unserializable() -> object:
        return object()

    if os.environ.get("TQSHOP_PLAIN_LIMITED"):  # a worker on threads/solo refuses to start with it

        @app.task(name="tqshop.plain_limited", shared=False, soft_time_limit=1)
        def plain_limited() -> None: ...

    # Canvas tests.
    @tq.task(name="tqshop.collect", shared=False)
    def collect(results: list[Any]) -> list[Any]:
        return results

    @tq.task(name="tqshop.note", shared=False)
    def note(*args: Any, label: str = "") -> str:
        """An errback: appends ``label`` to $TQ_DATA_DIR/notes.log."""
        with open(os.path.join(os.environ["TQ_DATA_DIR"], "notes.log"), "a") as f:
            f.write(f"{label}\n")
        return label

    @tq.task(name="tqshop.grow_chord", shared=False, bind=True)
    def grow_chord(self: Any) -> int:
        """Adds ``add(10, 10)`` to the chord this task is a header task of."""
        self.add_to_chord(add.si(10, 10))
        return 1

    return app


if os.environ.get("TQSHOP_BROKER_URL"):
    app = make_app(
        os.environ["TQSHOP_BROKER_URL"],
        os.environ["TQSHOP_RESULT_BACKEND"],
        **json.loads(os.environ.get("TQSHOP_CONF") or "{}"),
    )
