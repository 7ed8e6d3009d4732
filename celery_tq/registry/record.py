"""``TaskRecord`` and the forward-only rule every store applies to a write.

A store keeps *rows*: flat dicts of column values (str, int, float or None; times are epoch
seconds; ``tags``, ``result``, ``error`` and ``meta`` are JSON text). A write is a partial row
for one task; :func:`merge` folds it into what is stored so that states only move forward,
whatever order the writes arrive in. The Redis store runs the same rule in Lua
(:mod:`.redis`), the SQL stores as one upsert (:mod:`.sql_merge`); one table of cases tests all three.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from celery_tq.errors import StorageError

__all__ = [
    "DELIVERIES",
    "DESCRIPTIVE",
    "FINAL",
    "FIRST_WAIT",
    "OUTCOME",
    "QUEUED",
    "STATES",
    "TERMINAL",
    "WAKE_ROW_MAX",
    "Query",
    "Row",
    "TaskRecord",
    "change",
    "fold",
    "is_state_name",
    "merge",
    "merge_deliveries",
    "progress_of",
    "supersedes",
    "to_record",
]

Row = dict[str, Any]

QUEUED = "QUEUED"
TERMINAL = ("SUCCESS", "FAILURE", "REVOKED", "REJECTED", "IGNORED")
STATES = ("QUEUED", "STARTED", "RETRY", *TERMINAL)
STATE_MAX = 64  # longest state name a store keeps (custom states included)
# Within one attempt: queued, (retry scheduled for it), started, custom progress states
# (``update_state(state="PROGRESS")``), finished. A terminal state is final: it outranks every
# non-terminal write of any attempt, so a RETRY written for a run cancelled by a lost connection
# never hides the terminal state of the redelivered run.
_RANK = {"QUEUED": 0, "RETRY": 1, "STARTED": 2}
CUSTOM_RANK = 3
FINAL = 1_000_000  # progress of a terminal state: FINAL + retries * 10
# A terminal write wakes a waiting ``get()`` (PostgreSQL NOTIFY, Redis PUBLISH) with the merged
# row when its JSON is at most this many bytes (with an id of 155 characters, under PostgreSQL's
# 8,000-byte payload); a task this process sent while listening is first waited for FIRST_WAIT s
# without a read.
WAKE_ROW_MAX = 7_300
FIRST_WAIT = 0.05

# Newest write wins outright (even with None): what happened to the latest attempt.
OUTCOME = ("state", "progress", "result", "error", "finished_at", "runtime", "retries", "meta")
# Newest non-None value wins; an older write only fills gaps.
DESCRIPTIVE = (
    "name",
    "priority",
    "tags",
    "queue",
    "args_repr",
    "kwargs_repr",
    "parent_id",
    "root_id",
    "group_id",
)
# Facts of one attempt: a later attempt replaces them; an older write fills them only for its own.
ATTEMPT = ("worker", "started_at")
# Runs counted: a run's writes carry ``run_id`` (one per run) and ``deliveries`` (the runs they
# stand for, 1); the store adds them unless its last counted run is the same one, so a write
# retried after a store error counts once (see :func:`merge_deliveries`, and
# :func:`celery_tq.registry.capture.run_of` for which writes carry a run).
DELIVERIES = ("deliveries", "run_id")
COLUMNS = ("id", *OUTCOME, *DESCRIPTIVE, *ATTEMPT, "submitted_at", *DELIVERIES)


@dataclass(frozen=True)
class TaskRecord:
    """What the registry knows about one task (DESIGN §1)."""

    id: str
    name: str | None
    state: str
    priority: int | None
    tags: frozenset[str]
    queue: str | None
    worker: str | None
    args_repr: str | None
    kwargs_repr: str | None
    submitted_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    runtime: float | None
    retries: int
    result: Any
    error: dict[str, Any] | None
    parent_id: str | None
    root_id: str | None
    group_id: str | None = None
    #: How many times a worker started this task: each Celery retry and each redelivery (a worker
    #: killed, a connection lost before the ack) adds one; ``started_at``/``worker`` are the last run's.
    deliveries: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: times as ISO 8601, tags sorted."""
        data = {f: getattr(self, f) for f in self.__dataclass_fields__}
        data["tags"] = sorted(self.tags)
        for key in ("submitted_at", "started_at", "finished_at"):
            data[key] = data[key].isoformat() if data[key] else None
        return data


@dataclass(frozen=True)
class Query:
    """The filters of ``Registry.query``/``counts``; times are epoch seconds."""

    state: str | None = None
    tags: frozenset[str] = frozenset()
    name: str | None = None
    queue: str | None = None
    priority: int | None = None
    since: float | None = None
    until: float | None = None
    root_id: str | None = None
    limit: int = 100
    oldest_first: bool = False  # else newest ``submitted_at`` first

    def matches(self, row: Row) -> bool:
        """The same filters in Python (memory store, and re-checks)."""
        for key in ("state", "name", "queue", "priority", "root_id"):
            wanted = getattr(self, key)
            if wanted is not None and row.get(key) != wanted:
                return False
        submitted = row.get("submitted_at") or 0.0
        if self.since is not None and submitted < self.since:
            return False
        if self.until is not None and submitted > self.until:
            return False
        return not self.tags or self.tags <= set(json.loads(row.get("tags") or "[]"))


def progress_of(state: str, retries: int) -> int:
    """How far along a task is: terminal states last, then later attempts, then rank in an attempt."""
    if state in TERMINAL:
        return FINAL + retries * 10
    return retries * 10 + _RANK.get(state, CUSTOM_RANK)


