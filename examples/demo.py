"""The main job: a worker on the embedded default, a mixed workload, what happened to each task.

Run with ``make demo``. No server is needed: the broker and results are SQLite files under
``$TQ_DATA_DIR`` (default ``./.celery_tq/demo``), removed at the start of each run.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
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


def main() -> int:
    console = Console()
    console.print(f"[bold]celery-tq demo[/bold]: embedded broker and results in {DATA}")
    findings = shop.tq.check()
    for f in findings:
        console.print(f"  check: [{f.level}] {f.message}")
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
        (label, task.tq_metadata.merged(**options), task.apply_async(args, **options))
        for label, task, args, options in calls
    ]
    console.print(f"queued {len(workload)} tasks; starting `celery -A examples.shop worker -c 1`")

    started = time.monotonic()
    with WorkerProcess("examples.shop", concurrency=1, cwd=ROOT, env={"PYTHONPATH": str(ROOT)}) as worker:
        table = Table("task", "priority", "tags", "outcome")
        for label, metadata, result in workload:
            try:
                value = result.get(timeout=60)
                outcome = f"[green]{value}[/green]"
            except Exception as exc:  # the demo shows every structured error as the caller sees it
                context = " / ".join(getattr(exc, "context", []) or [])
                outcome = f"[red]{type(exc).__name__}[/red]: {exc}" + (
                    f" [dim](context: {context})[/dim]" if context else ""
                )
            table.add_row(label, str(metadata.priority), ",".join(sorted(metadata.tags)), outcome)
        console.print(table)
        order = [
            line.split("Task ")[1].split("[")[0] for line in worker.log.splitlines() if " received" in line
        ]
        console.print("start order:", " → ".join(name.removeprefix("shop.") for name in order))
    console.print(f"done in {time.monotonic() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
