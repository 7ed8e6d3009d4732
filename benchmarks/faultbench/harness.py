"""The setups (broker + store), a fresh app module and workers per scenario, and small helpers."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PG = "postgresql://postgres@127.0.0.1:5432/test"

APP = """
import os, time
from celery import Celery
import celery_tq

app = Celery("faultbench", set_as_current=False)
tq = celery_tq.install(app, preset="production")
LOG = os.path.join(os.environ["TQ_DATA_DIR"], "runs.log")


class Declined(Exception):
    pass


def _log(line):
    with open(LOG, "a") as f:
        f.write(line + "\\n")

@tq.task(name="fault.work", bind=True, shared=False)
def work(self, label, seconds, die=False):
    _log(f"start {label} {os.getpid()} {self.request.retries} {time.time()}")
    if die:
        os.kill(os.getpid(), 9)
    time.sleep(seconds)
    _log(f"done {label} {os.getpid()} {self.request.retries} {time.time()}")
    return label

@tq.task(name="fault.celery_limited", shared=False, soft_time_limit=1, time_limit=3)
def celery_limited(seconds):
    time.sleep(seconds)
    return seconds

@tq.task(name="fault.declined", shared=False)
def declined(code):
    exc = Declined("card declined")
    exc.code = code
    raise exc

if os.environ.get("FAULTBENCH_PLAIN_LIMITED"):  # a plain Celery task with Celery's time limit

    @app.task(name="fault.plain_limited", shared=False, soft_time_limit=1)
    def plain_limited():
        pass
"""


@dataclass(frozen=True)
class Outcome:
    """One row: what was measured, how it ended, whether the issue's requirement holds."""

    fault: str
    measured: str
    outcome: str
    holds: bool


def log_lines(data: Path) -> list[list[str]]:
    path = data / "runs.log"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def counts(data: Path, kind: str) -> dict[str, int]:
    """How often each label logged ``kind`` (start or done)."""
    seen: dict[str, int] = {}
    for line in log_lines(data):
        if line[0] == kind:
            seen[line[1]] = seen.get(line[1], 0) + 1
    return seen


def starts(data: Path, label: str) -> list[float]:
    return [float(line[4]) for line in log_lines(data) if line[0] == "start" and line[1] == label]


def running(data: Path) -> dict[str, tuple[int, float]]:
    """Labels started more than 0.2 s ago and not done: label -> (pid, start time)."""
    now_running: dict[str, tuple[int, float]] = {}
    for kind, label, pid, _retries, t in log_lines(data):
        if kind == "start":
            now_running[label] = (int(pid), float(t))
        else:
            now_running.pop(label, None)
    now = time.time()
    return {k: v for k, v in now_running.items() if now - v[1] > 0.2}


def wait_until(condition: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


def tally(data: Path, labels: list[str]) -> tuple[int, int]:
    """(lost, completed twice) among ``labels``: never done, done more than once."""
    done = counts(data, "done")
    return sum(1 for lab in labels if done.get(lab, 0) == 0), sum(1 for lab in labels if done.get(lab, 0) > 1)


@contextmanager
def rabbitmq_postgres() -> Iterator[tuple[str, str]]:
    import psycopg

    vhost, schema = f"tq-faults-{uuid.uuid4().hex[:6]}", f"tq_faults_{uuid.uuid4().hex[:8]}"
    subprocess.run(["rabbitmqctl", "-q", "add_vhost", vhost], check=True, capture_output=True)
    subprocess.run(
        ["rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"], check=True
    )
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield (
            f"amqp://guest:guest@127.0.0.1:5672/{vhost}",
            f"tq+postgresql+psycopg://postgres@127.0.0.1:5432/test?options=-csearch_path%3D{schema}",
        )
    finally:
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], capture_output=True)
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@contextmanager
def tq_redis(db: int) -> Iterator[tuple[str, str]]:
    import redis

    for n in (db, db + 1):
        redis.Redis(db=n).flushdb()
    try:
        yield f"tq+redis://127.0.0.1:6379/{db}", f"tq+redis://127.0.0.1:6379/{db + 1}"
    finally:
        for n in (db, db + 1):
            redis.Redis(db=n).flushdb()


def with_port(url: str, old: int, new: int) -> str:
    """``url`` pointing at port ``new`` instead of ``old`` (e.g. through a proxy)."""
    assert f":{old}/" in url, url
    return url.replace(f":{old}/", f":{new}/", 1)


class Setup:
    """One broker + store; a fresh data dir and app module per scenario."""

    def __init__(self, label: str, broker: str, backend: str, root: Path) -> None:
        self.label, self.broker, self.backend, self.root = label, broker, backend, root
        self.broker_port = 5672 if broker.startswith("amqp") else 6379
        self.store_port = 5432 if "postgresql" in backend else 6379
        self.rabbitmq = broker.startswith("amqp")

    def env(self, data: Path, broker: str | None = None, backend: str | None = None) -> dict[str, str]:
        return {
            "PYTHONPATH": f"{self.root}:{REPO}",
            "TQ_DATA_DIR": str(data),
            "TQ_BROKER_URL": broker or self.broker,
            "TQ_RESULT_BACKEND": backend or self.backend,
        }

    @contextmanager
    def run(
        self, name: str, start: bool = True, broker: str | None = None, backend: str | None = None
    ) -> Iterator[tuple[Any, Path, Callable[..., Any]]]:
        """(app, data dir, start a worker); workers started here are stopped at the end.

        ``start_worker(broker=..., pool=..., hostname=..., env=...)``: a worker that reaches the
        broker another way (a proxy) or runs another pool."""
        from celery_tq.testing import WorkerProcess

        data = self.root / f"{self.label}-{name}".replace("+", "_")
        data.mkdir(parents=True)
        os.environ.update(self.env(data, broker, backend))
        sys.modules.pop("faultbench_app", None)
        app = importlib.import_module("faultbench_app").app
        app.control.purge()
        workers: list[Any] = []

        def start_worker(
            broker_url: str | None = None,
            pool: str = "prefork",
            hostname: str | None = None,
            env: dict[str, str] | None = None,
        ) -> Any:
            worker_env = {**self.env(data, broker_url or broker, backend), **(env or {})}
            worker = WorkerProcess(
                "faultbench_app", pool=pool, concurrency=2, env=worker_env, cwd=self.root, hostname=hostname
            )
            workers.append(worker)
            return worker.start()

        if start:
            start_worker()
        try:
            yield app, data, start_worker
        finally:
            for worker in workers:
                worker.stop()
            app.close()


def fmt(value: float) -> str:
    return "never" if value == float("inf") else f"{value:.1f}"
