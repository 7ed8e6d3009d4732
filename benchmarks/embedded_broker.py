"""Embedded broker benchmark: ``tq+sqlite://`` vs kombu ``filesystem://``.

For each broker and round: queue N no-op tasks, start ``celery worker -P prefork -c 2``
and time from the worker_ready signal to the last result file written (the
``file://`` result backend, same for every broker); then, with the worker still up,
time sequential ``apply_async().get(interval=0.001)`` round trips. Medians of the rounds.

Usage: python benchmarks/embedded_broker.py [--tasks 2000] [--round-trips 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

APP = """
import json, os, time
from celery import Celery, signals
from celery_tq.transport import register_transports

register_transports()
app = Celery("benchapp", broker=os.environ["BENCH_BROKER"],
             backend="file://" + os.environ["BENCH_RESULTS"])
app.conf.broker_transport_options = json.loads(os.environ["BENCH_TOPTS"])
app.conf.broker_connection_retry_on_startup = True

@app.task
def noop():
    return None

@signals.worker_ready.connect
def _ready(**kwargs):
    with open(os.environ["BENCH_RESULTS"] + "/../ready", "w") as f:
        f.write(repr(time.time()))
"""

CLIENT_QUEUE = """
import sys
from benchapp import noop
for _ in range(int(sys.argv[1])):
    noop.apply_async()
"""

CLIENT_RTT = """
import json, sys, time
from benchapp import noop
n = int(sys.argv[1])
for _ in range(5):
    noop.apply_async().get(timeout=30, interval=0.001)
out = []
for _ in range(n):
    t = time.perf_counter()
    noop.apply_async().get(timeout=30, interval=0.001)
    out.append((time.perf_counter() - t) * 1000)
print(json.dumps(out))
"""


def configs(poll: float) -> list[tuple[str, str, dict[str, object]]]:
    """(label, broker URL template, transport options); {d} is the round's directory."""
    fs = {"data_folder_in": "{d}/fs", "data_folder_out": "{d}/fs", "control_folder": "{d}/ctl"}
    return [
        (f"tq+sqlite:// (poll {poll}s)", "tq+sqlite:///{d}/broker.db", {"polling_interval": poll}),
        (f"filesystem:// (poll {poll}s)", "filesystem://", {**fs, "polling_interval": poll}),
        ("filesystem:// (default poll 1s)", "filesystem://", fs),
    ]


def one_round(url: str, topts: dict[str, object], tasks: int, trips: int) -> tuple[float, list[float]]:
    with tempfile.TemporaryDirectory(prefix="tqbench-") as tmp:
        d = Path(tmp)
        (d / "fs").mkdir()
        (d / "ctl").mkdir()
        (d / "results").mkdir()
        (d / "benchapp.py").write_text(APP)
        opts = {k: v.format(d=d) if isinstance(v, str) else v for k, v in topts.items()}
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(d), str(REPO)]),
            "PYTHONWARNINGS": "ignore",
            "BENCH_BROKER": url.format(d=d),
            "BENCH_RESULTS": str(d / "results"),
            "BENCH_TOPTS": json.dumps(opts),
        }

        def py(code: str, *args: str) -> str:
            done = subprocess.run(
                [sys.executable, "-c", code, *args],
                env=env,
                cwd=d,
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode:
                raise RuntimeError(done.stderr)
            return done.stdout

        py(CLIENT_QUEUE, str(tasks))
        log = d / "worker.log"
        with open(log, "wb") as out:
            worker = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "benchapp",
                    "worker",
                    "-P",
                    "prefork",
                    "-c",
                    "2",
                    "--loglevel=WARNING",
                    "--without-mingle",
                    "--without-gossip",
                ],
                env=env,
                cwd=d,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            results = d / "results"
            deadline = time.monotonic() + 600
            while len(os.listdir(results)) < tasks:
                if worker.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(log.read_text())
                time.sleep(0.05)
            ready = float((d / "ready").read_text())
            last = max(p.stat().st_mtime for p in results.iterdir())
            rate = tasks / (last - ready)
            rtts: list[float] = json.loads(py(CLIENT_RTT, str(trips)))
        finally:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        return rate, rtts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--round-trips", type=int, default=200)
    ap.add_argument(
        "--slow-round-trips", type=int, default=20, help="round trips for the 1 s default-poll config"
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--poll", type=float, default=0.01)
    args = ap.parse_args()
    print("$", shlex.join([sys.executable, *sys.argv]))
    print(
        f"# {os.cpu_count()} CPUs, python {sys.version.split()[0]}, worker -P prefork -c 2, "
        f"result backend file://, median of {args.rounds} rounds"
    )
    cfgs = configs(args.poll)
    rates: dict[str, list[float]] = {c[0]: [] for c in cfgs}
    rtts: dict[str, list[list[float]]] = {c[0]: [] for c in cfgs}
    failures: dict[str, int] = dict.fromkeys(rates, 0)
    for n in range(args.rounds):  # interleaved, so background load hits every broker alike
        for label, url, topts in cfgs:
            trips = args.round_trips if "polling_interval" in topts else args.slow_round_trips
            try:
                rate, times = one_round(url, topts, args.tasks, trips)
            except RuntimeError as exc:
                failures[label] += 1
                last = str(exc).strip().splitlines()[-1:] or ["?"]
                print(f"  round {n + 1} {label}: FAILED {last[0]}", file=sys.stderr, flush=True)
                continue
            rates[label].append(rate)
            rtts[label].append(times)
            print(
                f"  round {n + 1} {label}: {rate:.0f} tasks/s, {summary(times)}", file=sys.stderr, flush=True
            )
    print(f"\n| broker | drain {args.tasks} tasks (tasks/s) | RTT p50 (ms) | RTT p95 (ms) | RTT n | failed |")
    print("|---|---:|---:|---:|---:|---:|")
    for label in rates:
        if not rates[label]:
            print(f"| {label} | - | - | - | - | {failures[label]}/{args.rounds} |")
            continue
        p50 = statistics.median(statistics.median(t) for t in rtts[label])
        p95 = statistics.median(statistics.quantiles(t, n=20)[18] for t in rtts[label])
        print(
            f"| {label} | {statistics.median(rates[label]):.0f} | {p50:.1f} | {p95:.1f} | "
            f"{len(rtts[label][0])} | {failures[label]}/{args.rounds} |"
        )


def summary(times: list[float]) -> str:
    return f"p50 {statistics.median(times):.1f} ms, p95 {statistics.quantiles(times, n=20)[18]:.1f} ms"


if __name__ == "__main__":
    main()
