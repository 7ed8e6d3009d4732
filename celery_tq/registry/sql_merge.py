"""The forward-only merge of :func:`celery_tq.registry.record.merge` as one SQL upsert.

A batch of changes (already folded per task id in Python) becomes ONE statement: a multi-row
``INSERT ... ON CONFLICT (id) DO UPDATE`` (on PostgreSQL its rows come from one text array per
column: one statement text for every batch size) whose ``SET`` clauses apply the merge rule server-side,
so no row is read by the client and no lock outlives the statement. On PostgreSQL the tag rows
are upserted by the same statement (a data-modifying CTE); SQLite runs a second statement in the
same (local, file-locked) transaction. ``tests/integration/test_merge_rule.py`` checks this SQL, the
Python rule and the Redis store's Lua against one table of cases.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import re
from collections.abc import Sequence
from typing import Any

from celery_tq.registry.record import ATTEMPT, COLUMNS, DESCRIPTIVE, FINAL, OUTCOME, WAKE_ROW_MAX, Row

__all__ = [
    "NOTIFY_CHANNEL_SQL",
    "SQL_TYPES",
    "notice_id",
    "parse_notice",
    "tag_upsert_sqlite",
    "task_upsert",
    "task_upsert_libpq",
    "task_upsert_numbered",
    "task_upsert_params",
    "task_upsert_text",
]

# The channel of one registry: ``tq_done_`` and a hash of the schema its tables are in, so two
# registries in one database (schemas of their own: staging and production, tests) never take
# each other's notices, which carry a row for a task id both may use. SQL, evaluated by the
# writer's and the listener's sessions alike (same URL, same search_path).
NOTIFY_CHANNEL_SQL = "'tq_done_' || left(md5(coalesce(current_schema(), '')), 16)"
NOTICE_ROW_MAX = WAKE_ROW_MAX  # bytes of row JSON a notice carries

# The PostgreSQL types of the columns that are not text (the batch arrives as text arrays).
SQL_TYPES = {
    "priority": "int2",
    "progress": "int4",
    "retries": "int4",
    "deliveries": "int4",
    "submitted_at": "float8",
    "started_at": "float8",
    "finished_at": "float8",
    "runtime": "float8",
}


def _merged(
    old: str, new: str, newer: str, later: str, times: tuple[str, str] | None = None
) -> dict[str, str]:
    """Each column's merged value as SQL; ``newer``/``later`` are SQL for the rule's two facts,
    ``times`` SQL for the merged ``(started_at, finished_at)`` when computed once elsewhere."""
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
    if times is not None:
        merged["started_at"], merged["finished_at"] = times
    runtime, finished, started = merged["runtime"], merged["finished_at"], merged["started_at"]
    # NULL in a comparison is NULL, so a missing time leaves the runtime NULL
    merged["runtime"] = (
        f"COALESCE({runtime}, CASE WHEN {finished} >= {started} THEN {finished} - {started} END)"
    )
    # record.merge_deliveries: a write without a run keeps the count, a run counted last is not
    # counted again, any other run adds its runs
    od, nd = f"COALESCE({old}.deliveries, 0)", f"COALESCE({new}.deliveries, 0)"
    merged["deliveries"] = (
        f"CASE WHEN {new}.run_id IS NULL THEN {old}.deliveries WHEN {old}.run_id = {new}.run_id "
        f"THEN (CASE WHEN {nd} > {od} THEN {nd} ELSE {od} END) ELSE {od} + {nd} END"
    )
    merged["run_id"] = f"COALESCE({new}.run_id, {old}.run_id)"
    return merged


def _facts(old: str, new: str) -> tuple[str, str]:
    newer = (
        f"({new}.progress > {old}.progress OR ({new}.progress = {old}.progress AND {new}.progress < {FINAL}))"
    )
    return newer, f"(COALESCE({new}.retries, 0) - COALESCE({old}.retries, 0))"


_UPDATED = [c for c in COLUMNS if c != "id"]
# SQLite: one SET clause per column, the rule's facts spelled out in each.
_SQLITE_SET = ", ".join(
    f"{col} = {value}"
    for col, value in _merged("tq_tasks", "excluded", *_facts("tq_tasks", "excluded")).items()
    if col in _UPDATED
)
# PostgreSQL: the facts, then the merged times, computed once in sub-selects (and a statement
# short enough for psycopg to cache its parsed form: it re-parses statements longer than 4 KiB
# on every execution; tests/unit/test_merge_rule.py checks the length).
_PG_NEWER, _PG_LATER = _facts("o", "excluded")
_PG_TIMES = _merged("o", "excluded", "f.nw", "f.lt")
_PG_MERGED = _merged("o", "excluded", "m.nw", "m.lt", times=("m.st", "m.fi"))
_PG_SET = (
    f"({', '.join(_UPDATED)}) = (SELECT {', '.join(_PG_MERGED[c] for c in _UPDATED)} "
    f"FROM (SELECT f.nw, f.lt, {_PG_TIMES['started_at']} AS st, {_PG_TIMES['finished_at']} AS fi "
    f"FROM (SELECT {_PG_NEWER} AS nw, {_PG_LATER} AS lt) AS f) AS m)"
)


_TAG_CONFLICT = (
    "ON CONFLICT (task_id, tag) DO UPDATE SET state = excluded.state, submitted_at = excluded.submitted_at"
)


def _sqlite_rows(rows: int) -> str:
    return "VALUES " + ", ".join(["(" + ", ".join("?" for _ in COLUMNS) + ")"] * rows)


# PostgreSQL: a batch of several rows as one array per column (sent as text), so that ONE
# statement text serves every batch size: psycopg caches its parsed form and prepares it once,
# where a VALUES list per size was parsed and planned again for each new size (the hand-over's
# and the client's batches vary). The rows go in the arrays' order (lock order: see
# SqlStore.write). A single row (a pool process's own write: the common case) keeps a VALUES row
# of typed parameters, which PostgreSQL runs faster than unnest.
_PG_ONE = "VALUES (" + ", ".join(f"%s::{SQL_TYPES.get(c, 'text')}" for c in COLUMNS) + ")"
_PG_ROWS = "SELECT * FROM unnest(" + ", ".join(f"%s::{SQL_TYPES.get(c, 'text')}[]" for c in COLUMNS) + ")"


def _pg_text(value: object) -> str | None:
    """A column value as the text PostgreSQL parses back to it (``repr`` keeps a float's digits)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return repr(value)
    return str(value)


def task_upsert_params(rows: Sequence[Row]) -> list[Any]:
    """The PostgreSQL statement's parameters for ``rows``: one row's values in COLUMNS order,
    or for several rows one text array per column."""
    if len(rows) == 1:
        return [rows[0].get(c) for c in COLUMNS]
    return [[_pg_text(row.get(c)) for row in rows] for c in COLUMNS]


def task_upsert_text(rows: Sequence[Row]) -> list[str | None]:
    """:func:`task_upsert_params` as the text libpq sends (no psycopg adaptation): a value per
    column for one row, for several one array literal per column (every element quoted)."""
    params = task_upsert_params(rows)
    if len(rows) == 1:
        return [_pg_text(value) for value in params]
    return [_array_literal(column) for column in params]


def task_upsert_libpq(rows: Sequence[Row], channel: bytes) -> list[bytes | None] | None:
    """The parameters of :func:`task_upsert_numbered` as libpq takes them (text, encoded), the
    registry's channel last; None when a value cannot go as text (libpq sends C strings: a NUL
    character ends them), for the caller to send through psycopg's adaptation instead."""
    params: list[bytes | None] = []
    for value in task_upsert_text(rows):
        if value is None:
            params.append(None)
        elif "\0" in value:
            return None
        else:
            params.append(value.encode())
    params.append(channel if ends_a_task(rows) else None)
    return params


def task_upsert_numbered(rows: int) -> bytes:
    """PostgreSQL's :func:`task_upsert` with libpq's ``$1, $2, ...`` placeholders (to prepare)."""
    return _numbered(min(rows, 2))  # one text for one row, one for any larger number


@functools.lru_cache(maxsize=2)
def _numbered(rows: int) -> bytes:
    count = itertools.count(1)
    return re.sub(r"%s", lambda _: f"${next(count)}", task_upsert("postgresql", rows)).encode()


def _array_literal(values: Sequence[str | None]) -> str:
    items = ("NULL" if v is None else '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values)
    return "{" + ",".join(items) + "}"


@functools.lru_cache(maxsize=128)
def task_upsert(dialect: str, rows: int) -> str:
    """The statement that merges ``rows`` changes. SQLite: params are each row's COLUMNS, in
    order. PostgreSQL: one text for one row, one for any larger number; params are
    :func:`task_upsert_params`, then the registry's channel, the value of
    :data:`NOTIFY_CHANNEL_SQL` in the writer's session, evaluated once per connection."""
    if dialect != "postgresql":
        return (
            f"INSERT INTO tq_tasks ({', '.join(COLUMNS)}) {_sqlite_rows(rows)} "
            f"ON CONFLICT (id) DO UPDATE SET {_SQLITE_SET}"
        )
    upsert = f"INSERT INTO tq_tasks AS o ({', '.join(COLUMNS)}) {_PG_ONE if rows == 1 else _PG_ROWS} "
    upsert += "ON CONFLICT (id) DO UPDATE SET "
    upsert += _PG_SET
    # The task row stays locked by this statement until it commits, so two writers of one task
    # write its tag rows in the order they merged it: the tag rows carry its latest state.
    # A terminal write also notifies the registry's ``tq_done_*`` channel (delivered at commit):
    # it wakes a client waiting in ``get()``, and carries the merged row when it fits, so that
    # client need not read it (payload: see :func:`parse_notice`). A batch that brings no
    # outcome passes no channel (:func:`ends_a_task`): a client's QUEUED rows merged after
    # their tasks ended notify nobody again.
    return (
        f"WITH up AS ({upsert} RETURNING o.*), "
        "tagged AS (INSERT INTO tq_task_tags (task_id, tag, state, submitted_at) "
        "SELECT up.id, t.tag, up.state, up.submitted_at FROM up "
        "CROSS JOIN LATERAL jsonb_array_elements_text(up.tags::jsonb) AS t(tag) "
        "WHERE up.tags IS NOT NULL " + _TAG_CONFLICT + ") "
        "SELECT pg_notify(n.channel, length(up.id) || ':' || up.id || CASE WHEN "
        f"octet_length(j::text) <= {NOTICE_ROW_MAX} THEN j::text ELSE '' END) "
        "FROM (SELECT %s::text AS channel) AS n, up, row_to_json(up) AS j "
        f"WHERE n.channel IS NOT NULL AND up.progress >= {FINAL}"
    )


def ends_a_task(rows: Sequence[Row]) -> bool:
    """Whether a change in ``rows`` ends its task: the write a client in ``get()`` waits for,
    so the batch notifies (:func:`task_upsert`'s channel parameter, else None, as the Redis
    store publishes only for a change that is itself terminal) and its commit is durable."""
    return any(int(r.get("progress", 0)) >= FINAL for r in rows)


def notice_id(payload: str) -> str:
    """The task id of a ``tq_done_*`` payload (see :func:`parse_notice`), without parsing its row."""
    size, colon, rest = payload.partition(":")
    if colon and size.isdigit() and int(size) <= len(rest):
        return rest[: int(size)]
    return payload


def parse_notice(payload: str) -> tuple[str, Row | None]:
    """``(task id, merged row or None)`` from a ``tq_done_*`` payload: ``<len(id)>:<id>[<row JSON>]``.

    The row is left out when it would not fit PostgreSQL's 8,000-byte payload; a payload of a bare
    id (what earlier celery-tq releases sent) or one that does not parse gives no row.
    """
    task_id = notice_id(payload)
    body = payload[payload.index(":") + 1 + len(task_id) :] if task_id != payload else ""
    if not body:
        return task_id, None
    try:
        row = json.loads(body)
    except (ValueError, RecursionError):
        return task_id, None
    if not isinstance(row, dict) or row.get("id") != task_id:
        return task_id, None
    return task_id, {c: row[c] for c in COLUMNS if row.get(c) is not None}  # as a read gives it


def tag_upsert_sqlite(task_ids: Sequence[str]) -> str:
    """SQLite: the tag rows of ``task_ids`` from their merged task rows (same transaction)."""
    marks = ", ".join("?" for _ in task_ids)
    return (
        "INSERT INTO tq_task_tags (task_id, tag, state, submitted_at) "
        "SELECT t.id, j.value, t.state, t.submitted_at FROM tq_tasks AS t, json_each(t.tags) AS j "
        f"WHERE t.id IN ({marks}) AND t.tags IS NOT NULL " + _TAG_CONFLICT
    )
