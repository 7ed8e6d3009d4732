"""A person opening Flower sees our tasks with their tags and priority: headless Chromium checks it.

Screenshots go to $TQ_ARTIFACTS_DIR (else the test's tmp_path). The README's picture,
docs/flower-tasks.png, shows the demo instead (``scripts/screenshots.py``).
"""

from __future__ import annotations

import json
import socket
import uuid
from pathlib import Path
from typing import Any

from tests.integration.conftest import Shop
from tests.integration.test_flower import DEVELOPMENT, StartFlower


def test_flower_pages_show_the_tagged_task(
    browser: Any, embedded_shop: Shop, start_flower: StartFlower, artifacts_dir: Path
) -> None:
    shop = embedded_shop
    flower = start_flower(shop.broker_url, shop.result_backend, env=DEVELOPMENT)
    shop.start_worker(hostname=f"flower-{uuid.uuid4().hex[:8]}@{socket.gethostname()}")

    echo, add = shop.app.tasks["tqshop.echo_meta"], shop.app.tasks["tqshop.add"]
    results = [
        add.apply_async(kwargs={"x": 2, "y": 3}, priority=2, tags={"reports"}),
        echo.apply_async(kwargs={"value": {"order_id": 5}}, priority=5),
        shop.app.tasks["tqshop.raise_error"].apply_async(
            ("InvalidInput", ["card declined"]), priority=8, tags={"refunds"}
        ),
    ]
    tagged = echo.apply_async(kwargs={"value": {"order_id": 7}}, priority=9, tags={"vip"}, timeout=10)
    results.append(tagged)
    for result in results:
        result.get(timeout=30, propagate=False)

    def all_finished() -> bool:
        tasks = flower.get_json("/api/tasks")
        return all(tasks.get(r.id, {}).get("state") in ("SUCCESS", "FAILURE") for r in results)

    flower.wait_for("all four tasks finished", all_finished)

    page = browser.new_page(viewport={"width": 1700, "height": 620})
    try:
        page.goto(f"{flower.url}/tasks")
        row = page.locator("#tasks-table tbody tr", has_text=tagged.id)
        row.wait_for(timeout=15_000)
        assert "tags=billing,vip" in row.inner_text()
        assert "priority=9" in row.inner_text() and "SUCCESS" in row.inner_text()
        page.screenshot(path=str(artifacts_dir / "flower-tasks.png"), full_page=True)

        # Flower's search box: a tag finds exactly the task that carries it.
        page.locator("input[type=search]").fill("vip")
        page.locator("#tasks-table tbody tr").filter(has_not_text=tagged.id).first.wait_for(
            state="detached", timeout=15_000
        )
        rows = page.locator("#tasks-table tbody tr")
        assert rows.count() == 1 and tagged.id in rows.first.inner_text()
        page.screenshot(path=str(artifacts_dir / "flower-search-vip.png"), full_page=True)
        page.locator("input[type=search]").fill("")  # DataTables saves the search in localStorage

        page.goto(f"{flower.url}/task/{tagged.id}")
        body = page.locator("body").inner_text()
        assert "tags=billing,vip" in body and "priority=9" in body and "timeout=10" in body
        assert "SUCCESS" in body and "tqshop.echo_meta" in body
        page.screenshot(path=str(artifacts_dir / "flower-task.png"), full_page=True)
    finally:
        page.close()

    (artifacts_dir / "flower-tasks.json").write_text(json.dumps(flower.get_json("/api/tasks"), indent=2))
