"""Priority benchmark: celery-tq against plain Celery (default settings) on Redis and RabbitMQ.

For each broker and system, in the same run:
- order: N mixed-priority tasks queued, then drained by one worker (-c 2); "out of order" counts
  the tasks that started although a more urgent one (higher priority, or the same priority sent
  earlier) started more than `concurrency` places later;
- overtaking: one CRITICAL task sent behind a LOW backlog of B tasks while the worker drains it:
  LOW tasks started between the moment the broker has it (the publish returned) and its start,
  and the delay in ms from before the send;
- throughput: T no-op tasks drained (tasks/s), celery-tq with random priorities vs plain Celery
  without priorities (defaults), and vs plain Celery with only the settings priorities need
  (prefetch 1, late ack, a priority queue, random priorities); celery-tq also with a monitor
  listening to task events (an EventReceiver in this process, as Flower would be; without one,
  the worker pauses its task events) and with task events off in its configuration; a ratio is
  the median over the rounds.

celery-tq runs the production preset (on Redis with its tq+redis:// transport); no result
backend, so the registry's cost is not in these figures (see benchmarks/registry.py).

Usage: python benchmarks/priority.py [--order 1000] [--backlog 10000] [--throughput 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis
from celery import Celery

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from celery_tq.testing import WorkerProcess  # noqa: E402

REDIS = "redis://127.0.0.1:6379"
BROKER_DB, LOG_DB = 10, 11
CONCURRENCY = 2

APP_MODULE = textwrap.dedent(
    """
    import os
    import redis
    from celery import Celery

    app = Celery("prio")
    app.conf.update(broker_url=os.environ["BENCH_BROKER"], task_ignore_result=True, result_backend=None)
    task = app.task
    if os.environ["BENCH_MODE"] == "tq":
        import celery_tq
        task = celery_tq.install(app, preset="production").task
        if os.environ.get("BENCH_NOEVENTS"):  # to see what task events cost
            app.conf.update(
                worker_send_task_events=False, task_send_sent_event=False, task_track_started=False
            )
    elif os.environ["BENCH_MODE"] == "plain-prio":
        app.conf.update(PRIORITY_SETTINGS)
    log = redis.Redis.from_url(os.environ["BENCH_LOG"])

    from celery.signals import worker_process_init

    @worker_process_init.connect
    def connect_log(**kw):
        log.ping()  # each pool process connects before its first task, whose start it records

    @task(name="prio.mark")
    def mark(label):
        log.rpush("started", label)
    """
)


# Plain Celery with what priorities need and nothing else: prefetch 1 and late ack, a priority
# queue (x-max-priority on RabbitMQ, 10 priority steps on Redis), priorities sent. Its own queue:
# RabbitMQ refuses to redeclare the default one with another x-max-priority.
PRIORITY_SETTINGS = {
    "worker_prefetch_multiplier": 1,
    "task_acks_late": True,
    "task_queue_max_priority": 10,
    "broker_transport_options": {"priority_steps": list(range(10))},
    "task_default_queue": "celery.prio",
}
QUEUES = ("celery", "celery.prio", "tq.default")
THROUGHPUT_ROWS = {
    "plain": "plain Celery, defaults",
    "plain-prio": "plain Celery, priority settings",
    "tq": "celery-tq (production preset), no monitor connected",
    "tq-watched": "celery-tq, a monitor listening to task events (as with Flower open)",
    "tq-noevents": "celery-tq, task events off",
}


def make_client(mode: str, broker: str) -> Celery:
    app = Celery("prio", set_as_current=False)
    app.conf.update(broker_url=broker, task_ignore_result=True, result_backend=None)
    if mode.startswith("tq"):
        import celery_tq

        celery_tq.install(app, preset="production")
    elif mode == "plain-prio":
        app.conf.update(PRIORITY_SETTINGS)
    return app


def out_of_order(started: list[str], rank: dict[str, tuple[int, int]], window: int) -> int:
    count, best_after = 0, (99, sys.maxsize)
    suffix: list[tuple[int, int]] = [best_after] * (len(started) + 1)
    for k in range(len(started) - 1, -1, -1):
        suffix[k] = min(suffix[k + 1], rank[started[k]])
    for k, label in enumerate(started):
        if k + window + 1 < len(started) and suffix[k + window + 1] < rank[label]:
            count += 1
    return count


class Bench:
    def __init__(self, broker_kind: str, broker: str, workdir: Path) -> None:
        self.kind, self.broker, self.workdir = broker_kind, broker, workdir
        self.log = redis.Redis.from_url(f"{REDIS}/{LOG_DB}")

    def reset(self, app: Celery) -> None:
        self.log.delete("started")
        if self.kind == "redis":
            redis.Redis.from_url(self.broker).flushdb()
        else:
            for queue in QUEUES:
                with app.connection_for_write() as conn, contextlib.suppress(Exception):
                    conn.default_channel.queue_purge(queue)

    def url(self, mode: str) -> str:
        """celery-tq on Redis runs the production preset's transport, tq+redis://."""
        return f"tq+{self.broker}" if mode.startswith("tq") and self.kind == "redis" else self.broker

    def worker(self, mode: str) -> WorkerProcess:
        env = {
            "BENCH_MODE": "tq" if mode.startswith("tq") else mode,
            "BENCH_NOEVENTS": "1" if mode == "tq-noevents" else "",
            "BENCH_BROKER": self.url(mode),
            "BENCH_LOG": f"{REDIS}/{LOG_DB}",
            "PYTHONPATH": f"{self.workdir}:{ROOT}",
            "TQ_DATA_DIR": str(self.workdir),
        }
        return WorkerProcess("prioapp", concurrency=CONCURRENCY, env=env, cwd=self.workdir)

    def wait(self, count: int, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while int(self.log.llen("started")) < count:  # type: ignore[arg-type]
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.log.llen('started')} of {count} started")
            time.sleep(0.02)

    def order(self, mode: str, n: int) -> int:
        app = make_client(mode, self.url(mode))
        self.reset(app)
        rng = random.Random(7)
        sent = [(f"o{i}", rng.randint(0, 9)) for i in range(n)]
        for label, p in sent:
            app.send_task("prio.mark", (label,), priority=p)
        with self.worker(mode):
            self.wait(n)
        started = [x.decode() for x in self.log.lrange("started", 0, -1)]  # type: ignore[union-attr]
        rank = {label: (-p, i) for i, (label, p) in enumerate(sent)}
        app.close()
        return out_of_order(started, rank, CONCURRENCY)

    def overtake(self, mode: str, backlog: int) -> tuple[int, float]:
        app = make_client(mode, self.url(mode))
        self.reset(app)
        with app.producer_or_acquire() as producer:
            for i in range(backlog):
                app.send_task("prio.mark", (f"low{i}",), priority=2, producer=producer)
        with self.worker(mode):
            self.wait(100)
            sent_at = time.monotonic()
            before_send = int(self.log.llen("started"))  # type: ignore[arg-type]
            app.send_task("prio.mark", ("critical",), priority=9)
            # LOW tasks are counted from when the broker has it (the publish returned; with
            # confirms on RabbitMQ that is a round trip): those started while it was on its way
            # were not behind it yet. The delay in ms is counted from before the send.
            arrived = int(self.log.llen("started"))  # type: ignore[arg-type]
            while True:
                started = [x.decode() for x in self.log.lrange("started", before_send, -1)]  # type: ignore[union-attr]
                if "critical" in started:
                    elapsed = (time.monotonic() - sent_at) * 1000
                    break
                if time.monotonic() - sent_at > 600:
                    raise TimeoutError("critical task never started")
                time.sleep(0.001)
        app.close()
        return max(0, before_send + started.index("critical") - arrived), elapsed

    def throughput(self, mode: str, n: int) -> float:
        app = make_client(mode, self.url(mode))
        self.reset(app)
        rng = random.Random(3)
        with app.producer_or_acquire() as producer:
            for i in range(n):
                options: dict[str, Any] = {"priority": rng.randint(0, 9)} if mode != "plain" else {}
                app.send_task("prio.mark", (f"t{i}",), producer=producer, **options)
        with self.monitor(app) if mode == "tq-watched" else contextlib.nullcontext(), self.worker(mode):
            ready = time.monotonic()
            self.wait(n)
            rate = n / (time.monotonic() - ready)
        app.close()
        return rate

    @contextlib.contextmanager
    def monitor(self, app: Celery) -> Iterator[None]:
        """A task-event monitor in a thread, as Flower has: it asks workers for a heartbeat."""
        listening, stop = threading.Event(), threading.Event()

        def capture() -> None:
            with app.connection_for_read() as conn:
                receiver = app.events.Receiver(conn, handlers={"*": lambda event: None})
                receiver.on_iteration = lambda: (
                    listening.set(),
                    setattr(receiver, "should_stop", stop.is_set()),
                )
                receiver.capture(limit=None, timeout=None, wakeup=True)

        thread = threading.Thread(target=capture, daemon=True)
        thread.start()
        if not listening.wait(10):
            raise TimeoutError("the event monitor did not start")
        try:
            yield
        finally:
            stop.set()
            thread.join(10)


