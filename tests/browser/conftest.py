"""Browser fixtures: Debian's chromium driven by Playwright, plus Flower and the tqshop app.

Playwright's own browser download is never used: the test launches ``/usr/bin/chromium`` (Debian's
``chromium`` package) through ``executable_path``. With TQ_REQUIRE_SERVICES=1 (CI) a missing
chromium or playwright fails the test; otherwise it is skipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import service_missing
from tests.integration.conftest import Shop, _shop
from tests.integration.test_flower import start_flower

__all__ = ["artifacts_dir", "browser", "embedded_shop", "start_flower"]

CHROMIUM = os.environ.get("TQ_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@pytest.fixture
def embedded_shop(request: pytest.FixtureRequest, data_dir: str) -> Iterator[Shop]:
    yield from _shop("embedded", request, Path(data_dir))


@pytest.fixture
def browser() -> Iterator[Any]:
    """A headless Chromium (Playwright ``Browser``), closed after the test."""
    if not os.access(CHROMIUM, os.X_OK):
        service_missing("Chromium", f"{CHROMIUM} not found; apt-get install chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        service_missing("Playwright", f"{exc}; pip install playwright")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def artifacts_dir(tmp_path: Path) -> Path:
    """Where screenshots go: $TQ_ARTIFACTS_DIR (CI: the repo's artifacts/), else the test's tmp_path."""
    path = Path(os.environ.get("TQ_ARTIFACTS_DIR") or tmp_path / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path
