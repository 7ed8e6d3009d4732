"""Registry benchmark: celery-tq with its registry as the result backend vs plain Celery.

Throughput: N no-op tasks are queued, then drained by one ``celery worker -P prefork -c 2``; the
time runs from the worker's start until every task's result is stored. Plain Celery runs with
prefetch 1 and late ack (what priorities need) and Celery's own redis result backend; celery-tq
runs its production preset (events, priority, metadata, STARTED records), with the broker and
store named in the row; a row ending in ``<setting> off`` turns that setting off (README, "The
write path": ``tq_hand_over_outcomes``, the hand-over of outcomes; ``tq_pipeline_redis_acks``,
acks on the stock Redis transport that do not wait for Redis). Configurations alternate within each round;
each ratio is the median over the rounds of (celery-tq / its plain baseline in the same round).
How far plain Celery's rounds lie apart is printed too: a busy machine slows plain Celery more
than celery-tq, so the ratios of a noisy run flatter celery-tq (docs/benchmarks.md, Registry).

Latency: ``apply_async`` p50/p99 with no worker running (the client's cost of a call: QUEUED
record included; no monitor listens, so celery-tq sends no task-sent event: README, "How task
events reach Flower") and the ``apply_async(...).get()`` round trip p50/p99 of one
task at a time with an idle worker; celery-tq on the stock ``redis://`` broker (only the registry
and the publish hook differ from plain Celery) and on ``tq+redis://``, which the production preset
uses on Redis.

Usage: python benchmarks/registry.py [--tasks 3000] [--rounds 3] [--calls 500] [--trips 200]
       [--latency-only] [--redis-db 14] [--only WORD ...]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from celery_tq.testing import WorkerProcess  # noqa: E402

REDIS = "redis://127.0.0.1:6379"
BROKER_DB, RESULT_DB = 14, 15  # --redis-db moves them (the test suite uses 12..15 by default)
PG = "postgresql://postgres@127.0.0.1:5432/test"
AMQP = "amqp://guest:guest@127.0.0.1:5672/"

APP = textwrap.dedent(
    """
    import os
    from celery import Celery

    app = Celery("benchreg")
    if os.environ["BENCH_TQ"] == "1":
        import celery_tq
        celery_tq.install(app, preset="production")
        # the rows ending in "<setting> off" turn that setting of the preset off
        if os.environ.get("BENCH_OFF"):
            app.conf[os.environ["BENCH_OFF"]] = False
    else:
        app.conf.update(worker_prefetch_multiplier=1, task_acks_late=True)
    app.conf.update(
        broker_url=os.environ["BENCH_BROKER"],
        result_backend=os.environ["BENCH_BACKEND"],
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    if os.environ.get("BENCH_QUEUE"):  # the latency rows run every configuration at once
        queue = os.environ["BENCH_QUEUE"]
        app.conf.update(task_default_queue=queue, tq_default_queue=queue)

    @app.task(name="bench.noop", shared=False)
    def noop(i):
        return i
    """
)


class Config:
    def __init__(
        self,
        label: str,
        broker: str,
        backend: str,
        tq: bool,
        baseline: str,
        queue: str = "",
        off: str = "",
    ) -> None:
        self.label, self.broker, self.backend, self.tq, self.baseline = label, broker, backend, tq, baseline
        self.queue, self.off = queue, off

    def env(self) -> dict[str, str]:
        return {
            "BENCH_BROKER": self.broker,
            "BENCH_BACKEND": self.backend,
            "BENCH_TQ": "1" if self.tq else "0",
            "BENCH_QUEUE": self.queue,
            "BENCH_OFF": self.off,
        }


def configs(pg: str, vhost: str) -> list[Config]:
    broker, results = f"{REDIS}/{BROKER_DB}", f"{REDIS}/{RESULT_DB}"
    amqp = AMQP + vhost
    plain_redis = "plain Celery: redis:// broker, redis backend"
    plain_amqp = "plain Celery: RabbitMQ broker, redis backend"
    return [
        Config(plain_redis, broker, results, False, plain_redis),
        Config(
            "celery-tq: redis:// broker, tq+redis:// registry", broker, f"tq+{results}", True, plain_redis
        ),
        Config(
            "celery-tq: redis:// broker, tq+redis:// registry, tq_hand_over_outcomes off",
            broker,
            f"tq+{results}",
            True,
            plain_redis,
            off="tq_hand_over_outcomes",
        ),
        Config(
            "celery-tq: redis:// broker, tq+redis:// registry, tq_pipeline_redis_acks off",
            broker,
            f"tq+{results}",
            True,
            plain_redis,
            off="tq_pipeline_redis_acks",
        ),
        Config(
            "celery-tq: tq+redis:// broker, tq+redis:// registry",
            f"tq+{broker}",
            f"tq+{results}",
            True,
            plain_redis,
        ),
        Config(
            "celery-tq: tq+redis:// broker, tq+redis:// registry, tq_hand_over_outcomes off",
            f"tq+{broker}",
            f"tq+{results}",
            True,
            plain_redis,
            off="tq_hand_over_outcomes",
        ),
        Config(
            "celery-tq: tq+redis:// broker, tq+postgresql:// registry",
            f"tq+{broker}",
            f"tq+{pg}",
            True,
            plain_redis,
        ),
        Config(
            "celery-tq: tq+redis:// broker, tq+postgresql:// registry, tq_hand_over_outcomes off",
            f"tq+{broker}",
            f"tq+{pg}",
            True,
            plain_redis,
            off="tq_hand_over_outcomes",
        ),
        Config(plain_amqp, amqp, results, False, plain_amqp),
        Config("celery-tq: RabbitMQ broker, tq+postgresql:// registry", amqp, f"tq+{pg}", True, plain_amqp),
        Config(
            "celery-tq: RabbitMQ broker, tq+postgresql:// registry, tq_hand_over_outcomes off",
            amqp,
            f"tq+{pg}",
            True,
            plain_amqp,
            off="tq_hand_over_outcomes",
        ),
    ]


def load_app(config: Config, workdir: Path) -> object:
    import importlib

    os.environ.update(config.env())
    sys.modules.pop("benchreg_app", None)
    return importlib.import_module("benchreg_app").app


def reset(pg: str) -> None:
    for db in (BROKER_DB, RESULT_DB):
        redis.Redis.from_url(f"{REDIS}/{db}").flushdb()
    import psycopg

    schema = pg.rsplit("%3D", 1)[1]
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        if conn.execute(f"SELECT to_regclass('{schema}.tq_tasks')").fetchone() != (None,):
            conn.execute(f"TRUNCATE {schema}.tq_tasks, {schema}.tq_task_tags, {schema}.tq_kv")


def done_counter(config: Config, pg: str, last_id: str) -> Callable[[], int]:
    """How many results are stored, at a cost that does not slow the drain it measures: EXISTS of
    every id every 20 ms took about 15% of the machine's CPU from plain Celery, and a count over
    the PostgreSQL table as much from PostgreSQL. Tasks run about in order, so the PostgreSQL
    count waits until the last task queued is done (a primary-key read)."""
    if config.backend.startswith("tq+redis"):
        client = redis.Redis.from_url(config.backend.removeprefix("tq+"))
        return lambda: sum(int(client.zcard(f"tq:i:state:{s}")) for s in ("SUCCESS", "FAILURE"))
    if config.backend.startswith("tq+postgresql"):
        import psycopg

        conn = psycopg.connect(PG, autocommit=True, options=f"-csearch_path={pg.rsplit('%3D', 1)[1]}")
        ended = "state IN ('SUCCESS', 'FAILURE')"

        def count() -> int:
            try:
                if conn.execute(f"SELECT 1 FROM tq_tasks WHERE id = %s AND {ended}", (last_id,)).fetchone():
                    row = conn.execute(f"SELECT count(*) FROM tq_tasks WHERE {ended}").fetchone()
                    return int(row[0]) if row else 0
            except psycopg.errors.UndefinedTable:
                pass
            return 0

        return count
    # Celery's redis backend: the result db holds one key per stored result and nothing else
    # (reset() empties it), so DBSIZE counts them.
    client = redis.Redis.from_url(config.backend)
    return lambda: int(client.dbsize())


def drain(config: Config, tasks: int, workdir: Path, pg: str) -> float:
    reset(pg)
    app = load_app(config, workdir)
    noop = app.tasks["bench.noop"]  # type: ignore[attr-defined]
    if "amqp" in config.broker:
        app.control.purge()  # type: ignore[attr-defined]
    last_id = ""
    for i in range(tasks):
        last_id = noop.apply_async((i,)).id
    count = done_counter(config, pg, last_id)
    env = {**config.env(), "PYTHONPATH": f"{workdir}:{ROOT}"}
    with WorkerProcess("benchreg_app", pool="prefork", concurrency=2, cwd=workdir, env=env):
        t0 = time.perf_counter()
        deadline = t0 + 600
        while count() < tasks:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{config.label}: only {count()} of {tasks} done in 600 s")
            time.sleep(0.02)
        elapsed = time.perf_counter() - t0
    app.close()  # type: ignore[attr-defined]
    return tasks / elapsed


def latency(
    configs: list[Config], calls: int, trips: int, workdir: Path, pg: str
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """``apply_async``: every configuration's app in this process, call by call in a shuffled
    order, so load hits them alike. Round trips: in blocks per configuration, alternating. In ms.
    """
    import random

    reset(pg)
    noops = {}
    for config in configs:
        app = load_app(config, workdir)
        noops[config.label] = app.tasks["bench.noop"]  # type: ignore[attr-defined]
        noops[config.label].apply_async((0,))  # connections up
    order = list(noops.items())
    publish: dict[str, list[float]] = {label: [] for label in noops}
    for i in range(calls):
        random.shuffle(order)
        for label, noop in order:
            t0 = time.perf_counter()
            noop.apply_async((i,))
            publish[label].append((time.perf_counter() - t0) * 1000)
    # Round trips: one worker at a time (idle workers of the other configurations would take CPU
    # from this one: their gossip reads every event), configurations alternating in short blocks.
    trip: dict[str, list[float]] = {label: [] for label in noops}
    rounds = 5
    for _ in range(rounds):
        random.shuffle(order)
        for label, noop in order:
            config = next(c for c in configs if c.label == label)
            env = {**config.env(), "PYTHONPATH": f"{workdir}:{ROOT}"}
            with WorkerProcess("benchreg_app", pool="prefork", concurrency=2, cwd=workdir, env=env):
                for i in range(10):  # pool processes connect
                    noop.apply_async((i,)).get(timeout=60)
                for i in range(max(1, trips // rounds)):
                    t0 = time.perf_counter()
                    noop.apply_async((i,)).get(timeout=60)
                    trip[label].append((time.perf_counter() - t0) * 1000)
    for noop in noops.values():
        noop.app.close()
    return publish, trip


def paired_overhead(values: list[float], baseline: list[float]) -> float:
    """Median of the differences between calls made side by side (same index: same round/block)."""
    return statistics.median(v - b for v, b in zip(values, baseline, strict=True))


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def rabbitmq_vhost() -> str:
    import subprocess

    vhost = f"bench-{uuid.uuid4().hex[:8]}"
    subprocess.run(["rabbitmqctl", "-q", "add_vhost", vhost], check=True, capture_output=True)
    subprocess.run(
        ["rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"], check=True
    )
    return vhost


def main() -> None:
    global BROKER_DB, RESULT_DB
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--trips", type=int, default=200)
    parser.add_argument("--latency-only", action="store_true", help="skip the throughput rounds")
    parser.add_argument("--redis-db", type=int, default=14, help="Redis dbs N (broker) and N+1")
    parser.add_argument(
        "--only",
        nargs="+",
        default=[],
        help="throughput rows whose label has one of these (and their baselines)",
    )
    args = parser.parse_args()
    BROKER_DB, RESULT_DB = args.redis_db, args.redis_db + 1
    print("$ python " + " ".join(shlex.quote(a) for a in sys.argv), flush=True)
    import subprocess

    schema = f"bench_{uuid.uuid4().hex[:8]}"
    pg = f"{PG}?options=-csearch_path%3D{schema}"
    vhost = rabbitmq_vhost()
    workdir = Path(tempfile.mkdtemp())
    (workdir / "benchreg_app.py").write_text(APP)
    sys.path.insert(0, str(workdir))
    try:
        rows = configs(pg, vhost)
        if args.only:
            chosen = [c for c in rows if any(word in c.label for word in args.only)]
            rows = [c for c in rows if c in chosen or any(c.label == d.baseline for d in chosen)]
        rates: dict[str, list[float]] = {c.label: [] for c in rows}
        ratios: dict[str, list[float]] = {c.label: [] for c in rows}
        for round_no in range(0 if args.latency_only else args.rounds):
            for config in rows:
                rates[config.label].append(drain(config, args.tasks, workdir, pg))
                print(
                    f"round {round_no + 1}: {config.label}: {rates[config.label][-1]:.0f} tasks/s", flush=True
                )
            for config in rows:
                ratios[config.label].append(rates[config.label][-1] / rates[config.baseline][-1])
        print(
            f"\nthroughput: {args.tasks} no-op tasks drained by prefork -c 2, median of {args.rounds} rounds"
        )
        print("| configuration | tasks/s | vs plain Celery |")
        print("|---|---:|---:|")
        for config in [] if args.latency_only else rows:
            print(
                f"| {config.label} | {statistics.median(rates[config.label]):.0f} | "
                f"{statistics.median(ratios[config.label]):.2f}x |"
            )
        for config in [] if args.latency_only else rows:
            if config.label == config.baseline:  # how noisy the run was: ratios of a noisy run flatter
                low, high = min(rates[config.label]), max(rates[config.label])
                print(
                    f"{config.label}: {low:.0f} to {high:.0f} tasks/s from round to round "
                    f"({100 * (high - low) / high:.0f}% apart; below about 10% is a quiet run)"
                )
        broker, results = f"{REDIS}/{BROKER_DB}", f"{REDIS}/{RESULT_DB}"
        plain = "plain Celery: redis:// broker, redis backend"
        lat = [
            Config(plain, broker, results, False, "", "lat.plain"),
            Config(
                "celery-tq: redis:// broker, tq+redis:// registry", broker, f"tq+{results}", True, "", "lat.r"
            ),
            Config(
                "celery-tq: redis:// broker, tq+postgresql:// registry", broker, f"tq+{pg}", True, "", "lat.p"
            ),
            Config(
                "celery-tq: tq+redis:// broker, tq+redis:// registry",
                f"tq+{broker}",
                f"tq+{results}",
                True,
                "",
                "lat.tr",
            ),
            Config(
                "celery-tq: tq+redis:// broker, tq+postgresql:// registry",
                f"tq+{broker}",
                f"tq+{pg}",
                True,
                "",
                "lat.tp",
            ),
        ]
        print(
            f"\nlatency: {args.calls} apply_async calls and {args.trips} apply_async().get() round trips"
            " per configuration, the calls interleaved call by call, the round trips in alternating blocks"
            " (ms; overhead: median of the paired differences with plain Celery)"
        )
        publish, trip = latency(lat, args.calls, args.trips, workdir, pg)
        print("| configuration | apply_async p50 | p99 | overhead | .get() round trip p50 | p99 | overhead |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for config in lat:
            pub, tr = publish[config.label], trip[config.label]
            print(
                f"| {config.label} | {statistics.median(pub):.3f} | {p(pub, 0.99):.3f} | "
                f"{paired_overhead(pub, publish[plain]):+.3f} | {statistics.median(tr):.2f} | "
                f"{p(tr, 0.99):.2f} | {paired_overhead(tr, trip[plain]):+.2f} |",
                flush=True,
            )
    finally:
        import psycopg

        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], capture_output=True)
        for db in (BROKER_DB, RESULT_DB):
            redis.Redis.from_url(f"{REDIS}/{db}").flushdb()


if __name__ == "__main__":
    main()