def ratio(rates: list[float], base: list[float]) -> float:
    """The median of the per-round ratios (rounds alternate, so each pair shares the machine)."""
    return statistics.median(t / p for t, p in zip(rates, base, strict=True))


def rabbit_vhost() -> tuple[str, str]:
    vhost = f"tq-bench-{uuid.uuid4().hex[:6]}"
    subprocess.run(["rabbitmqctl", "-q", "add_vhost", vhost], check=True, capture_output=True)
    subprocess.run(
        ["rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
        check=True,
        capture_output=True,
    )
    return vhost, f"amqp://guest:guest@127.0.0.1:5672/{vhost}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--order", type=int, default=1000)
    parser.add_argument("--backlog", type=int, default=10000)
    parser.add_argument("--throughput", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--brokers", default="redis,rabbitmq")
    args = parser.parse_args()
    print("$ python benchmarks/priority.py " + " ".join(sys.argv[1:]))
    print(f"# {os.cpu_count()} CPUs, worker -P prefork -c {CONCURRENCY}, plain Celery = default settings")
    workdir = Path(tempfile.mkdtemp(prefix="tq-prio-"))
    (workdir / "prioapp.py").write_text(f"PRIORITY_SETTINGS = {PRIORITY_SETTINGS!r}\n{APP_MODULE}")
    vhost = None
    rows: list[tuple[str, str, int, int, float]] = []
    throughput: list[tuple[str, dict[str, list[float]]]] = []
    try:
        for kind in args.brokers.split(","):
            if kind == "redis":
                broker = f"{REDIS}/{BROKER_DB}"
            else:
                vhost, broker = rabbit_vhost()
            bench = Bench(kind, broker, workdir)
            for mode in ("plain", "tq"):
                violations = bench.order(mode, args.order)
                overtaken, delay = bench.overtake(mode, args.backlog)
                rows.append((kind, mode, violations, overtaken, delay))
            rates: dict[str, list[float]] = {m: [] for m in THROUGHPUT_ROWS}
            for _ in range(args.rounds):
                for mode in THROUGHPUT_ROWS:  # alternating rounds
                    rates[mode].append(bench.throughput(mode, args.throughput))
            throughput.append((kind, rates))
    finally:
        if vhost:
            subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], capture_output=True)
    print(
        f"\n| broker | system | out of order among {args.order} "
        f"| LOW started before CRITICAL (backlog {args.backlog}) | CRITICAL start delay (ms) |"
    )
    print("|---|---|---:|---:|---:|")
    for kind, mode, a, b, c in rows:
        print(f"| {kind} | {'celery-tq' if mode == 'tq' else 'plain Celery'} | {a} | {b} | {c:.0f} |")
    print("\n| broker | system | tasks/s | vs plain defaults | vs plain priority settings |")
    print("|---|---|---:|---:|---:|")
    for kind, rates in throughput:
        for mode, label in THROUGHPUT_ROWS.items():
            vs_plain, vs_prio = (ratio(rates[mode], rates[base]) for base in ("plain", "plain-prio"))
            rate = statistics.median(rates[mode])
            print(f"| {kind} | {label} | {rate:.0f} | {vs_plain:.2f}x | {vs_prio:.2f}x |")
    print(f"(throughput: {args.throughput} no-op tasks, median of {args.rounds} alternating rounds)")


if __name__ == "__main__":
    main()
