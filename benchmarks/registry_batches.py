"""What one outcome costs PostgreSQL, by the size of the batch it is written in.

Why the worker's main process writes its pool's outcomes in batches (README, "The write path"):
N tasks are recorded ``QUEUED``, then their outcomes (``SUCCESS`` with result and meta, as a
worker writes them) are written through the registry's store in batches of each size, a durable
commit each. Printed per outcome: wall time of the writing client and CPU time of every
PostgreSQL process (backend, WAL writer, ...), read from ``/proc``. Sizes alternate over the
rounds; medians. A store-level measurement: plain Celery has no counterpart.

Usage: python benchmarks/registry_batches.py [--tasks 2000] [--rounds 3] [--sizes 1,2,4,10,50]
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", default="1,2,4,10,50")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print("$ python " + " ".join(shlex.quote(a) for a in sys.argv), flush=True)
    import psycopg

    schema = f"bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    store = store_for_url(f"{PG}?options=-csearch_path%3D{schema}")
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
                    now = time.time()
                    store.write(
                        [
                            change(
                                i,
                                "SUCCESS",
                                0,
                                result="1",
                                meta=META,
                                worker="w@h",
                                started_at=now,
                                finished_at=now,
                                run_id=f"r{i}",
                                deliveries=1,
                            )
                            for i in ids[k : k + size]
                        ]
                    )
                wall[size].append((time.perf_counter() - t0) / len(ids) * 1000)
                cpu[size].append((postgres_cpu() - c0) / len(ids) * 1000)
    finally:
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
    print(f"\none outcome's durable write, {args.tasks} outcomes per size, median of {args.rounds} rounds")
    print(
        "| outcomes per transaction | client wall time per outcome (ms) | PostgreSQL CPU per outcome (ms) |"
    )
    print("|---:|---:|---:|")
    for size in sizes:
        print(f"| {size} | {statistics.median(wall[size]):.3f} | {statistics.median(cpu[size]):.3f} |")


if __name__ == "__main__":
    main()
