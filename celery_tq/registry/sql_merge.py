"""The forward-only merge of :func:`celery_tq.registry.record.merge` as one SQL upsert.

A batch of changes (already folded per task id in Python) becomes ONE statement: a multi-row
``INSERT ... ON CONFLICT (id) DO UPDATE`` whose ``SET`` clauses apply the merge rule server-side,
so no row is read by the client and no lock outlives the statement. On PostgreSQL the tag rows
are upserted by the same statement (a data-modifying CTE); SQLite runs a second statement in the
same (local, file-locked) transaction. ``tests/unit/test_merge_rule.py`` checks this SQL, the
Python rule and the Redis store's Lua against one table of cases.
"""

from __future__ import annotations

from collections.abc import Sequence

from celery_tq.registry.record import ATTEMPT, COLUMNS, DESCRIPTIVE, FINAL, OUTCOME

__all__ = ["NOTIFY_CHANNEL", "SQL_TYPES", "tag_upsert_sqlite", "task_upsert"]

NOTIFY_CHANNEL = "tq_done"

# Casts for the VALUES list: PostgreSQL types a column of NULL parameters as text otherwise.
SQL_TYPES = {
    "priority": "smallint",
    "progress": "integer",
    "retries": "integer",
    "submitted_at": "double precision",
    "started_at": "double precision",
    "finished_at": "double precision",
    "runtime": "double precision",
}


def _set_clauses(old: str, new: str) -> list[str]:
    newer = (
        f"({new}.progress > {old}.progress OR ({new}.progress = {old}.progress AND {new}.progress < {FINAL}))"
    )
    later = f"(COALESCE({new}.retries, 0) - COALESCE({old}.retries, 0))"
    merged: dict[str, str] = {}
    for col in OUTCOME:
        merged[col] = f"CASE WHEN {newer} THEN {new}.{col} ELSE {old}.{col} END"
    for col in DESCRIPTIVE:
        merged[col] = (
            f"CASE WHEN {newer} THEN COALESCE({new}.{col}, {old}.{col}) "
            f"ELSE COALESCE({old}.{col}, {new}.{col}) END"
        )
    for col in ATTEMPT:
        merged[col] = (
            f"CASE WHEN {newer} THEN "
            f"(CASE WHEN {new}.{col} IS NULL AND {later} <= 0 THEN {old}.{col} ELSE {new}.{col} END) "
            f"ELSE (CASE WHEN {old}.{col} IS NOT NULL OR {later} <> 0 "
            f"THEN {old}.{col} ELSE {new}.{col} END) END"
        )
    o, n = f"{old}.submitted_at", f"{new}.submitted_at"
    merged["submitted_at"] = (
        f"CASE WHEN {o} IS NULL THEN {n} WHEN {n} IS NULL THEN {o} WHEN {n} < {o} THEN {n} ELSE {o} END"
    )
    runtime, finished, started = merged["runtime"], merged["finished_at"], merged["started_at"]
    merged["runtime"] = (
        f"CASE WHEN ({runtime}) IS NOT NULL THEN ({runtime}) "
        f"WHEN ({finished}) IS NOT NULL AND ({started}) IS NOT NULL AND ({finished}) >= ({started}) "
        f"THEN ({finished}) - ({started}) END"
    )
    return [f"{col} = {merged[col]}" for col in COLUMNS if col != "id"]


_SET = ", ".join(_set_clauses("tq_tasks", "excluded"))  # the same text for both dialects


_TAG_CONFLICT = (
    "ON CONFLICT (task_id, tag) DO UPDATE SET state = excluded.state, submitted_at = excluded.submitted_at"
)


def _placeholders(dialect: str) -> str:
    if dialect == "postgresql":
        return "(" + ", ".join(f"%s::{SQL_TYPES.get(c, 'text')}" for c in COLUMNS) + ")"
    return "(" + ", ".join("?" for _ in COLUMNS) + ")"


def task_upsert(dialect: str, rows: int) -> str:
    """The statement that merges ``rows`` changes (params: each row's COLUMNS, in order)."""
    values = ", ".join([_placeholders(dialect)] * rows)
    upsert = (
        f"INSERT INTO tq_tasks ({', '.join(COLUMNS)}) VALUES {values} ON CONFLICT (id) DO UPDATE SET {_SET}"
    )
    if dialect != "postgresql":
        return upsert
    # The task row stays locked by this statement until it commits, so two writers of one task
    # write its tag rows in the order they merged it: the tag rows carry its latest state.
    # A terminal write also notifies ``tq_done`` (delivered at commit) with the task id: it
    # wakes a client waiting in ``get()``.
    return (
        f"WITH up AS ({upsert} RETURNING id, state, progress, submitted_at, tags), "
        "tagged AS (INSERT INTO tq_task_tags (task_id, tag, state, submitted_at) "
        "SELECT up.id, t.tag, up.state, up.submitted_at FROM up "
        "CROSS JOIN LATERAL jsonb_array_elements_text(up.tags::jsonb) AS t(tag) "
        "WHERE up.tags IS NOT NULL " + _TAG_CONFLICT + ") "
        f"SELECT pg_notify('{NOTIFY_CHANNEL}', up.id) FROM up WHERE up.progress >= {FINAL}"
    )


def tag_upsert_sqlite(task_ids: Sequence[str]) -> str:
    """SQLite: the tag rows of ``task_ids`` from their merged task rows (same transaction)."""
    marks = ", ".join("?" for _ in task_ids)
    return (
        "INSERT INTO tq_task_tags (task_id, tag, state, submitted_at) "
        "SELECT t.id, j.value, t.state, t.submitted_at FROM tq_tasks AS t, json_each(t.tags) AS j "
        f"WHERE t.id IN ({marks}) AND t.tags IS NOT NULL " + _TAG_CONFLICT
    )
