"""What one no-op task costs inside a worker's pool process: celery-tq against plain Celery.

Runs Celery's own tracer (what a prefork pool process runs for each message) on N requests, in
this process, with no broker traffic: plain Celery, celery-tq (production preset, no result
backend, no registry store) as a prefork pool process sees it, and the same without the
pool-process signal (an in-process worker, which keeps records in memory). Each round runs one
process per system, alternating; a process keeps its fastest of 3 passes (the machine is shared);
the table gives the medians over the rounds, and of the per-round ratios.

Usage: python benchmarks/task_overhead.py [--tasks 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(mode: str, tasks: int, rounds: int) -> list[float]:
    """Per-task microseconds of each round, measured in this process."""
    sys.path.insert(0, str(ROOT))
    from celery import Celery, signals
    from celery.app.trace import build_tracer, setup_worker_optimizations

    app = Celery("overhead", set_as_current=True)
    app.conf.update(broker_url="memory://", task_ignore_result=True, result_backend=None)
    task = app.task
    if mode != "plain":
        import celery_tq
        import celery_tq.signals

        task = celery_tq.install(app, preset="production").task
        app.conf.update(broker_url="memory://", result_backend=None)

    @task(name="overhead.noop")
    def noop(label: str) -> None:
        return None

    setup_worker_optimizations(app)  # as a worker does (finalizes the app, guards Task.__call__)
    if mode == "tq-pool":
        signals.worker_process_init.send(sender=None)  # what a prefork pool process gets first
    tracer = build_tracer("overhead.noop", app.tasks["overhead.noop"], app=app, eager=False, propagate=False)
    headers = {"tq_priority": 5, "tq_tags": [], "tq_timeout": None} if mode != "plain" else {}
    requests = [
        {"id": str(uuid.uuid4()), "task": "overhead.noop", "delivery_info": {"routing_key": "tq.default"}}
        | headers
        for _ in range(tasks)
    ]
    logging.disable(logging.CRITICAL)
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        for request in requests:
            tracer(request["id"], ("x",), {}, request)
        rates.append((time.perf_counter() - start) / tasks * 1e6)
    return rates


MODES = {
    "plain": "plain Celery",
    "tq-pool": "celery-tq, prefork pool process",
    "tq-inprocess": "celery-tq, in-process worker (records in memory)",
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:  # a child: one system per process, so no app or signal leaks into another
        print(" ".join(f"{r:.2f}" for r in run(args.mode, args.tasks, 3)))
        return
    print("$ python benchmarks/task_overhead.py " + " ".join(sys.argv[1:]))
    env = {**os.environ, "TQ_DATA_DIR": "/tmp"}
    timings: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(args.rounds):  # alternating: each round's processes share the machine's state
        for mode in MODES:
            cmd = [sys.executable, __file__, "--mode", mode, "--tasks", str(args.tasks)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.split()
            timings[mode].append(min(float(x) for x in out))  # the least disturbed of 3 passes
    print("\n| system | µs per no-op task in the pool process | vs plain Celery |")
    print("|---|---:|---:|")
    for mode, label in MODES.items():
        ratio = statistics.median(t / p for t, p in zip(timings[mode], timings["plain"], strict=True))
        print(f"| {label} | {statistics.median(timings[mode]):.1f} | {ratio:.2f}x |")
    print(f"({args.tasks} tasks; each process keeps its fastest of 3 passes; median of {args.rounds} rounds)")


if __name__ == "__main__":
    main()
