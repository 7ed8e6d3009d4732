"""Refresh the README's Flower screenshot: ``.venv/bin/python scripts/screenshots.py``.

Runs the browser test with TQ_UPDATE_SCREENSHOTS=1: it starts a worker and Flower on the embedded
broker, sends a few tagged tasks, screenshots Flower's pages into artifacts/ and copies the tasks
page to docs/flower-tasks.png. Needs Debian's ``chromium`` and ``pip install playwright``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    env = {
        **os.environ,
        "TQ_UPDATE_SCREENSHOTS": "1",
        "TQ_REQUIRE_SERVICES": "1",  # a missing chromium fails instead of silently skipping
        "TQ_ARTIFACTS_DIR": os.environ.get("TQ_ARTIFACTS_DIR") or str(ROOT / "artifacts"),
    }
    command = [sys.executable, "-m", "pytest", "-q", "tests/browser/test_flower_browser.py", *sys.argv[1:]]
    code = subprocess.call(command, cwd=ROOT, env=env)
    if code == 0:
        print(f"updated {ROOT / 'docs' / 'flower-tasks.png'} (all screenshots: {env['TQ_ARTIFACTS_DIR']})")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
