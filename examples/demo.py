"""The main job: a worker and Flower on the embedded default, a mixed workload, what happened.

Run with ``make demo`` (keeps running until Ctrl-C so you can look around in Flower) or
``python examples/demo.py --once`` (exits after the workload). No server is needed: the broker,
results and task records are SQLite files under ``$TQ_DATA_DIR`` (default ``./.celery_tq/demo``),
removed at the start of each run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# examples.shop keeps its files in .celery_tq/demo too, so `celery -A examples.shop tq ...` run
# from the checkout finds them; a TQ_DATA_DIR of the user's own is named in what the demo prints.
DATA = Path(os.environ.get("TQ_DATA_DIR") or ROOT / ".celery_tq" / "demo").resolve()
PREFIX = f"TQ_DATA_DIR={DATA} " if os.environ.get("TQ_DATA_DIR") else ""
shutil.rmtree(DATA, ignore_errors=True)
DATA.mkdir(parents=True)
os.environ["TQ_DATA_DIR"] = str(DATA)
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from celery_tq.testing import WorkerProcess  # noqa: E402
from examples import shop  # noqa: E402


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def listening_pids(port: int) -> set[int] | None:
    """The processes with a socket listening on ``port`` (Linux ``/proc``; None elsewhere)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            return None
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A = LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    pids = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) in inodes for fd in fd_dir.iterdir()):
                pids.add(int(fd_dir.parent.name))
        except OSError:
            continue
    return pids


class FlowerFailed(Exception):
    """Flower did not start, or another process answers on its port."""


def start_flower(port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "TQ_FLOWER_PORT": str(port),
        "FLOWER_UNAUTHENTICATED_API": "1",
    }
    log_path = DATA / "flower.log"
    log = open(log_path, "wb")  # noqa: SIM115 (kept open for the child)
    args = [sys.executable, "-m", "celery", "-A", "examples.shop", "flower", "--conf=config/flowerconfig.py"]
    flower = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if flower.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthcheck", timeout=2):
                pass
        except OSError:
            time.sleep(0.2)
            continue
        owners = listening_pids(port)
        if owners is None or flower.pid in owners:  # the answer came from our own Flower
            return flower
        stop(flower)
        pids = ", ".join(map(str, sorted(owners)))
        raise FlowerFailed(f"another process (pid {pids}) answers on port {port}, not the demo's Flower")
    stop(flower)
    lines = log_path.read_text(errors="replace").strip().splitlines()
    reason = next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "no output")
    raise FlowerFailed(f"Flower did not start on port {port}: {reason.strip()} (log: {log_path})")


def stop(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP (a closed terminal) clean up like Ctrl-C: worker and Flower stop too."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--once", action="store_true", help="exit after the workload")
    parser.add_argument(
        "--port", type=int, help="Flower's port (default TQ_FLOWER_PORT or 5555; a free one if that is taken)"
    )
    args = parser.parse_args()
    stop_on_signals()
    console = Console()
    port = args.port or int(os.environ.get("TQ_FLOWER_PORT", "5555"))
    if not port_is_free(port):
        taken, port = port, free_port()
        console.print(f"port {taken} is taken by another program: Flower runs on port {port} instead")
    console.print(f"[bold]celery-tq demo[/bold]: embedded broker, results and task records in {DATA}")
    for f in shop.tq.check():
        console.print(f"  check: [{f.level}] {f.message}")
    try:
        flower = start_flower(port)
    except FlowerFailed as exc:
        console.print(f"[red]celery-tq demo: {exc}[/red]")
        return 1
    try:
        return run(console, port, args.once, flower)
    except KeyboardInterrupt:
        console.print("stopping the worker and Flower")
        return 130
    finally:
        stop(flower)


def run(console: Console, port: int, once: bool, flower: subprocess.Popen[bytes]) -> int:
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
    with WorkerProcess("examples.shop", concurrency=1, cwd=ROOT, env={"PYTHONPATH": str(ROOT)}) as worker:
        _summary(console, workload)
        console.print(f"\nFlower: [bold]http://127.0.0.1:{port}/tasks[/bold] (search `vip` or `priority=9`)")
        console.print(f"Registry: `{PREFIX}celery -A examples.shop tq tasks` (or `tq status`, `tq show ID`)")
        if not once:
            console.print(
                f"Worker (pid {worker.pid}) and Flower (pid {flower.pid}) keep running; "
                "press Ctrl-C to stop them."
            )
            while True:
                time.sleep(3600)
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
