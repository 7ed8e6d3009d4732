"""Registry benchmark: celery-tq with its registry vs plain Celery, same broker, pool and run.

For each pair (Redis store vs Celery's redis backend; PostgreSQL store vs Celery's db backend),
broker Redis db 12, ``celery worker -P prefork -c 2``:
  1. ``apply_async`` latency (p50, p99) of M calls with no worker running (QUEUED cost);
  2. end-to-end throughput: N tasks published, then all results waited for.
Then queries by tag + state over R records in the SQLite and PostgreSQL stores (p50, p99).

Usage: python benchmarks/registry.py [--tasks 2000] [--calls 500] [--records 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BROKER = "redis://127.0.0.1:6379/12"
PG = "postgresql://postgres@127.0.0.1:5432/test"

APP = """
import os
from celery import Celery
import celery_tq

app = Celery("benchreg", broker=os.environ["BENCH_BROKER"], backend=os.environ["BENCH_BACKEND"])
if os.environ["BENCH_TQ"] == "1":
    celery_tq.install(app, preset=None)
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                broker_connection_retry_on_startup=True, worker_prefetch_multiplier=4,
                task_default_queue="bench", task_track_started=True)

@app.task(name="bench.add", shared=False)
def add(x, y):
    return x + y
"""


def run_pair(label: str, backend: str, tq: bool, tasks: int, calls: int, workdir: Path) -> dict[str, float]:
    import importlib

    import redis

    from celery_tq.testing import WorkerProcess

    redis.Redis.from_url(BROKER).flushdb()
    os.environ.update(BENCH_BROKER=BROKER, BENCH_BACKEND=backend, BENCH_TQ="1" if tq else "0")
    sys.modules.pop("benchreg_app", None)
    app = importlib.import_module("benchreg_app").app
    add = app.tasks["bench.add"]
    add.delay(0, 0)  # connect first
    latencies = []
    pending = []
    for i in range(calls):
        t0 = time.perf_counter()
        pending.append(add.apply_async((i, i)))
        latencies.append((time.perf_counter() - t0) * 1000)
    with WorkerProcess("benchreg_app", pool="prefork", concurrency=2, cwd=workdir):
        for r in pending:
            r.get(timeout=120, interval=0.005)
        t0 = time.perf_counter()
        results = [add.apply_async((i, 1)) for i in range(tasks)]
        for r in results:
            r.get(timeout=300, interval=0.005)
        elapsed = time.perf_counter() - t0
    app.close()
    latencies.sort()
    return {
        "p50_ms": statistics.median(latencies),
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1],
        "tasks_per_s": tasks / elapsed,
    }


def query_bench(url: str, records: int) -> dict[str, float]:
    from sqlalchemy import insert

    from celery_tq.registry import Registry, store_for_url
    from celery_tq.registry.sql import task_tags, tasks

    store = store_for_url(url)
    store.read(["warm-up"])  # creates the schema
    rng = random.Random(1)
    now = time.time()
    states = ["SUCCESS"] * 90 + ["FAILURE"] * 5 + ["QUEUED"] * 5
    tag_names = ["billing", "shipping", "email", "reports", "vip"]
    engine = store.engine  # type: ignore[attr-defined]
    for start in range(0, records, 20_000):
        rows, tags = [], []
        for i in range(start, min(records, start + 20_000)):
            tid = f"{i:08d}-{uuid.uuid4().hex[:8]}"
            state, tag, submitted = rng.choice(states), rng.choice(tag_names), now - rng.random() * 7 * 86400
            rows.append(
                {
                    "id": tid,
                    "name": f"shop.{tag}",
                    "state": state,
                    "progress": 3,
                    "tags": json.dumps([tag]),
                    "submitted_at": submitted,
                    "retries": 0,
                }
            )
            tags.append({"task_id": tid, "tag": tag, "state": state, "submitted_at": submitted})
        with engine.begin() as conn:
            conn.execute(insert(tasks), rows)
            conn.execute(insert(task_tags), tags)
    registry = Registry(store)
    timings = []
    for i in range(300):
        t0 = time.perf_counter()
        registry.query(state="FAILURE", tags={"billing"}, since=now - 3600 * (1 + i % 48), limit=50)
        timings.append((time.perf_counter() - t0) * 1000)
    timings.sort()
    return {"p50_ms": statistics.median(timings), "p99_ms": timings[int(len(timings) * 0.99) - 1]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--records", type=int, default=1_000_000)
    args = parser.parse_args()
    print("$ python " + " ".join(shlex.quote(a) for a in sys.argv))
    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    pg = f"{PG}?options=-csearch_path%3D{schema}"
    workdir = Path(tempfile.mkdtemp())
    (workdir / "benchreg_app.py").write_text(APP)
    sys.path.insert(0, str(workdir))
    os.environ["PYTHONPATH"] = f"{workdir}:{REPO}"
    try:
        runs = [
            ("plain Celery, redis backend", "redis://127.0.0.1:6379/13", False),
            ("celery-tq, tq+redis store", "tq+redis://127.0.0.1:6379/13", True),
            (
                "plain Celery, db backend (PostgreSQL)",
                f"db+{pg.replace('postgresql', 'postgresql+psycopg')}",
                False,
            ),
            ("celery-tq, tq+postgresql store", f"tq+{pg}", True),
        ]
        rows = []
        for label, backend, tq in runs:
            import redis

            redis.Redis.from_url("redis://127.0.0.1:6379/13").flushdb()
            rows.append((label, run_pair(label, backend, tq, args.tasks, args.calls, workdir)))
        print(f"\nbroker Redis, prefork -c 2, {args.tasks} tasks, {args.calls} apply_async calls")
        print("| run | apply_async p50 ms | p99 ms | tasks/s | vs plain |")
        print("|---|---|---|---|---|")
        for i, (label, r) in enumerate(rows):
            base = rows[i - i % 2][1]["tasks_per_s"]
            print(
                f"| {label} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['tasks_per_s']:.0f} | "
                f"{r['tasks_per_s'] / base:.2f}x |"
            )
        print(f"\nquery tag=billing + state=FAILURE + since, limit 50, over {args.records} records")
        print("| store | p50 ms | p99 ms |")
        print("|---|---|---|")
        for label, url in (("SQLite", f"sqlite:///{workdir / 'q.db'}"), ("PostgreSQL", pg)):
            r = query_bench(url, args.records)
            print(f"| {label} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |")
    finally:
        from celery_tq.registry import _stores

        for store in _stores.values():
            engine = getattr(store, "engine", None)
            if engine is not None:
                engine.dispose()
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


if __name__ == "__main__":
    main()
