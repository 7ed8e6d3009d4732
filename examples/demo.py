"""The main job: a worker and Flower on the embedded default, a mixed workload, what happened.

Run with ``make demo`` (keeps running until Ctrl-C so you can look around in Flower) or
``python examples/demo.py --once`` (exits after the workload). No server is needed: the broker,
results and task records are SQLite files under ``$TQ_DATA_DIR`` (default ``./.celery_tq/demo``),
removed at the start of each run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("TQ_DATA_DIR") or ROOT / ".celery_tq" / "demo").resolve()
shutil.rmtree(DATA, ignore_errors=True)
DATA.mkdir(parents=True)
os.environ["TQ_DATA_DIR"] = str(DATA)
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from celery_tq.testing import WorkerProcess  # noqa: E402
from examples import shop  # noqa: E402


def start_flower(port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "TQ_FLOWER_PORT": str(port),
        "FLOWER_UNAUTHENTICATED_API": "1",
    }
    log = open(DATA / "flower.log", "wb")  # noqa: SIM115 (kept open for the child)
    args = [sys.executable, "-m", "celery", "-A", "examples.shop", "flower", "--conf=config/flowerconfig.py"]
    flower = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthcheck", timeout=2):
                return flower
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"Flower did not start; see {DATA / 'flower.log'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--once", action="store_true", help="exit after the workload")
    parser.add_argument("--port", type=int, default=int(os.environ.get("TQ_FLOWER_PORT", "5555")))
    args = parser.parse_args()
    console = Console()
    console.print(f"[bold]celery-tq demo[/bold]: embedded broker, results and task records in {DATA}")
    for f in shop.tq.check():
        console.print(f"  check: [{f.level}] {f.message}")
    flower = start_flower(args.port)
    try:
        # Queue the work before the worker starts, so priority decides the order.
        calls: list[tuple[str, Any, tuple[Any, ...], dict[str, Any]]] = [
            *[(f"send_receipt({i})", shop.send_receipt, (i,), {}) for i in range(3)],
            ("rebuild_report()", shop.rebuild_report, (), {}),
            *[
                (f"charge({100 + i})", shop.charge, (100 + i, 9.5), {"priority": 9, "tags": {"vip"}})
                for i in range(3)
            ],
            ("load_invoice(7)", shop.load_invoice, (7,), {}),
            ("sync_stock()", shop.sync_stock, (), {}),
        ]
        workload = [
            (label, task.tq_metadata.merged(**options), task.apply_async(args_, **options))
            for label, task, args_, options in calls
        ]
        console.print(f"queued {len(workload)} tasks; starting `celery -A examples.shop worker -c 1`")
        with WorkerProcess("examples.shop", concurrency=1, cwd=ROOT, env={"PYTHONPATH": str(ROOT)}):
            _summary(console, workload)
            console.print(
                f"\nFlower: [bold]http://127.0.0.1:{args.port}/tasks[/bold] (search `vip` or `priority=9`)"
            )
            console.print(f"Registry: `TQ_DATA_DIR={DATA} celery -A examples.shop tq tasks` (or `tq status`)")
            if not args.once:
                console.print("Worker and Flower keep running; press Ctrl-C to stop.")
                try:
                    while True:
                        time.sleep(3600)
                except KeyboardInterrupt:
                    console.print("stopping")
    finally:
        os.killpg(flower.pid, signal.SIGTERM)
        flower.wait(15)
    return 0


def _summary(console: Console, workload: list[tuple[str, Any, Any]]) -> None:
    table = Table("task", "priority", "tags", "outcome", "started")
    records = shop.tq.registry
    for label, metadata, result in workload:
        try:
            outcome = f"[green]{result.get(timeout=60, interval=0.05)}[/green]"
        except Exception as exc:  # the demo shows every structured error as the caller sees it
            context = " / ".join(getattr(exc, "context", []) or [])
            outcome = f"[red]{type(exc).__name__}[/red]: {exc}" + (
                f" [dim](context: {context})[/dim]" if context else ""
            )
        record = records.get(result.id)
        started = record.started_at.strftime("%H:%M:%S.%f")[:-3] if record and record.started_at else ""
        table.add_row(label, str(metadata.priority), ",".join(sorted(metadata.tags)), outcome, started)
    console.print(table)


if __name__ == "__main__":
    sys.exit(main())
