"""``Finding``: one thing ``check()`` noticed, with the fix spelled out."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

__all__ = ["Finding", "Level"]

Level = Literal["error", "warning", "info"]


@dataclass(frozen=True)
class Finding:
    """One thing ``check()`` noticed: how bad it is, a stable code, what, and how to fix it."""

    level: Level
    code: str
    message: str
    fix: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