def supersedes(new: int, old: int) -> bool:
    """Whether a write of progress ``new`` decides the outcome over a stored ``old``.

    States only move forward; at equal progress the newer write wins (a second progress
    update replaces the first), except between terminal states, where the first one stays.
    """
    return new > old or (new == old and new < FINAL)


def is_state_name(state: str) -> bool:
    """A state a record can hold: Celery's, ``QUEUED``, or a custom progress state."""
    return 0 < len(state) <= STATE_MAX and state.isprintable() and not state.isspace()


def merge_deliveries(old: Row, new: Row) -> tuple[Any, Any]:
    """``(deliveries, run_id)`` after ``new``: a write without a run keeps the count; a run not
    counted yet adds its runs; the run counted last (a retried write) is not counted again."""
    run = new.get("run_id")
    if run is None:
        return old.get("deliveries"), old.get("run_id")
    before, runs = int(old.get("deliveries") or 0), int(new.get("deliveries") or 0)
    if old.get("run_id") == run:
        return max(before, runs), run
    return before + runs, run


def change(task_id: str, state: str, retries: int = 0, **fields: Any) -> Row:
    """A write for one task: ``state`` at attempt ``retries`` plus whatever else is known."""
    tags = fields.pop("tags", None)
    row: Row = {k: v for k, v in fields.items() if v is not None}
    for key in ("submitted_at", "started_at", "finished_at"):
        if key in row:  # microseconds, as a datetime holds them
            row[key] = round(float(row[key]), 6)
    row.update(id=task_id, state=state, retries=retries, progress=progress_of(state, retries))
    if tags:
        row["tags"] = json.dumps(sorted(tags))
    return row


def merge(old: Row | None, new: Row) -> Row:
    """Fold ``new`` into ``old``: the more advanced write decides the outcome."""
    if not old:
        row = dict(new)
    else:
        newer = supersedes(int(new["progress"]), _progress(old))
        row = {"id": old.get("id") or new["id"]}
        for key in OUTCOME:
            row[key] = new.get(key) if newer else old.get(key)
        for key in DESCRIPTIVE:
            first, second = (new, old) if newer else (old, new)
            row[key] = first.get(key) if first.get(key) is not None else second.get(key)
        later = int(new.get("retries") or 0) - int(old.get("retries") or 0)
        for key in ATTEMPT:
            if newer:
                keep_old = new.get(key) is None and later <= 0
                row[key] = old.get(key) if keep_old else new.get(key)
            else:
                row[key] = old.get(key) if old.get(key) is not None or later else new.get(key)
        times = [t for t in (old.get("submitted_at"), new.get("submitted_at")) if t is not None]
        row["submitted_at"] = min(times) if times else None
        row["deliveries"], row["run_id"] = merge_deliveries(old, new)
    if row.get("runtime") is None and row.get("finished_at") and row.get("started_at"):
        runtime = float(row["finished_at"]) - float(row["started_at"])
        row["runtime"] = runtime if runtime >= 0 else None
    return {k: v for k, v in row.items() if v is not None}


def fold(changes: Iterable[Row]) -> dict[str, Row]:
    """A batch reduced to one change per task (merged in order): one store write per task."""
    folded: dict[str, Row] = {}
    for change in changes:
        folded[change["id"]] = merge(folded.get(change["id"]), change)
    return folded


def _progress(row: Row) -> int:
    try:
        return int(row["progress"])
    except (KeyError, TypeError, ValueError):
        return -1


def to_record(row: Row) -> TaskRecord:
    """Build the record of a stored row; ``StorageError`` naming the id when it is corrupt."""
    task_id = str(row.get("id") or "?")
    try:
        state = str(row["state"])
        if not is_state_name(state):
            raise ValueError(f"invalid state {state!r}")
        tags = json.loads(row.get("tags") or "[]")
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ValueError(f"tags are not a list of strings: {tags!r}")
        error = _json(row.get("error"))
        if error is not None and not isinstance(error, dict):
            raise ValueError("error is not a structured error record")
        return TaskRecord(
            id=task_id,
            name=_opt_str(row.get("name")),
            state=state,
            priority=_opt(int, row.get("priority")),
            tags=frozenset(tags),
            queue=_opt_str(row.get("queue")),
            worker=_opt_str(row.get("worker")),
            args_repr=_opt_str(row.get("args_repr")),
            kwargs_repr=_opt_str(row.get("kwargs_repr")),
            submitted_at=_time(row.get("submitted_at")),
            started_at=_time(row.get("started_at")),
            finished_at=_time(row.get("finished_at")),
            runtime=_opt(float, row.get("runtime")),
            retries=int(row.get("retries") or 0),
            result=_json(row.get("result")),
            error=error,
            parent_id=_opt_str(row.get("parent_id")),
            root_id=_opt_str(row.get("root_id")),
            group_id=_opt_str(row.get("group_id")),
            deliveries=int(row.get("deliveries") or 0),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise StorageError(f"corrupt or foreign task record: {exc}", task_id) from exc


def _json(text: Any) -> Any:
    if text is None:
        return None
    from kombu.utils.json import loads  # datetimes, UUIDs, decimals as Celery sends them

    return loads(text)


def _opt(kind: type[Any], value: Any) -> Any:
    return None if value is None or value == "" else kind(value)


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _time(value: Any) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(float(value), UTC)


def tags_of(value: Iterable[str] | str | None) -> frozenset[str]:
    if value is None:
        return frozenset()
    return frozenset((value,) if isinstance(value, str) else value)
