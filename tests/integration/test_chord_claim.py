"""A chord's dispatch claim on every store: one header task sends the body, and the run's cleanup
never eats a re-applied frozen chord's run (Celery's Redis backend: a claim token and
``CHORD_CLEANUP_LUA``)."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery, states

from celery_tq import celery_seam
from celery_tq.registry import Store, store_for_url
from tests.registry_support import STORE_KINDS, pg_url, store_url, together

__all__ = ["pg_url"]  # the fixture, used through store_url


@pytest.fixture(params=STORE_KINDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return store_url(request.param, request, tmp_path)


@pytest.fixture
def store(url: str) -> Store:
    return store_for_url(url)


def test_of_concurrent_claims_exactly_one_wins(store: Store) -> None:
    claims = [partial(store.kv_claim, "g.c", f"token{i}".encode(), 30) for i in range(8)]
    assert sorted(together(claims)) == [False] * 7 + [True]


def test_an_expired_claim_can_be_taken_again(store: Store) -> None:
    assert store.kv_claim("g.c", b"first", 0.2)
    assert not store.kv_claim("g.c", b"second", 30)
    time.sleep(0.3)  # the first claimer died before sending the body: a redelivered copy may
    assert store.kv_claim("g.c", b"second", 30)
    assert store.kv_get(["g.c"]) == [b"second"]


def test_a_release_cleans_up_only_while_its_token_holds_the_claim(store: Store) -> None:
    store.kv_push("g.j", "a:0", 0, b"result", 60)
    store.kv_set("g.s", b"1", 60)
    assert store.kv_claim("g.c", b"mine", 30)
    assert not store.kv_release("g.c", b"not mine", ["g.j", "g.s", "g.t"], b"done", 300)
    assert store.kv_get(["g.c", "g.s"]) == [b"mine", b"1"]
    assert store.kv_list("g.j") == [b"result"]

    assert store.kv_release("g.c", b"mine", ["g.j", "g.s", "g.t"], b"done", 300)
    assert store.kv_get(["g.c", "g.s", "g.t"]) == [b"done", None, None]
    assert store.kv_list("g.j") == []
    assert store.kv_push("g.j", "a:0", 0, b"next run", 60) == 1


def test_a_re_apply_racing_a_release_keeps_its_size_and_claim(store: Store) -> None:
    """Whatever the order, the re-applied run ends with its size set and no claim: a check of
    the claim followed by separate deletes fails this under contention."""
    for round_ in range(30):
        group = f"g{round_}"
        store.kv_set(f"{group}.s", b"2", 60)
        token = f"t{round_}".encode()
        assert store.kv_claim(f"{group}.c", token, 30)
        drop = [f"{group}{suffix}" for suffix in (".j", ".s", ".t")]

        def re_apply(group: str = group) -> None:  # what set_chord_size does
            store.kv_delete(f"{group}.c")
            store.kv_set(f"{group}.s", b"3", 60)

        together([partial(store.kv_release, f"{group}.c", token, drop, b"done", 300), re_apply])
        assert store.kv_get([f"{group}.c", f"{group}.s"]) == [None, b"3"], round_


# --- through the backend's chord join ----------------------------------------------------------


@pytest.fixture
def app(url: str) -> Celery:
    app = Celery("chords", set_as_current=False)
    app.conf.update(broker_url="memory://", result_backend=f"tq+{url}")
    return app


class _Interleave:
    """The backend's store, running ``action`` right after the first store call it makes once
    armed: a re-apply landing between two steps of the body's cleanup."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.action: Any = None

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.store, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            value = attr(*args, **kwargs)
            action, self.action = self.action, None
            if action is not None:
                action()
            return value

        return call


def _header_task(app: Celery, group_id: str, index: int) -> SimpleNamespace:
    return SimpleNamespace(
        id=f"{group_id}-{index}", group=group_id, group_index=index, chord=app.signature("chords.body")
    )


def test_a_chord_re_applied_while_its_last_run_cleans_up_sends_its_body_again(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend: Any = app.backend
    interleave = _Interleave(backend.store)
    monkeypatch.setattr(type(backend), "store", property(lambda self: interleave))
    group_id = "frozen-chord"
    sent: list[list[int]] = []

    def publish(app_: Celery, publish: Any, results: list[int]) -> None:
        sent.append(results)
        if len(sent) == 1:  # the body is out: the caller re-applies the frozen chord right away
            interleave.action = lambda: backend.set_chord_size(group_id, 2)

    monkeypatch.setattr(celery_seam, "publish_callback", publish)
    for run in (1, 2):
        if run == 1:
            backend.set_chord_size(group_id, 2)
        for index in (0, 1):
            backend.on_chord_part_return(_header_task(app, group_id, index), states.SUCCESS, run * 10 + index)
    assert sent == [[10, 11], [20, 21]]


def test_a_late_copy_of_a_header_task_does_not_send_the_body_again(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend: Any = app.backend
    sent: list[list[int]] = []
    monkeypatch.setattr(celery_seam, "publish_callback", lambda app_, publish, results: sent.append(results))
    backend.set_chord_size("g", 2)
    for index in (0, 1, 1):  # the last one redelivered after the body went
        backend.on_chord_part_return(_header_task(app, "g", index), states.SUCCESS, index)
    assert sent == [[0, 1]]
