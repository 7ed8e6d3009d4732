"""Registry query benchmark: tag + state + time queries over many records (SQLite, PostgreSQL).

R records are inserted straight into each store's tables, then 300 queries
``registry.query(state="FAILURE", tags={"billing"}, since=..., limit=50)`` are timed (p50, p99).

Usage: python benchmarks/registry_queries.py [--records 1000000]
"""

from __future__ import annotations

import argparse
import json
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
PG = "postgresql://postgres@127.0.0.1:5432/test"


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
    parser.add_argument("--records", type=int, default=1_000_000)
    args = parser.parse_args()
    print("$ python " + " ".join(shlex.quote(a) for a in sys.argv))
    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    pg = f"{PG}?options=-csearch_path%3D{schema}"
    workdir = Path(tempfile.mkdtemp())
    try:
        print(f"\nquery tag=billing + state=FAILURE + since, limit 50, over {args.records} records")
        print("| store | p50 ms | p99 ms |")
        print("|---|---|---|")
        for label, url in (("SQLite", f"sqlite:///{workdir / 'q.db'}"), ("PostgreSQL", pg)):
            r = query_bench(url, args.records)
            print(f"| {label} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |")
    finally:
        from celery_tq.registry import _stores

        for store in _stores.values():
            close = getattr(store, "close", None)
            if close is not None:
                close()
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


if __name__ == "__main__":
    main()
