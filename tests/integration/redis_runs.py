"""Real ``celery worker`` processes on a tq+ Redis broker, recording each task they run.

The app module (``APP``: task ``rt.rec`` appends "<i> <redelivered>" to the ``RT_OUT`` file),
:class:`Run` to start workers on it and read the records, :func:`send` to publish, and
:func:`check_complete` for the at-least-once verdict. ``RT_TRANSPORT_OPTIONS`` (JSON) adds
broker transport options in the workers.
"""

from __future__ import annotations

import collections
import time
from pathlib import Path
from typing import Any

from celery import Celery

from celery_tq.testing import WorkerProcess
from celery_tq.transport import register_transports

__all__ = ["APP", "Run", "check_complete", "send"]

ROOT = Path(__file__).parents[2]

APP = """
import json, os, time
from celery import Celery
from celery_tq.transport import register_transports

register_transports()
app = Celery("rtapp", set_as_current=False)
app.conf.update(
    broker_url=os.environ["RT_BROKER"],
    task_ignore_result=True,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=4,
    broker_connection_retry_on_startup=True,
    broker_transport_options={
        "priority_steps": list(range(10)),
        "heartbeat_ttl": 3, "heartbeat_interval": 0.5, "recover_interval": 1,
        "health_check_interval": 2, "socket_timeout": 5, "socket_connect_timeout": 5,
        **json.loads(os.environ.get("RT_TRANSPORT_OPTIONS") or "{}"),
    },
)
OUT = os.environ["RT_OUT"]

@app.task(name="rt.rec", bind=True)
def rec(self, i, sleep=0.0):
    if sleep:
        time.sleep(sleep)
    redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
    if i == int(os.environ.get("RT_VICTIM", "-1")) and not redelivered:
        with open(OUT + ".victim", "w") as f:
            f.write(str(os.getpid()))
        time.sleep(60)  # killed here by the test
    with open(OUT, "a") as f:
        f.write(f"{i} {int(redelivered)}\\n")
"""


class Run:
    """The app module in tmp_path, the record file, and workers on one broker URL."""

    def __init__(self, tmp: Path, broker: str, source: str = APP, env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.broker = broker
        self.out = tmp / "out.txt"
        self.out.touch()
        name = "rtapp" if source is APP else "rtprod"
        (tmp / f"{name}.py").write_text(source)
        self.module = name
        self.env = {
            "RT_BROKER": broker,
            "RT_OUT": str(self.out),
            "PYTHONPATH": f"{tmp}:{ROOT}",
            **(env or {}),
        }
        self.workers: list[WorkerProcess] = []

    def worker(self, **options: Any) -> WorkerProcess:
        options.setdefault("concurrency", 2)
        worker = WorkerProcess(self.module, cwd=self.tmp, env=self.env, **options)
        self.workers.append(worker)
        return worker.start()

    def records(self) -> list[tuple[int, bool]]:
        lines = self.out.read_text().split("\n")
        return [(int(a), b == "1") for a, b in (line.split() for line in lines if line.strip())]

    def wait_done(self, n: int, timeout: float) -> list[tuple[int, bool]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            records = self.records()
            if len({i for i, _ in records}) >= n:
                return records
            time.sleep(0.1)
        return self.records()

    def wait_count(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.records()) < n and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()


def send(
    broker: str,
    n: int,
    sleep: float = 0.0,
    first: int = 0,
    transport_options: dict[str, Any] | None = None,
    **options: Any,
) -> None:
    """Publish rt.rec tasks ``first`` .. ``first + n - 1`` through the tq transport."""
    register_transports()
    app = Celery("sender", set_as_current=False, broker=broker)
    app.conf.broker_transport_options = {"priority_steps": list(range(10)), **(transport_options or {})}
    with app.producer_or_acquire() as producer:
        for i in range(first, first + n):
            app.send_task("rt.rec", args=(i, sleep), producer=producer, **options)
    app.close()


def check_complete(records: list[tuple[int, bool]], n: int, window: int) -> collections.Counter[int]:
    counts = collections.Counter(i for i, _ in records)
    missing = set(range(n)) - set(counts)
    assert not missing, f"{len(missing)} task(s) never ran, e.g. {sorted(missing)[:10]}"
    duplicates = sum(c - 1 for c in counts.values())
    assert duplicates <= window, f"{duplicates} duplicate executions > prefetch window {window}"
    return counts
