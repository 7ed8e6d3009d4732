"""Make docs/tq-status.svg: the demo's workload, then a few queued tasks, seen by `tq status`.

Usage: .venv/bin/python scripts/status_screenshot.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    data = Path(tempfile.mkdtemp(prefix="tq-status-"))
    env = {**os.environ, "TQ_DATA_DIR": str(data), "PYTHONPATH": str(ROOT), "COLUMNS": "110"}
    subprocess.run(
        [sys.executable, "examples/demo.py", "--once", "--port", "5599"], cwd=ROOT, env=env, check=True
    )
    queue = (
        "from examples import shop\n"
        "for p in (9, 9, 5, 2, 2, 2):\n"
        "    shop.send_receipt.apply_async((p,), priority=p)\n"
    )
    subprocess.run([sys.executable, "-c", queue], cwd=ROOT, env=env, check=True)
    out = ROOT / "docs" / "tq-status.svg"
    subprocess.run(
        [sys.executable, "-m", "celery", "-A", "examples.shop", "tq", "status", "--once", "--svg", str(out)],
        cwd=ROOT,
        env=env,
        check=True,
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
