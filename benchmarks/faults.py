"""Faults benchmark: what celery-tq does when something fails, measured on the current code.

The production preset on its two setups (tq+redis:// broker and store; RabbitMQ with a
tq+postgresql:// store), ``celery worker -P prefork -c 2``, a batch of ``--tasks`` x 1 s tasks:

  kill -9 busy child   ``--kills`` pool processes killed mid-task (an OOM kill), a few s apart
  poison task          a task that kills its own process every time
  malformed message    a body that is not JSON, with a task id header
  150 MB argument      refused at publish
  redelivered, ended   (RabbitMQ) a finished task's message comes back unacked

Columns: redelivery = seconds from the kill to the re-run's start (max over kills); runs = runs
of the hurt task(s); lost = tasks not finished within the window; duplicates = tasks that
finished more than once; terminal = the caller's outcome, and when it was known.

Usage: python benchmarks/faults.py [--tasks 50] [--kills 3] [--redis-db 10] [--only tq+redis]
Needs Redis 127.0.0.1:6379 (dbs N, N+1), RabbitMQ 127.0.0.1:5672 (rabbitmqctl, a vhost of its
own) and PostgreSQL 127.0.0.1:5432 database ``test`` (a schema of its own).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PG = "postgresql://postgres@127.0.0.1:5432/test"

APP = """
import os, time
from celery import Celery
import celery_tq

