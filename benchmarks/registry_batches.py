"""What one outcome costs PostgreSQL, by the size of the batch it is written in.

Why the worker's main process writes its pool's outcomes in batches (README, "The write path"):
N tasks are recorded ``QUEUED``, then their outcomes (``SUCCESS`` with result and meta, as a
worker writes them) are written through the registry's store in batches of each size, a durable
commit each. Printed per outcome: wall time of the writing client and CPU time of every
PostgreSQL process (backend, WAL writer, ...), read from ``/proc``. Sizes alternate over the
rounds; medians. A store-level measurement: plain Celery has no counterpart.

Then concurrent writers (``--writers``): that many processes, each writing outcomes through its
own store for ``--seconds`` (one per write, as a pool process writes its own; or ten per write,
as the hand-over batches them), while one session listens on the registry's channel (a client
waiting in ``get()``). Printed: outcomes and commits per second in all, and the median time of
one write. Every outcome's commit notifies that channel, and PostgreSQL runs notifying commits
one at a time, server-wide: ``PreCommit_Notify`` (``src/backend/commands/async.c``) takes a lock
on "database 0" that is held until the transaction ends, its WAL flush included. So commits per
second stop growing with more writers; larger batches (the hand-over's) raise the outcomes.

Usage: python benchmarks/registry_batches.py [--tasks 2000] [--rounds 3] [--sizes 1,2,4,10,50]
       [--writers 1,4,8] [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from celery_tq.registry import store_for_url  # noqa: E402
from celery_tq.registry.record import change  # noqa: E402

PG = "postgresql://postgres@127.0.0.1:5432/test"
TICK = os.sysconf("SC_CLK_TCK")
META = json.dumps({"status": "SUCCESS", "traceback": None, "children": [], "date_done": None})


def postgres_cpu() -> float:
    """CPU seconds used so far by every process whose command line names postgres."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if b"postgres" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / TICK


def outcome(task_id: str) -> dict[str, object]:
    now = time.time()
    return change(
        task_id,
        "SUCCESS",
        0,
        result="1",
        meta=META,
        worker="w@h",
        started_at=now,
        finished_at=now,
        run_id=f"r{task_id}",
        deliveries=1,
    )


def writer(url: str, size: int, seconds: float, results: Any) -> None:
    """One writing process: outcomes of new tasks, ``size`` per write, for ``seconds``."""
    store = store_for_url(url)
    store.write([outcome(uuid.uuid4().hex)])  # connected, statement prepared
    times: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        rows = [outcome(uuid.uuid4().hex) for _ in range(size)]
        t0 = time.perf_counter()
        store.write(rows)
        times.append(time.perf_counter() - t0)
    results.put(times)


def concurrent(url: str, writers: list[int], sizes: list[int], seconds: float, rounds: int) -> None:
    import multiprocessing

    from celery_tq.registry.sql import SqlStore
    from celery_tq.registry.sql_merge import NOTIFY_CHANNEL_SQL

    store = store_for_url(url)
    assert isinstance(store, SqlStore)
    listener = store.direct.open_listener(NOTIFY_CHANNEL_SQL)  # as a client in get() listens
    rates: dict[tuple[int, int], list[tuple[float, float, float]]] = {}
    try:
        for _ in range(rounds):
            for count in writers:
                for size in sizes:
                    results: Any = multiprocessing.Queue()
                    procs = [
                        multiprocessing.Process(target=writer, args=(url, size, seconds, results))
                        for _ in range(count)
                    ]
                    for proc in procs:
                        proc.start()
                    times = [t for _ in procs for t in results.get(timeout=seconds + 60)]
                    for proc in procs:
                        proc.join()
                    for _ in listener.notifies(timeout=0.2):  # read what the listener received
                        pass
                    commits = len(times) / seconds
                    rates.setdefault((count, size), []).append(
                        (commits * size, commits, statistics.median(times) * 1000)
                    )
    finally:
        listener.close()
    print(f"\nconcurrent writers, {seconds:g} s each, one session listening, median of {rounds} rounds")
    print("| writing processes | outcomes per write | outcomes/s | commits/s | one write p50 (ms) |")
    print("|---:|---:|---:|---:|---:|")
    for (count, size), values in rates.items():
        print(
            f"| {count} | {size} | {statistics.median(v[0] for v in values):.0f} | "
            f"{statistics.median(v[1] for v in values):.0f} | {statistics.median(v[2] for v in values):.3f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", default="1,2,4,10,50")
    parser.add_argument("--writers", default="1,4,8", help="concurrent writing processes ('' skips)")
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print("$ python " + " ".join(shlex.quote(a) for a in sys.argv), flush=True)
    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    url = f"{PG}?options=-csearch_path%3D{schema}"
    store = store_for_url(url)
    wall: dict[int, list[float]] = {s: [] for s in sizes}
    cpu: dict[int, list[float]] = {s: [] for s in sizes}
    try:
        for _ in range(args.rounds):
            for size in sizes:
                prefix = uuid.uuid4().hex[:8]
                ids = [f"{prefix}-{i}" for i in range(args.tasks)]
                now = time.time()
                queued = [
                    change(i, "QUEUED", 0, submitted_at=now, name="bench.noop", priority=5, queue="celery")
                    for i in ids
                ]
                for k in range(0, len(queued), 500):
                    store.write(queued[k : k + 500])
                t0, c0 = time.perf_counter(), postgres_cpu()
                for k in range(0, len(ids), size):
                    store.write([outcome(i) for i in ids[k : k + size]])
                wall[size].append((time.perf_counter() - t0) / len(ids) * 1000)
                cpu[size].append((postgres_cpu() - c0) / len(ids) * 1000)
        print(
            f"\none outcome's durable write, {args.tasks} outcomes per size, median of {args.rounds} rounds"
        )
        print(
            "| outcomes per transaction | client wall time per outcome (ms) "
            "| PostgreSQL CPU per outcome (ms) |"
        )
        print("|---:|---:|---:|")
        for size in sizes:
            print(f"| {size} | {statistics.median(wall[size]):.3f} | {statistics.median(cpu[size]):.3f} |")
        if args.writers:
            store.close()  # the writers are forked: no connection of this process goes with them
            writers = [int(w) for w in args.writers.split(",")]
            concurrent(url, writers, [1, 10], args.seconds, args.rounds)
    finally:
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


if __name__ == "__main__":
    main()
