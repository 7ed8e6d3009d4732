"""The PostgreSQL store's ``tq_done`` payload: a task id, and the record when it fits."""

from __future__ import annotations

import json

from celery_tq.registry.sql_merge import notice_id, parse_notice


def payload(task_id: str, row: object = None) -> str:
    return f"{len(task_id)}:{task_id}" + ("" if row is None else json.dumps(row))


def test_the_id_comes_whole_whatever_characters_it_holds() -> None:
    for task_id in ["5f0c-1", "has space", "12:colon", "ünïcode", "{json-like}"]:
        assert notice_id(payload(task_id)) == task_id
        assert parse_notice(payload(task_id)) == (task_id, None)
        row = {"id": task_id, "state": "SUCCESS", "progress": 1_000_000, "finished_at": 1764600000.125}
        assert parse_notice(payload(task_id, row)) == (task_id, row)


def test_a_bare_id_from_an_earlier_release_is_an_id_without_a_row() -> None:
    assert parse_notice("0b2c8a5e-0f6e-4f0e-9b5d-000000000000") == (
        "0b2c8a5e-0f6e-4f0e-9b5d-000000000000",
        None,
    )


def test_a_row_that_does_not_parse_or_names_another_task_is_not_used() -> None:
    assert parse_notice("2:ab{not json") == ("ab", None)
    assert parse_notice(payload("ab", {"id": "other", "state": "SUCCESS"})) == ("ab", None)
    assert parse_notice(payload("ab", [1, 2])) == ("ab", None)
    assert parse_notice("2:ab" + "[" * 100_000 + "]" * 100_000) == ("ab", None)  # too deep to parse


def test_unknown_and_null_columns_are_left_out_as_a_read_leaves_them() -> None:
    row = {"id": "t", "state": "SUCCESS", "progress": 1_000_000, "colour": "red", "worker": None}
    assert parse_notice(payload("t", row))[1] == {"id": "t", "state": "SUCCESS", "progress": 1_000_000}
