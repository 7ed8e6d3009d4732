"""Refresh the README's Flower screenshot from the demo: ``.venv/bin/python scripts/screenshots.py``.

Runs ``examples/demo.py`` (worker and Flower on the embedded broker, the demo's workload), waits
until the workload is done, opens Flower's tasks page in headless Chromium and saves it as
docs/flower-tasks.png, then stops the demo. Needs Debian's ``chromium`` and ``pip install playwright``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("TQ_CHROMIUM", "/usr/bin/chromium")
OUT = ROOT / "docs" / "flower-tasks.png"


def main() -> int:
    from playwright.sync_api import sync_playwright

    data = Path(tempfile.mkdtemp(prefix="tq-screenshot-"))
    env = {**os.environ, "TQ_DATA_DIR": str(data / "demo"), "COLUMNS": "200"}  # the demo empties it
    log = data / "demo.out"
    with log.open("w") as out:
        command = [sys.executable, "examples/demo.py"]
        demo = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 180
        while "keep running" not in log.read_text():
            if demo.poll() is not None or time.monotonic() > deadline:
                print(log.read_text(), file=sys.stderr)
                return 1
            time.sleep(0.5)
        url = re.search(r"(http://127\.0\.0\.1:\d+)/tasks", log.read_text())
        assert url is not None
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"], headless=True
            )
            page = browser.new_page(viewport={"width": 1700, "height": 700})
            page.goto(f"{url.group(1)}/tasks")
            page.locator("#tasks-table tbody tr", has_text="shop.sync_stock").first.wait_for(timeout=30_000)
            page.wait_for_timeout(1000)  # let the table finish drawing
            page.screenshot(path=str(OUT), full_page=True)
            browser.close()
        print(f"wrote {OUT}")
        return 0
    finally:
        demo.send_signal(signal.SIGTERM)
        demo.wait(60)


if __name__ == "__main__":
    raise SystemExit(main())
