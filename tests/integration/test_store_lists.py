"""The stores' key-value lists, which chords count their header results in."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest

from celery_tq.registry import Store, store_for_url
from tests.registry_support import STORE_KINDS, pg_url, store_url, together

__all__ = ["pg_url"]  # the fixture, used through store_url


@pytest.fixture(params=STORE_KINDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    return store_for_url(store_url(request.param, request, tmp_path))


def test_a_list_keeps_the_first_value_of_each_member_in_score_order(store: Store) -> None:
    assert store.kv_push("chord.j", "b:1", 1, b"second", 60) == 1
    assert store.kv_push("chord.j", "a:0", 0, b"first", 60) == 2
    assert store.kv_push("chord.j", "c", float("inf"), b"unordered", 60) == 3
    assert store.kv_push("chord.j", "a:0", 0, b"a redelivered copy", 60) == 3
    assert store.kv_list("chord.j") == [b"first", b"second", b"unordered"]
    assert store.kv_list("missing") == []


def test_deleting_a_list_deletes_its_members_only(store: Store) -> None:
    store.kv_push("chord.j", "a", 0, b"x", None)
    store.kv_push("chord.j2", "a", 0, b"y", None)
    store.kv_set("chord.s", b"2", None)
    store.kv_delete("chord.j")
    assert store.kv_list("chord.j") == []
    assert store.kv_push("chord.j", "a", 0, b"z", None) == 1
    assert store.kv_list("chord.j2") == [b"y"]
    assert store.kv_get(["chord.s"]) == [b"2"]


def test_of_concurrent_pushes_exactly_one_sees_the_full_list(store: Store) -> None:
    pushes = [partial(store.kv_push, "race.j", f"t{i}", i, str(i).encode(), 60) for i in range(8)]
    assert sorted(together(pushes)) == list(range(1, 9))
    assert store.kv_list("race.j") == [str(i).encode() for i in range(8)]
