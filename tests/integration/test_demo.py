"""The main job: ``python examples/demo.py --once`` runs the workload on the embedded default."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_demo_runs_the_mixed_workload_and_exits_zero(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "TQ_DATA_DIR": str(tmp_path / "demo"), "COLUMNS": "200"}
    env.pop("TQ_ENV", None)
    done = subprocess.run(
        [sys.executable, "examples/demo.py", "--once", "--port", str(port)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "stock synced after 2 retries" in out
    assert "TaskTimeout" in out and "IoError" in out and "loading invoice 7" in out
    assert out.count("billing,vip") == 3
    assert f"http://127.0.0.1:{port}/tasks" in out
