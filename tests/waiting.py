"""The tests' one "wait until" helper: poll a condition until it holds or a deadline passes."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_for(
    condition: Callable[[], Any], timeout: float = 30.0, what: str = "the condition", interval: float = 0.05
) -> None:
    """Return once ``condition()`` is true; ``AssertionError`` naming ``what`` after ``timeout`` s
    (the condition is always checked after the last sleep, so also at the deadline)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