app = Celery("faultbench", set_as_current=False)
tq = celery_tq.install(app, preset="production")
LOG = os.path.join(os.environ["TQ_DATA_DIR"], "runs.log")

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
"""

Row = dict[str, Any]


def log_lines(data: Path) -> list[list[str]]:
    path = data / "runs.log"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def wait_until(condition: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return False


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
        yield f"redis://127.0.0.1:6379/{db}", f"tq+redis://127.0.0.1:6379/{db + 1}"
    finally:
        for n in (db, db + 1):
            redis.Redis(db=n).flushdb()


class Setup:
    """One broker + store, a fresh data dir and app module per scenario."""

    def __init__(self, label: str, broker: str, backend: str, root: Path) -> None:
        self.label, self.broker, self.backend, self.root = label, broker, backend, root

    @contextmanager
    def run(self, name: str, start: bool = True) -> Iterator[tuple[Any, Path, Callable[[], Any]]]:
        """(app, data dir, start a worker); workers started here are stopped at the end."""
        import importlib

        from celery_tq.testing import WorkerProcess

        data = self.root / f"{self.label}-{name}".replace("+", "_")
        data.mkdir(parents=True)
        os.environ.update(TQ_BROKER_URL=self.broker, TQ_RESULT_BACKEND=self.backend, TQ_DATA_DIR=str(data))
        sys.modules.pop("faultbench_app", None)
        app = importlib.import_module("faultbench_app").app
        app.control.purge()
        env = {"PYTHONPATH": f"{self.root}:{REPO}", "TQ_DATA_DIR": str(data)}
        workers: list[Any] = []

        def start_worker() -> Any:
            workers.append(WorkerProcess("faultbench_app", concurrency=2, env=env, cwd=self.root))
            return workers[-1].start()

        if start:
            start_worker()
        try:
            yield app, data, start_worker
        finally:
            for worker in workers:
                worker.stop()
            app.close()


def kill_busy_children(setup: Setup, tasks: int, kills: int) -> Row:
    with setup.run("kill") as (app, data, _start):
        work = app.tasks["fault.work"]
        results = [work.delay(f"t{i}", 1.0) for i in range(tasks)]
        killed: list[tuple[str, float]] = []
        while len(killed) < kills:
            wait_until(lambda: len(_running(data)) >= 2, 20)
            running = _running(data)
            label = max(running, key=lambda lab: running[lab][1])  # the latest to start
            try:
                os.kill(running[label][0], signal.SIGKILL)
            except ProcessLookupError:  # it finished (or died) in between: pick again
                continue
            killed.append((label, time.time()))
            time.sleep(3)
        started = time.monotonic()
        window = tasks / 2 + 35
        wait_until(lambda: all(r.ready() for r in results), window, 0.2)
        elapsed = time.monotonic() - started
        lines = log_lines(data)
        done: dict[str, int] = {}
        for kind, label, *_ in lines:
            if kind == "done":
                done[label] = done.get(label, 0) + 1
        starts = {
            label: [float(t) for k, lab, _p, _r, t in lines if k == "start" and lab == label]
            for label, _ in killed
        }
        redelivery = max(
            (max((t for t in starts[lab] if t > at), default=float("inf")) - at for lab, at in killed),
            default=0,
        )
        states = {r.state for r in results}
        return {
            "fault": f"kill -9 busy child x{kills}",
            "redelivery": redelivery,
            "runs": sum(len(starts[lab]) for lab, _ in killed),
            "lost": sum(1 for i in range(tasks) if done.get(f"t{i}", 0) == 0),
            "duplicates": sum(1 for n in done.values() if n > 1),
            "terminal": "/".join(sorted(states)),
            "time": elapsed,
        }


def _running(data: Path) -> dict[str, tuple[int, float]]:
    running: dict[str, tuple[int, float]] = {}
    for kind, label, pid, _retries, t in log_lines(data):
        if kind == "start":
            running[label] = (int(pid), float(t))
        else:
            running.pop(label, None)
    now = time.time()
    return {k: v for k, v in running.items() if now - v[1] > 0.2}


def poison(setup: Setup) -> Row:
    with setup.run("poison") as (app, data, _start):
        started = time.monotonic()
        result = app.tasks["fault.work"].delay("poison", 0, die=True)
        try:
            result.get(timeout=120)
            terminal = "SUCCESS?"
        except Exception as exc:
            terminal = f"{result.state} {type(exc).__name__}"
        return {
            "fault": "poison task (kills its process)",
            "redelivery": None,
            "runs": sum(1 for line in log_lines(data) if line[0] == "start"),
            "lost": 0,
            "duplicates": 0,
            "terminal": terminal,
            "time": time.monotonic() - started,
        }


def malformed(setup: Setup) -> Row:
    from celery.result import AsyncResult
    from kombu import Connection

    with setup.run("malformed") as (app, _data, _start):
        task_id = str(uuid.uuid4())
        started = time.monotonic()
        with Connection(app.conf.broker_url) as conn:
            conn.Producer().publish(
                b'{"not": json',
                routing_key="tq.default",
                content_type="application/json",
                content_encoding="utf-8",
                headers={"task": "fault.work", "id": task_id},
            )
        ok = wait_until(lambda: AsyncResult(task_id, app=app).state == "REJECTED", 60)
        return {
            "fault": "malformed JSON body, id header",
            "redelivery": None,
            "runs": 0,
            "lost": 0 if ok else 1,
            "duplicates": 0,
            "terminal": AsyncResult(task_id, app=app).state,
            "time": time.monotonic() - started,
        }


def oversized(setup: Setup) -> Row:
    from celery_tq.errors import InvalidInput

    with setup.run("oversized") as (app, data, _start):
        big = "x" * (150 * 1024 * 1024)
        started = time.monotonic()
        try:
            app.tasks["fault.work"].delay(big, 0)
            terminal = "sent"
        except InvalidInput:
            terminal = "InvalidInput at publish"
        elapsed = time.monotonic() - started
        del big
        return {
            "fault": "150 MB argument",
            "redelivery": None,
            "runs": sum(1 for line in log_lines(data) if line[0] == "start"),
            "lost": 0,
            "duplicates": 0,
            "terminal": terminal,
            "time": elapsed,
        }


def redelivered_ended(setup: Setup) -> Row:
    from celery.app.task import Context
    from kombu import Connection

    with setup.run("redelivered", start=False) as (app, data, start_worker):
        work = app.tasks["fault.work"]
        work.apply_async(("ended", 0), task_id="ended-1")
        got: list[Any] = []
        with Connection(app.conf.broker_url) as conn:  # a worker that dies before its ack
            with conn.Consumer(app.amqp.queues["tq.default"], callbacks=[lambda body, m: got.append(m)]):
                while not got:
                    conn.drain_events(timeout=10)
            app.backend.mark_as_done("ended-1", "ended", request=Context(id="ended-1", task=work.name))
        started = time.monotonic()
        worker = start_worker()
        wait_until(lambda: "acked without running" in worker.log, 30)
        elapsed = time.monotonic() - started
        runs = sum(1 for line in log_lines(data) if line[0] == "start")
        return {
            "fault": "redelivered after it ended",
            "redelivery": None,
            "runs": runs,
            "lost": 0,
            "duplicates": runs,
            "terminal": f"{work.AsyncResult('ended-1').state}, acked unrun",
            "time": elapsed,
        }


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "never" if value == float("inf") else f"{value:.1f}"
    return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--redis-db", type=int, default=10)
    parser.add_argument("--only", choices=["tq+redis", "rabbitmq"], default=None)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="tq-faults-"))
    (root / "faultbench_app.py").write_text(APP)
    sys.path.insert(0, str(root))
    rows: list[tuple[str, Row]] = []
    setups = [("tq+redis", lambda: tq_redis(args.redis_db)), ("rabbitmq", rabbitmq_postgres)]
    for label, make in setups:
        if args.only and label != args.only:
            continue
        with make() as (broker, backend):
            setup = Setup(label, broker, backend, root)
            scenarios = [
                lambda s=setup: kill_busy_children(s, args.tasks, args.kills),
                poison,
                malformed,
                oversized,
            ]
            if label == "rabbitmq":
                scenarios.append(redelivered_ended)
            for scenario in scenarios:
                row = scenario(setup)
                rows.append((label if label == "tq+redis" else "RabbitMQ+PG", row))
                print(f"  {label}: {row['fault']} done", file=sys.stderr)
    header = "| fault | broker | redelivery s | runs | lost | duplicates | terminal state | time s |"
    print(header)
    print("|---|---|---|---|---|---|---|---|")
    for broker, r in rows:
        print(
            f"| {r['fault']} | {broker} | {fmt(r['redelivery'])} | {r['runs']} | {r['lost']} | "
            f"{r['duplicates']} | {r['terminal']} | {fmt(r['time'])} |"
        )


if __name__ == "__main__":
    main()
